"""A graph step's inputs into the CUDA graph's fixed buffers, inside the graph.

A step arrives packed (``mii/engine/inputs.py``): the sizes, then its ids, positions, KV
slots, logits rows and fed ids as int64 words, then its block tables, query offsets and
context lengths as int32. One host-to-device copy puts it in a fixed staging buffer; the
graph's first kernel reads the sizes from there and writes the buffers the rest of the
graph was captured on, padding included, feeding in the input ids still on the device
from the last step. As torch ops this was about ten small copies, gathers and fills per
step, each a launch with a gap after it (about 0.1 ms of a 1.25 ms Llama-1B step, H100,
2026-11-23); as a launch of its own before each replay it cost the host a Triton launch,
a fifth of GPT-2's host-bound bs=1 step (H100, 2026-11-24).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

HEADER = 5  # T, B, W, S, F: the words before a packed step's fields (mii/engine/inputs.py packs them)
_HEADER = tl.constexpr(HEADER)  # the kernel may read only constexpr globals


@triton.jit(do_not_specialize=["n_tok", "n_seq", "s_otab"])
def _fill_kernel(data, data32, last, o_ids, o_pos, o_slots, o_tables, o_ctx, o_cu, n_tok, n_seq, s_otab,
                 MIXED: tl.constexpr, BLOCK: tl.constexpr):
    """Program 0: tokens (ids, then the fed ids over them), program 1: sequences, program
    2 + b: row b of the block table (none past the step's B)."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK)
    T = tl.load(data).to(tl.int32)
    B = tl.load(data + 1).to(tl.int32)
    W = tl.load(data + 2).to(tl.int32)
    S = tl.load(data + 3).to(tl.int32)
    F = tl.load(data + 4).to(tl.int32)
    ids = data + _HEADER
    n_words = _HEADER + 3 * T + S + 2 * F
    tables = data32 + 2 * n_words
    if pid == 0:
        for s in range(0, n_tok, BLOCK):
            i = s + r
            real = i < T
            tl.store(o_ids + i, tl.load(ids + i, mask=real, other=0), mask=real)
            tl.store(o_pos + i, tl.load(ids + T + i, mask=real, other=0), mask=real)
            tl.store(o_slots + i, tl.load(ids + 2 * T + i, mask=real, other=-1), mask=i < n_tok)  # padding: no KV
        tl.debug_barrier()  # the plain ids are stored (by any thread) before the fed ones overwrite them
        dst = ids + 3 * T + S
        for s in range(0, F, BLOCK):
            f = s + r
            ok = f < F
            d = tl.load(dst + f, mask=ok, other=0)
            tl.store(o_ids + d, tl.load(last + tl.load(dst + F + f, mask=ok, other=0), mask=ok), mask=ok)
    elif pid == 1:
        cu = tables + B * W
        ctx_lens = cu + B + 1
        for s in range(0, n_seq + 1, BLOCK):
            i = s + r
            if MIXED:  # padding sequences own no token (cu repeats T); their lengths are never read
                tl.store(o_ctx + i, tl.load(ctx_lens + i, mask=i < B), mask=i < B)
                tl.store(o_cu + i, tl.load(cu + i, mask=i <= B, other=T), mask=i <= n_seq)
            else:  # a decode graph's padding sequences see one key
                tl.store(o_ctx + i, tl.load(ctx_lens + i, mask=i < B, other=1), mask=i < n_seq)
    else:
        b = pid - 2
        if b < B:
            for s in range(0, W, BLOCK):
                i = s + r
                tl.store(o_tables + b * s_otab + i, tl.load(tables + b * W + i, mask=i < W), mask=i < W)


def fill_step_inputs(out: dict, data: torch.Tensor, last: torch.Tensor, n_tok: int, n_seq: int, mixed: bool) -> None:
    """Triton version of :func:`fill_step_inputs_ref` (same arguments). The grid depends on
    ``n_seq`` alone, so a graph captures it once for every step it replays."""
    _fill_kernel[(2 + n_seq,)](data, data.view(torch.int32), last, out["input_ids"], out["positions"], out["slots"],
                               out["tables"], out["ctx_lens"], out["cu"], n_tok, n_seq, out["tables"].stride(0),
                               MIXED=mixed, BLOCK=256, num_warps=4)


def fill_step_inputs_ref(out: dict, data: torch.Tensor, last: torch.Tensor, n_tok: int, n_seq: int,
                         mixed: bool) -> None:
    """Write the step packed in ``data`` (int64 words; see mii/engine/inputs.py) into a
    graph's buffers ``out`` (input_ids, positions, slots, tables, ctx_lens, cu): T tokens
    padded to n_tok (padding slots -1), B sequences padded to n_seq (a decode graph's
    padding sequences get context length 1; ``mixed``: cu is written, its padding
    repeating T). The F fed ids: ``input_ids[dst] = last[src]``, after the ids. Entries
    past the step's are left alone where the graph does not read them (ids and positions
    of padding tokens, table columns past the width, a mixed graph's padding sequences'
    lengths)."""
    T, B, W, S, F = data[:HEADER].tolist()
    ids, pos, slots, _, dst, src = data[HEADER:HEADER + 3 * T + S + 2 * F].split([T, T, T, S, F, F])
    ints = data[HEADER + 3 * T + S + 2 * F:].view(torch.int32)
    tables, cu, ctx_lens = ints[:B * W].view(B, W), ints[B * W:B * W + B + 1], ints[B * W + B + 1:B * W + 2 * B + 1]
    out["input_ids"][:T].copy_(ids)
    out["input_ids"][dst] = last[src]
    out["positions"][:T].copy_(pos)
    out["slots"][:T].copy_(slots)
    out["slots"][T:n_tok].fill_(-1)
    out["tables"][:B, :W].copy_(tables)
    out["ctx_lens"][:B].copy_(ctx_lens)
    if not mixed:
        out["ctx_lens"][B:n_seq].fill_(1)
    else:
        out["cu"][:B + 1].copy_(cu)
        out["cu"][B + 1:n_seq + 1].fill_(T)
