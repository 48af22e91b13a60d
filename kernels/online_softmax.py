"""The online-softmax steps the attention kernels are built from.

The split-K decode kernel (decode_attention.py) and the flash-attention prefill kernel
(attention.py) differ in how they cut the work, not in how they attend to a tile of keys:
both load K and V straight from the paged cache through the block table and fold the tile
into a running (acc, max, sum) with :func:`_attend_tile`. :func:`_merge_splits` folds the
split-K kernel's partial outputs by the same recurrence, weighted by each slice's
log-sum-exp. Scores are kept in log2 units, for exp2: the wrappers scale them by ``LOG2E``.
The kernels' reference, :func:`kernels.attention.paged_attention_ref`, is in attention.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _kv_tile(k_base, v_base, bt_row, start, lo, hi, block_size, skc_b, skc_s, svc_b, svc_s, d, dmask,
             MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """K and V of keys [start, start + BLOCK_N), zeros outside [lo, hi), through the block table."""
    kpos = start + tl.arange(0, BLOCK_N)
    if MASKED:
        kmask = (kpos >= lo) & (kpos < hi)
        blk = tl.load(bt_row + kpos // block_size, mask=kmask, other=0).to(tl.int64)
        kv_mask = kmask[:, None] & dmask[None, :]
    else:
        blk = tl.load(bt_row + kpos // block_size).to(tl.int64)
        kv_mask = dmask[None, :]
    slot = kpos % block_size
    k = tl.load(k_base + (blk * skc_b + slot * skc_s)[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + (blk * svc_b + slot * svc_s)[:, None] + d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _attend_kv(acc, m_i, l_i, q, k, v, start, qpos, lo, hi, slopes, qk_scale, window,
               HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """One online-softmax step over the tile of keys [start, start + BLOCK_N) within [lo, hi).

    Scores are kept in log2 units (qk_scale and slopes carry the log2(e) factor). With
    MASKED False the caller vouches that every query row may see every key of the tile.
    A tile with no key in [lo, hi) leaves (acc, m_i, l_i) as they were.
    """
    kpos = start + tl.arange(0, BLOCK_N)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if HAS_ALIBI:  # BLOOM: slope * key position
        s += slopes[:, None] * kpos[None, :].to(tl.float32)
    if MASKED:
        allowed = ((kpos >= lo) & (kpos < hi))[None, :] & (kpos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            allowed &= kpos[None, :] > qpos[:, None] - window
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_base, v_base, bt_row, start, qpos, lo, hi, slopes, qk_scale, window,
                 block_size, skc_b, skc_s, svc_b, svc_s, d, dmask,
                 HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Load a tile of keys and take its online-softmax step (:func:`_kv_tile`, :func:`_attend_kv`)."""
    k, v = _kv_tile(k_base, v_base, bt_row, start, lo, hi, block_size, skc_b, skc_s, svc_b, svc_s, d, dmask,
                    MASKED, BLOCK_N)
    return _attend_kv(acc, m_i, l_i, q, k, v, start, qpos, lo, hi, slopes, qk_scale, window,
                      HAS_ALIBI, HAS_WINDOW, MASKED, BLOCK_N)


@triton.jit
def _merge_splits(po_ptr, plse_ptr, base, G, g, d, mask, live, last,
                  BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """Weight each slice's output by its share of the softmax mass. The partials were
    written by other programs, maybe on other SMs: .cg reads them from L2, past L1."""
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    for s in range(0, last + 1):  # the slices that had keys to attend
        part = base + s * G + g
        lse = tl.load(plse_ptr + part, mask=live, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(po_ptr + part[:, None] * BLOCK_D + d[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * o
        total = total * alpha + w
        m = m_new
    return acc / tl.where(total == 0.0, 1.0, total)[:, None]
