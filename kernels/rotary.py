"""Rotary embedding fused with the paged KV-cache write."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_lanes(pos_ptr, t, cs_ptr, s_cs, R, BLOCK_D: tl.constexpr, ROTATE: tl.constexpr,
                  INTERLEAVED: tl.constexpr):
    """For each head-dim lane, at token t's position: cos, sin, whether the lane is the first
    of its pair (it takes -sin * partner), its partner lane, and whether it rotates at all.
    Shared with the fused decode-attention kernel (kernels/decode_attention.py)."""
    d = tl.arange(0, BLOCK_D)
    in_rot = d < R
    if INTERLEAVED:  # GPT-J: pairs (x0, x1), (x2, x3), ...
        first = d % 2 == 0
        pair = d ^ 1
        c = d // 2
    else:  # NeoX / Llama: first half with second half
        half = R // 2
        first = d < half
        pair = tl.where(first, d + half, d - half)
        c = tl.where(first, d, d - half)
    cos = tl.zeros([BLOCK_D], tl.float32)
    sin = tl.zeros([BLOCK_D], tl.float32)
    if ROTATE:
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cs_ptr + pos * s_cs + c, mask=in_rot, other=0.0).to(tl.float32)
        sin = tl.load(cs_ptr + pos * s_cs + R // 2 + c, mask=in_rot, other=0.0).to(tl.float32)
    return cos, sin, first, pair, in_rot


@triton.jit
def _rotate_tile(x_ptrs, pair_ptrs, mask, cos, sin, first, in_rot, ROTATE: tl.constexpr):
    """Load x and rotate its rotary lanes; rounded to x's dtype, as the reference stores it."""
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    if ROTATE:
        xf = x.to(tl.float32)
        xp = tl.load(pair_ptrs, mask=mask & in_rot, other=0.0).to(tl.float32)
        rot = xf * cos + tl.where(first, -xp, xp) * sin
        x = tl.where(in_rot, rot.to(x.dtype), x)
    return x


@triton.jit
def _rotary_cache_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr,
                         H, HKV, D, R, Q_BLOCKS, block_size,
                         sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sqo_t, sqo_h, s_cs,
                         skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
                         ROTATE: tl.constexpr, INTERLEAVED: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (T, Q_BLOCKS + kv head blocks): a program rotates a block of q heads, or
    rotates a block of k heads and writes them and their v to the cache."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    cos, sin, first, pair, in_rot = _rotary_lanes(pos_ptr, t, cs_ptr, s_cs, R, BLOCK_D, ROTATE, INTERLEAVED)
    cos, sin, first, pair, in_rot = cos[None, :], sin[None, :], first[None, :], pair[None, :], in_rot[None, :]
    if hb < Q_BLOCKS:
        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        mask = (h < H) & (d[None, :] < D)
        base = q_ptr + t * sq_t + h * sq_h
        q = _rotate_tile(base + d[None, :], base + pair, mask, cos, sin, first, in_rot, ROTATE)
        tl.store(qo_ptr + t * sqo_t + h * sqo_h + d[None, :], q, mask=mask)
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:  # -1: a padding token, nothing to cache
            h = (hb - Q_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
            mask = (h < HKV) & (d[None, :] < D)
            base = k_ptr + t * sk_t + h * sk_h
            k = _rotate_tile(base + d[None, :], base + pair, mask, cos, sin, first, in_rot, ROTATE)
            blk, off = slot // block_size, slot % block_size
            tl.store(kc_ptr + blk * skc_b + off * skc_s + h * skc_h + d[None, :],
                     k.to(kc_ptr.dtype.element_ty), mask=mask)
            v = tl.load(v_ptr + t * sv_t + h * sv_h + d[None, :], mask=mask, other=0.0)
            tl.store(vc_ptr + blk * svc_b + off * svc_s + h * svc_h + d[None, :],
                     v.to(vc_ptr.dtype.element_ty), mask=mask)


def rotary_cache(
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
) -> torch.Tensor:
    """Triton version of :func:`rotary_cache_ref`: one launch rotates q and k and fills the cache.

    q, k and v may be strided views (slices of a fused qkv projection); the last dim must be dense.
    """
    T, H, D = q.shape
    Hkv = k.shape[1]
    rotate = cos_sin is not None and rotary_dim > 0
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim, got strides {t.stride()}")
    q_out = torch.empty((T, H, D), dtype=q.dtype, device=q.device) if rotate else q
    if T == 0:
        return q_out
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_H = max(1, min(triton.next_power_of_2(max(H, Hkv)), 4096 // BLOCK_D))
    q_blocks = triton.cdiv(H, BLOCK_H) if rotate else 0
    cs = cos_sin if rotate else q  # any pointer when unused
    _rotary_cache_kernel[(T, q_blocks + triton.cdiv(Hkv, BLOCK_H))](
        q, k, v, q_out, positions, cs, k_cache, v_cache, slot_mapping,
        H, Hkv, D, rotary_dim if rotate else 0, q_blocks, k_cache.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), cs.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        ROTATE=rotate, INTERLEAVED=interleaved, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, num_warps=4)
    return q_out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    # x: [T, heads, D]; cos/sin: [T, rotary_dim // 2]
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if interleaved:  # GPT-J: pairs (x0, x1), (x2, x3), ...
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:  # NeoX / Llama: first half with second half
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


def rotary_cache_ref(
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
) -> torch.Tensor:
    """Rotate q and k by their positions, write k and v into the paged cache, return q.

    q: [T, H, D]; k, v: [T, Hkv, D]; positions: [T] int64.
    cos_sin: [max_positions, rotary_dim] holding cos in the first half and sin in the
        second; None (or rotary_dim 0) means no rotation (learned positions, ALiBi).
    k_cache, v_cache: [num_blocks, block_size, Hkv, D].
    slot_mapping: [T] int64, block * block_size + offset; -1 marks a padding token
        whose K/V must not be written (CUDA-graph padding).
    """
    if cos_sin is not None and rotary_dim > 0:
        cos, sin = cos_sin[positions].chunk(2, dim=-1)
        q = _rotate(q, cos, sin, rotary_dim, interleaved)
        k = _rotate(k, cos, sin, rotary_dim, interleaved)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)
    return q
