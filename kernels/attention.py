"""Attention over the paged KV cache, for a packed batch of prefill chunks and decodes.

Two Triton kernels share one inner step (`_attend_tile`, in online_softmax.py), both reading
K/V straight from the paged cache through the block table:
- the split-K ("flash-decoding") kernel of decode_attention.py for the sequences that
  bring one query; it merges its context slices itself;
- a flash-attention kernel for packed prefill chunks, mixed with decodes or not.
The wrapper picks one from shapes alone (no device sync), so it can be graph-captured.
Pure decode steps in the model skip `rotary_cache` and this wrapper: `decode_attention`
does rotary, the KV write and attention in one launch (reference: `decode_attention_ref`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .online_softmax import LOG2E, _attend_tile
from .decode_attention import _decode, check_attention_args
from .rotary import rotary_cache_ref

@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, cu_ptr, ctx_ptr, slopes_ptr, o_ptr,
                    qk_scale, window, B, G, D, block_size,
                    sq_t, sq_h, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h, s_bt, so_t, so_h,
                    HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, SKIP_DECODES: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (T // BLOCK_M + B, H). Sequence b owns the query tiles numbered from
    cu[b] // BLOCK_M + b on, enough for its q_len, so the grid needs no host sync;
    tiles past a sequence's end do nothing. Tiles run last first: the longest start early."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK_B)
    firsts = tl.load(cu_ptr + i, mask=i < B, other=0) // BLOCK_M + i
    b = tl.sum(((firsts <= tile) & (i < B)).to(tl.int32), 0) - 1
    q_beg = tl.load(cu_ptr + b)
    q_end = tl.load(cu_ptr + b + 1)
    m0 = q_beg + (tile - (q_beg // BLOCK_M + b)) * BLOCK_M
    limit = q_end
    if SKIP_DECODES:  # sequences with one query went to _decode_kernel
        limit = tl.where(q_end - q_beg > 1, q_end, m0)
    if m0 < limit:
        ctx = tl.load(ctx_ptr + b)
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < q_end
        qpos = ctx - q_end + rows  # query j of the chunk sits at ctx - q_len + j
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        mask = rmask[:, None] & dmask[None, :]
        q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * sq_t + h * sq_h + d[None, :], mask=mask, other=0.0)
        slopes = tl.zeros([BLOCK_M], tl.float32)
        if HAS_ALIBI:
            slopes += tl.load(slopes_ptr + h).to(tl.float32) * 1.4426950408889634
        hi = tl.minimum(ctx, ctx - q_end + tl.minimum(m0 + BLOCK_M, q_end))  # causal: up to the last query
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(ctx - q_end + m0 - window + 1, 0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        kvh = h // G
        bt_row = bt_ptr + b.to(tl.int64) * s_bt
        k_base = kc_ptr + kvh * skc_h
        v_base = vc_ptr + kvh * svc_h
        # Keys up to the tile's first query are visible to all its rows: no masks there.
        full_end = lo
        if not HAS_WINDOW:
            full_end = (ctx - q_end + m0 + 1) // BLOCK_N * BLOCK_N
        for start in range(lo, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, bt_row, start, qpos, lo, hi, slopes,
                                         qk_scale, window, block_size, skc_b, skc_s, svc_b, svc_s, d, dmask,
                                         HAS_ALIBI, HAS_WINDOW, False, BLOCK_N)
        for start in range(full_end, hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, bt_row, start, qpos, lo, hi, slopes,
                                         qk_scale, window, block_size, skc_b, skc_s, svc_b, svc_s, d, dmask,
                                         HAS_ALIBI, HAS_WINDOW, True, BLOCK_N)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + rows.to(tl.int64)[:, None] * so_t + h * so_h + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=mask)


def _prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, alibi_slopes,
             sliding_window, out, block_m: int | None = None, block_n: int | None = None,
             num_warps: int | None = None, num_stages: int | None = None, skip_decodes: bool = False) -> None:
    """Query tiles of every sequence, or of those with q_len > 1 when `skip_decodes`."""
    T, H, D = q.shape
    B = block_tables.shape[0]
    BLOCK_D = triton.next_power_of_2(D)
    if block_m is None:
        # H100, 32 heads of 128, the two 2,048-query chunks of a 4k prompt (benchmarks.attn_sweep):
        # 128x128 tiles, 8 warps, 3 stages took 181 + 413 us, against 199 + 467 at 128x64 x 2 stages
        block_m, block_n, num_warps, num_stages = (128, 128, 8, 3) if BLOCK_D <= 128 else (64, 32, 4, 2)
    num_stages = num_stages or 2
    _prefill_kernel[(T // block_m + B, H)](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
        q if alibi_slopes is None else alibi_slopes, out,
        scale * LOG2E, sliding_window or 0, B, H // k_cache.shape[2], D, k_cache.shape[1],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        HAS_ALIBI=alibi_slopes is not None, HAS_WINDOW=sliding_window is not None, SKIP_DECODES=skip_decodes,
        BLOCK_B=triton.next_power_of_2(B), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=BLOCK_D, num_warps=num_warps, num_stages=num_stages)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`paged_attention_ref`.

    Every sequence must bring at least one query, so T == B means a pure decode step: the
    split-K kernel alone. Otherwise the split-K kernel takes the decodes and the
    flash-attention kernel the longer chunks, each skipping the other's sequences.
    """
    T, H, D = q.shape
    B = cu_seqlens_q.shape[0] - 1
    check_attention_args(q, k_cache, v_cache)
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if T == 0 or B == 0:
        return out
    args = (q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, alibi_slopes, sliding_window, out)
    _decode(*args, mixed=T != B)
    if T != B:
        _prefill(*args, skip_decodes=True)
    return out


def _attend(q, k_cache, v_cache, block_table, q_lens, ctx_lens, scale, alibi_slopes, sliding_window):
    """One batched SDPA call for sequences of equal padded shape. q: [B, Q, H, D]."""
    B, Q, H, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    max_kv = int(ctx_lens.max())
    nblk = (max_kv + bs - 1) // bs
    bt = block_table[:, :nblk].long()
    k = k_cache[bt].reshape(B, nblk * bs, Hkv, D)[:, :max_kv]
    v = v_cache[bt].reshape(B, nblk * bs, Hkv, D)[:, :max_kv]
    if Hkv != H:  # grouped-query attention: each KV head serves H // Hkv query heads
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
    dev = q.device
    q_pos = (ctx_lens - q_lens)[:, None] + torch.arange(Q, device=dev)[None]  # [B, Q]
    kv_pos = torch.arange(max_kv, device=dev)
    allowed = (kv_pos[None, None] <= q_pos[:, :, None]) & (kv_pos[None, None] < ctx_lens[:, None, None])
    if sliding_window is not None:
        allowed &= kv_pos[None, None] > q_pos[:, :, None] - sliding_window
    bias = torch.zeros(B, 1, Q, max_kv, device=dev, dtype=torch.float32)
    bias.masked_fill_(~allowed[:, None], float("-inf"))
    if alibi_slopes is not None:
        # BLOOM adds slope * key_position; softmax ignores the per-row constant that
        # a relative form would add, and this matches transformers bit for bit.
        bias = bias + alibi_slopes.float()[None, :, None, None] * kv_pos.float()[None, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(),
        attn_mask=bias, scale=scale)
    return out.transpose(1, 2).to(q.dtype)  # [B, Q, H, D]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries against their sequences' cached keys/values.

    q: [T, H, D], the new tokens of B sequences packed back to back.
    k_cache, v_cache: [num_blocks, block_size, Hkv, D], already holding this step's K/V.
    block_tables: [B, max_blocks] int32. cu_seqlens_q: [B + 1] int32 offsets into q.
    context_lens: [B] int32, each sequence's KV length including this step's tokens, so
        query j of sequence b sits at position context_lens[b] - q_len[b] + j.
    Returns [T, H, D].
    """
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    ctx = context_lens.long()
    out = torch.empty_like(q)
    decode = (q_lens == 1).nonzero().flatten()
    # All decodes go in one call; each longer chunk alone, so no padding blows up memory.
    if decode.numel():
        starts = cu_seqlens_q[decode].long()
        o = _attend(q[starts][:, None], k_cache, v_cache, block_tables[decode],
                    q_lens[decode], ctx[decode], scale, alibi_slopes, sliding_window)
        out[starts] = o[:, 0]
    for b in (q_lens > 1).nonzero().flatten().tolist():
        s, e = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        o = _attend(q[s:e][None], k_cache, v_cache, block_tables[b:b + 1],
                    q_lens[b:b + 1], ctx[b:b + 1], scale, alibi_slopes, sliding_window)
        out[s:e] = o[0]
    return out


def decode_attention_ref(
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
    """A decode step's attention: :func:`rotary_cache_ref` then :func:`paged_attention_ref`,
    for B sequences bringing one token each (q, k, v: [B, heads, D], row b for sequence b;
    the other arguments as there). Returns [B, H, D].
    """
    B = block_tables.shape[0]
    if q.shape[0] != B:
        raise ValueError(f"decode attention takes one token per sequence: {q.shape[0]} tokens, {B} sequences")
    q = rotary_cache_ref(q, k, v, positions, cos_sin, rotary_dim, interleaved, k_cache, v_cache, slot_mapping)
    cu = torch.arange(B + 1, dtype=torch.int32, device=q.device)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, cu, context_lens, scale, alibi_slopes, sliding_window)
