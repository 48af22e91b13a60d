"""Split-K ("flash-decoding") attention for sequences with one query, over the paged KV cache.

Each program takes the query heads of one KV head over one slice of the context, so long
contexts at small batch still fill the GPU. The last program to finish for a (sequence,
KV head) merges the slices' partial outputs, so a step needs no separate merge kernel.

For pure decode steps the same kernel also takes over ``rotary_cache``'s work
(:func:`decode_attention`): each program rotates its own q heads, and the program whose
slice holds the newest key rotates that key, writes it and its value to the cache, and
attends to them from registers. No program reads a cache slot that another program of
the launch writes, so there is no ordering to get wrong.

The online-softmax steps (online_softmax.py) are shared with the prefill kernel in
attention.py, which also holds this file's reference (:func:`decode_attention_ref`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .counters import zeroed
from .pdl import enter, gdc_launch_dependents, gdc_wait

from .online_softmax import LOG2E, _attend_kv, _attend_tile, _kv_tile, _merge_splits
from .rotary import _rotary_lanes, _rotate_tile
from .skinny_gemm import _num_sms  # 4 in the interpreter: a few programs, still several slices per sequence


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, slot_ptr, kc_ptr, vc_ptr, bt_ptr, cu_ptr, ctx_ptr,
                   slopes_ptr, o_ptr, po_ptr, plse_ptr, cnt_ptr,
                   qk_scale, window, G, D, R, block_size,
                   sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, s_cs, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
                   s_bt, so_t, so_h,
                   NUM_SPLITS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, MIXED: tl.constexpr,
                   NEW_KV: tl.constexpr, ROTATE: tl.constexpr, INTERLEAVED: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
                   HOIST: tl.constexpr = False):
    """Grid (B, Hkv, NUM_SPLITS). The G query heads of a KV head share the program, so each
    K/V tile is read once per group (GQA). MIXED: some sequences bring more than one query;
    those are left to _prefill_kernel. NEW_KV: q, k, v come straight from the qkv projection
    (one token per sequence); rotate them here and write k, v to the cache. HOIST (NEW_KV): the
    owner loads the new k, v with q, before its slice's tiles (see :func:`_decode`)."""
    # EARLY: a pure decode step reads, before waiting on the qkv projection (kernels/pdl.py),
    # everything that does not come from it: the context length, block table, rotary table
    # and the first K/V tile of its slice. All of those were written by earlier steps or are
    # step inputs copied in before the step's first kernel (every kernel before this one has
    # at least started, and each waits before it releases its dependents), and the only cache
    # slot this launch writes, the newest token's, is never read from the cache. That takes
    # the chain of dependent loads (context length, block table, K/V) off the critical path.
    EARLY: tl.constexpr = PDL and NEW_KV and not MIXED
    if EARLY:
        gdc_launch_dependents()
    else:
        enter(PDL)  # see kernels/pdl.py
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    row = b.to(tl.int64)  # without MIXED, sequence b's one query is row b
    g = tl.arange(0, BLOCK_G)
    heads = kvh * G + g
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    n_heads = G
    if MIXED:  # a longer chunk: no live heads here
        row = tl.load(cu_ptr + b).to(tl.int64)
        n_heads = tl.where(tl.load(cu_ptr + b + 1) - row == 1, G, 0)
    live = g < n_heads
    mask = live[:, None] & dmask[None, :]
    cos, sin, first, pair, in_rot = _rotary_lanes(pos_ptr, row, cs_ptr, s_cs, R, BLOCK_D, ROTATE, INTERLEAVED)
    qpos = tl.zeros([BLOCK_G], tl.int32) + ctx - 1
    slopes = tl.zeros([BLOCK_G], tl.float32)
    if HAS_ALIBI:
        slopes = tl.load(slopes_ptr + heads, mask=g < G, other=0.0).to(tl.float32) * 1.4426950408889634
    # Slices are cut from this sequence's own context (a multiple of BLOCK_N each): the grid
    # has NUM_SPLITS of them to fill the GPU at any context, so a short context gets short
    # slices and runs in parallel rather than one long serial loop per head. Slicing the block
    # table's width instead put a 192-token context in one 512-token slice; cut this way the
    # 7B bs=1 step replays 0.06 ms (fp16) to 0.09 ms (W8A16) faster (H100, 2026-11-23).
    span_lo = 0
    if HAS_WINDOW:  # only the window's keys count: slice those
        span_lo = tl.maximum(ctx - window, 0) // BLOCK_N * BLOCK_N
    split_size = tl.cdiv(tl.cdiv(tl.maximum(ctx - span_lo, 1), NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = span_lo + sp * split_size
    hi = tl.minimum(lo + split_size, ctx)
    if HAS_WINDOW:
        lo = tl.maximum(lo, ctx - window)
    if MIXED:
        hi = tl.where(n_heads > 0, hi, lo)
    last = (ctx - 1 - span_lo) // split_size
    owner = sp == last  # this slice holds the newest key
    hi_cached = hi
    if NEW_KV:  # the newest key is not in the cache yet: it comes from registers below
        hi_cached = tl.where(owner, ctx - 1, hi)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt
    kc_base, vc_base = kc_ptr + kvh * skc_h, vc_ptr + kvh * svc_h
    first_tile = lo
    if NEW_KV and HOIST:
        slot_new = tl.load(slot_ptr + row, mask=owner, other=-1)  # a step input: loaded before the wait
    if EARLY:
        k0, v0 = _kv_tile(kc_base, vc_base, bt_row, lo, lo, hi_cached, block_size, skc_b, skc_s, svc_b, svc_s,
                          d, dmask, True, BLOCK_N)
        gdc_wait()
    q_row = q_ptr + row * sq_t + heads[:, None] * sq_h
    q = _rotate_tile(q_row + d[None, :], q_row + pair[None, :], mask, cos[None, :], sin[None, :],
                     first[None, :], in_rot[None, :], ROTATE)
    if NEW_KV and HOIST:
        # The owner's new key and value are loaded with q, before the slice's tiles, so that
        # their round trip overlaps q's instead of following the tiles on the critical path.
        k_row = k_ptr + row * sk_t + kvh * sk_h
        kmask = d < tl.where(owner, D, 0)  # dmask, for the owner only
        k_new = _rotate_tile(k_row + d, k_row + pair, kmask, cos, sin, first, in_rot, ROTATE)
        v_new = tl.load(v_ptr + row * sv_t + kvh * sv_h + d, mask=kmask, other=0.0)
    if EARLY:  # an empty slice's tile is all masked and changes nothing
        acc, m_i, l_i = _attend_kv(acc, m_i, l_i, q, k0, v0, lo, qpos, lo, hi_cached, slopes, qk_scale, window,
                                   HAS_ALIBI, HAS_WINDOW, True, BLOCK_N)
        first_tile = lo + BLOCK_N
    for start in range(first_tile, hi_cached, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, kc_base, vc_base, bt_row,
                                     start, qpos, lo, hi_cached, slopes, qk_scale, window, block_size,
                                     skc_b, skc_s, svc_b, svc_s, d, dmask, HAS_ALIBI, HAS_WINDOW, True, BLOCK_N)
    if NEW_KV:
        if owner:
            if HOIST:
                k, v, slot = k_new, v_new, slot_new
            else:
                k_row = k_ptr + row * sk_t + kvh * sk_h
                k = _rotate_tile(k_row + d, k_row + pair, dmask, cos, sin, first, in_rot, ROTATE)
                v = tl.load(v_ptr + row * sv_t + kvh * sv_h + d, mask=dmask, other=0.0)
                slot = tl.load(slot_ptr + row)
            k = k.to(kc_ptr.dtype.element_ty)  # what a read back from the cache would give
            v = v.to(vc_ptr.dtype.element_ty)
            if slot >= 0:  # -1: a padding token, nothing to cache
                blk, off = slot // block_size, slot % block_size
                tl.store(kc_ptr + blk * skc_b + off * skc_s + kvh * skc_h + d, k, mask=dmask)
                tl.store(vc_ptr + blk * svc_b + off * svc_s + kvh * svc_h + d, v, mask=dmask)
            s = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], 1) * qk_scale
            if HAS_ALIBI:
                s += slopes * (ctx - 1).to(tl.float32)
            m_new = tl.maximum(m_i, s)  # s is finite: so is m_new
            p = tl.exp2(s - m_new)
            alpha = tl.exp2(m_i - m_new)
            acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)[None, :]
            l_i = l_i * alpha + p
            m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # nothing allowed in this slice: output 0, weight 0
    out = acc / l_safe[:, None]
    o_ptrs = o_ptr + row * so_t + heads[:, None] * so_h + d[None, :]
    # Only slices holding keys (0..last) take part below: slices are at least BLOCK_N keys, so
    # at short contexts some programs are empty and leave at once rather than queue on the
    # counter, and a context within one slice skips the merge altogether.
    active = (sp <= last) & (n_heads > 0)
    if NUM_SPLITS == 1 or last == 0:
        if active:
            tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask)
    elif active:
        # Publish this slice's output and log2-sum-exp, then count it in; the program that
        # brings the count to the number of active slices merges them.
        group = b * tl.num_programs(1) + kvh
        base = group.to(tl.int64) * NUM_SPLITS * G
        part = base + sp * G + g
        tl.store(po_ptr + part[:, None] * BLOCK_D + d[None, :], out, mask=mask)
        tl.store(plse_ptr + part, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)), mask=live)
        # All threads' stores come before the (one-thread) release below; its acq_rel makes
        # them visible to whichever program increments last, which then merges.
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + group, 1, sem="acq_rel")
        if done == last:
            tl.debug_barrier()
            out = _merge_splits(po_ptr, plse_ptr, base, G, g, d, mask, live, last, BLOCK_G, BLOCK_D)
            tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask)
            tl.store(cnt_ptr + group, 0)  # clean for the next launch, with no host-side zeroing


# Per device: int32 counters, one per (sequence, KV head), for the in-kernel merge; the
# merging program resets its own (kernels/counters.py).
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    return zeroed(_COUNTERS, device, n, 1024, "decode attention's merge")


def check_attention_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, **more) -> None:
    """ValueError unless the query heads divide into the KV heads and every tensor the
    kernels index (q, the caches and any in ``more``) has a dense last dim."""
    H, Hkv = q.shape[1], k_cache.shape[2]
    if H % Hkv:
        raise ValueError(f"{H} query heads do not divide into {Hkv} KV heads")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), *more.items()):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim, got strides {t.stride()}")


def decode_tile(num_splits: int, head_dim: int, group: int, fused: bool) -> tuple[int, int]:
    """(keys per tile, warps) for a decode launch of ``num_splits`` context slices per
    (sequence, KV head), heads of ``head_dim``, ``group`` query heads per KV head; ``fused``:
    a pure decode step (new_kv, not mixed).

    A fused launch loads its slice's first tile before the PDL wait (EARLY in the kernel).
    When few (sequence, KV head) pairs share the grid, as at bs=1, each gets many slices, and
    256-key tiles make every slice one tile at contexts up to 8k: all of the step's K/V loads
    go before the wait, and a short context sits in one slice, with no merge. That pays with
    32 or more slices, or 9 or more where a program attends one query head (MHA: a quarter
    of a GQA group's work per tile), on 4 warps below 16 slices. Bare replay of the decode
    graphs (H100, 2026-11-25, ms at 192 / 1,024 / 2,000 or 4,000 tokens):
    - Llama-1B bs=1 (8 KV heads of 64, 33 slices): 256:8 1.032 / 1.077 / 1.114 (64:4 1.077 /
      1.148 / 1.252 on 2026-11-24); at bs=2-8 (17-5 slices) 64 keys stay best at 192 tokens;
    - OPT-1.3B bs=1 (MHA of 64, 9 slices): 64:4 1.269 / 1.372 / 1.486 -> 256:4 1.217 / 1.310 /
      1.379 (256:8 1.228 / 1.320 / 1.363);
    - GPT-2 bs=1 (12 heads, 22 slices): 64:4 0.319 / 0.365 -> 256:8 0.311 / 0.337 (192 / 1,000).
    Heads over 64 keep 64 keys: the 7B's (MHA of 128, 9 slices at bs=1) lost with every larger
    tile at 192 tokens, as Llama-3-8B's 8 KV heads of 128 did even at 33 slices (2026-11-24).
    128-key tiles for MHA with 1-3 slices won at some batch sizes and lost at others (the 7B
    at bs=8 4,000 tokens 11.61 -> 10.59 ms, at bs=4 7.59 -> 8.14), so they are not used.
    """
    if fused and head_dim <= 64 and (num_splits >= 32 or (group == 1 and num_splits >= 9)):
        return 256, 8 if num_splits >= 16 else 4
    return 64, 4


def _decode(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, alibi_slopes,
            sliding_window, out, num_splits: int | None = None, block_n: int | None = None,
            num_warps: int | None = None, num_stages: int | None = None, mixed: bool = False,
            new_kv: tuple | None = None) -> None:
    """The sequences with q_len 1 (all of them unless `mixed`, which needs cu_seqlens_q). The
    kernel slices each sequence's own context; the grid's slice count is capped by the block
    table's width, known without a sync, and slices past a sequence's end leave at once.
    `new_kv`: (k, v, positions, cos_sin, rotary_dim, interleaved, slot_mapping) as for
    rotary_cache, q not yet rotated. The key tile and warps default to :func:`decode_tile`'s.

    Heads of 64 or less load the new k, v together with q (HOIST), which takes one round trip
    off the owner's critical path: 0.3-1.1% on Llama-1B and OPT-1.3B at bs 1 and 8; the 7B's
    heads of 128 lost up to 2% at 1,024 tokens and keep the old order (H100, 2026-11-24;
    figures in benchmarks/results/notes.md, thirtieth session)."""
    B, H, D = block_tables.shape[0], q.shape[1], q.shape[2]
    Hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    G = H // Hkv
    if num_splits is None:  # enough programs to fill the GPU twice over
        num_splits = triton.cdiv(2 * _num_sms(q.device), B * Hkv)
    tile_n, tile_warps = decode_tile(num_splits, D, G, new_kv is not None and not mixed)
    block_n, num_warps = block_n or tile_n, num_warps or tile_warps
    # 256-key tiles come with slices of one tile up to 8k tokens: the loop rarely runs, and a
    # pipelined loop's prologue loads would follow q's on the critical path. Unpipelined, bare
    # replay (H100, 2026-11-24): Llama-1B bs=1 1.067/1.103/1.136 -> 1.052/1.086/1.124 ms at
    # 192/1k/4k tokens. Slices of many 64-key tiles (bs=8, the 7B at 4k) lost up to 14%.
    num_stages = num_stages or (1 if block_n >= 256 else 2)
    tiles = triton.cdiv(block_tables.shape[1] * block_size, block_n)  # at most this many slices hold keys
    num_splits = max(1, min(num_splits, tiles))
    BLOCK_D = triton.next_power_of_2(D)
    po = plse = cnt = out  # unused with one split
    if num_splits > 1:
        po = torch.empty(B * H * num_splits, BLOCK_D, dtype=torch.float32, device=q.device)
        plse = torch.empty(B * H * num_splits, dtype=torch.float32, device=q.device)
        cnt = _counters(q.device, B * Hkv)
    k = v = positions = cos_sin = slots = q  # any pointer when unused
    rotary_dim, interleaved = 0, False
    if new_kv is not None:
        k, v, positions, cos_sin, rotary_dim, interleaved, slots = new_kv
    rotate = new_kv is not None and cos_sin is not None and rotary_dim > 0
    cs = cos_sin if rotate else q
    _decode_kernel[(B, Hkv, num_splits)](
        q, k, v, positions, cs, slots, k_cache, v_cache, block_tables,
        q if cu_seqlens_q is None else cu_seqlens_q, context_lens,
        q if alibi_slopes is None else alibi_slopes, out, po, plse, cnt,
        scale * LOG2E, sliding_window or 0, G, D, rotary_dim if rotate else 0, block_size,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cs.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, HAS_ALIBI=alibi_slopes is not None, HAS_WINDOW=sliding_window is not None,
        MIXED=mixed, NEW_KV=new_kv is not None, ROTATE=rotate, INTERLEAVED=interleaved,
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n, BLOCK_D=BLOCK_D, HOIST=BLOCK_D <= 64,
        num_warps=num_warps, num_stages=num_stages, **pdl.launch_args(q.device))


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor | None,
    rotary_dim: int,
    interleaved: bool,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`kernels.attention.decode_attention_ref`: rotary, the KV-cache
    write and attention in one launch, for a step where sequence b brings exactly one token,
    row b of q, k and v (slices of the qkv projection; the last dim must be dense).
    """
    T, H, D = q.shape
    if T != block_tables.shape[0]:
        raise ValueError(f"decode attention takes one token per sequence: {T} tokens, "
                         f"{block_tables.shape[0]} sequences")
    check_attention_args(q, k_cache, v_cache, k=k, v=v)
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if T:
        _decode(q, k_cache, v_cache, block_tables, None, context_lens, scale, alibi_slopes, sliding_window, out,
                new_kv=(k, v, positions, cos_sin, rotary_dim, interleaved, slot_mapping))
    return out
