"""A graph step's inputs into the CUDA graph's fixed buffers, in one launch.

Before each replay the step's ids, positions, KV slots, block tables, context lengths (and
for mixed steps the query offsets) are copied into the buffers the graph was captured on,
padding included, and input ids still on the device from the last step are fed in. As
torch ops that was about ten small copies, gathers and fills per step, each a launch with a
gap after it: at bs=1 they and greedy argmax held the GPU about 0.1 ms of a 1.25 ms Llama-1B
step (H100, 2026-11-23).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# One compiled kernel per MIXED serves every step: sizes stay runtime values, and so does
# the alignment of the inputs, which are views at step-dependent offsets into the two packed
# tensors. Specialized on either, serving compiled a kernel for each new combination of
# sizes and offsets, seconds of a 200-request Llama-1B run (H100, 2026-11-23).
_SIZES = ["T", "B", "W", "F", "n_tok", "n_seq", "s_tab", "s_otab"]
_INPUTS = ["ids", "pos", "slots", "tables", "ctx_lens", "cu", "dst", "src", "last"]


@triton.jit(do_not_specialize=_SIZES, do_not_specialize_on_alignment=_SIZES + _INPUTS)
def _fill_kernel(ids, pos, slots, tables, ctx_lens, cu, dst, src, last,
                 o_ids, o_pos, o_slots, o_tables, o_ctx, o_cu,
                 T, B, W, F, n_tok, n_seq, s_tab, s_otab,
                 MIXED: tl.constexpr, BLOCK: tl.constexpr):
    """Program 0: tokens (ids, then the fed ids over them), program 1: sequences, program
    2 + b: row b of the block table."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK)
    if pid == 0:
        for s in range(0, n_tok, BLOCK):
            i = s + r
            real = i < T
            tl.store(o_ids + i, tl.load(ids + i, mask=real, other=0), mask=real)
            tl.store(o_pos + i, tl.load(pos + i, mask=real, other=0), mask=real)
            tl.store(o_slots + i, tl.load(slots + i, mask=real, other=-1), mask=i < n_tok)  # padding: no KV
        tl.debug_barrier()  # the plain ids are stored (by any thread) before the fed ones overwrite them
        for s in range(0, F, BLOCK):
            f = s + r
            ok = f < F
            d = tl.load(dst + f, mask=ok, other=0)
            tl.store(o_ids + d, tl.load(last + tl.load(src + f, mask=ok, other=0), mask=ok), mask=ok)
    elif pid == 1:
        for s in range(0, n_seq + 1, BLOCK):
            i = s + r
            if MIXED:  # padding sequences own no token (cu repeats T); their lengths are never read
                tl.store(o_ctx + i, tl.load(ctx_lens + i, mask=i < B), mask=i < B)
                tl.store(o_cu + i, tl.load(cu + i, mask=i <= B, other=T), mask=i <= n_seq)
            else:  # a decode graph's padding sequences see one key
                tl.store(o_ctx + i, tl.load(ctx_lens + i, mask=i < B, other=1), mask=i < n_seq)
    else:
        b = pid - 2
        for s in range(0, W, BLOCK):
            i = s + r
            tl.store(o_tables + b * s_otab + i, tl.load(tables + b * s_tab + i, mask=i < W), mask=i < W)


def fill_step_inputs(out: dict, ids, positions, slots, tables, ctx_lens, cu, feed, n_tok: int, n_seq: int,
                     mixed: bool) -> None:
    """Triton version of :func:`fill_step_inputs_ref` (same arguments)."""
    B, W = tables.shape
    dst, src, last = feed if feed is not None else (ids, ids, ids)
    F = dst.numel() if feed is not None else 0
    _fill_kernel[(2 + B,)](ids, positions, slots, tables, ctx_lens, cu, dst, src, last,
                           out["input_ids"], out["positions"], out["slots"], out["tables"], out["ctx_lens"],
                           out["cu"], ids.numel(), B, W, F, n_tok, n_seq, tables.stride(0),
                           out["tables"].stride(0), MIXED=mixed, BLOCK=256, num_warps=4)


def fill_step_inputs_ref(out: dict, ids, positions, slots, tables, ctx_lens, cu, feed, n_tok: int, n_seq: int,
                         mixed: bool) -> None:
    """Write a step into the graph's buffers ``out`` (input_ids, positions, slots, tables,
    ctx_lens, cu): T = len(ids) tokens padded to n_tok (padding slots -1), B = len(tables)
    sequences padded to n_seq (a decode graph's padding sequences get context length 1;
    ``mixed``: cu is written, its padding repeating T). ``feed`` = (dst, src, last):
    ``input_ids[dst] = last[src]``, after the ids. Entries past the step's are left alone
    where the graph does not read them (ids and positions of padding tokens, table columns
    past the width, a mixed graph's padding sequences' lengths)."""
    T, (B, W) = ids.numel(), tables.shape
    out["input_ids"][:T].copy_(ids)
    if feed is not None:
        dst, src, last = feed
        out["input_ids"][dst] = last[src]
    out["positions"][:T].copy_(positions)
    out["slots"][:T].copy_(slots)
    out["slots"][T:n_tok].fill_(-1)
    out["tables"][:B, :W].copy_(tables)
    out["ctx_lens"][:B].copy_(ctx_lens)
    if not mixed:
        out["ctx_lens"][B:n_seq].fill_(1)
    else:
        out["cu"][:B + 1].copy_(cu)
        out["cu"][B + 1:n_seq + 1].fill_(T)
