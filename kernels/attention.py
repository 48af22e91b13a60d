"""Attention over the paged KV cache, for a packed batch of prefill chunks and decodes."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
