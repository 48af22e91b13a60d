"""Batched sampling: temperature, top-k, top-p, then an exponential race.

The race picks argmax(probs / E) with E ~ Exp(1) drawn by the caller, which is a draw
from probs: the caller owns the randomness (a generator per request makes seeded
requests reproducible whatever batch they land in), and the kernel needs no sort.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sortable(x):
    """float32 -> int32 key with the same order (negative floats flip their magnitude bits)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _sample_kernel(logits_ptr, temp_ptr, topk_ptr, topp_ptr, noise_ptr, out_ptr, V, s_l, s_n,
                   BLOCK_V: tl.constexpr):
    """One program per row. Top-k and top-p become thresholds on the sortable key, each
    found by bisection over the 2^32 keys (at most 32 passes over the row, read from L2)."""
    row = tl.program_id(0).to(tl.int64)
    lrow = logits_ptr + row * s_l
    temp = tl.load(temp_ptr + row)
    k = tl.load(topk_ptr + row).to(tl.int32)
    p = tl.load(topp_ptr + row).to(tl.float32)
    cols = tl.arange(0, BLOCK_V)
    inv_t = 1.0 / tl.where(temp > 0, temp, 1.0)
    # Pass 1: the best logit (greedy's answer) and the key range.
    best = float("-inf")
    best_i = 0
    key_lo = 2147483647
    for s in range(0, V, BLOCK_V):
        x = tl.load(lrow + s + cols, mask=s + cols < V, other=float("-inf"))
        bx = tl.max(x, 0)
        bi = tl.argmax(x, 0)
        if bx > best:  # strict: the first maximum wins, as torch.argmax
            best_i = s + bi
        best = tl.maximum(best, bx)
        key_lo = tl.minimum(key_lo, tl.min(tl.where(s + cols < V, _sortable(x * inv_t), 2147483647), 0))
    token = best_i
    if temp > 0:
        key_hi = _sortable(best * inv_t).to(tl.int64)
        lo = key_lo.to(tl.int64)
        if (k > 0) & (k < V):  # largest key t with count(key >= t) >= k: the k-th largest
            hi = key_hi
            while lo < hi:
                mid = lo + (hi - lo + 1) // 2
                n = 0
                for s in range(0, V, BLOCK_V):
                    x = tl.load(lrow + s + cols, mask=s + cols < V, other=float("-inf")) * inv_t
                    n += tl.sum(((_sortable(x) >= mid) & (s + cols < V)).to(tl.int32), 0)
                if n >= k:
                    lo = mid
                else:
                    hi = mid - 1
        m = best * inv_t
        if p < 1.0:  # smallest t whose strictly-greater kept mass is below p: the top-p set is key >= t
            z = 0.0
            for s in range(0, V, BLOCK_V):
                x = tl.load(lrow + s + cols, mask=s + cols < V, other=float("-inf")) * inv_t
                z += tl.sum(tl.where(_sortable(x) >= lo, tl.exp(x - m), 0.0), 0)
            below = lo - 1  # mass above it is z >= p * z
            above = key_hi  # mass above it is 0 < p * z (or p is 0: keep the best alone)
            while above - below > 1:
                mid = below + (above - below) // 2
                mass = 0.0
                for s in range(0, V, BLOCK_V):
                    x = tl.load(lrow + s + cols, mask=s + cols < V, other=float("-inf")) * inv_t
                    key = _sortable(x)
                    mass += tl.sum(tl.where((key > mid) & (key >= lo), tl.exp(x - m), 0.0), 0)
                if mass < p * z:
                    above = mid
                else:
                    below = mid
            lo = above
        # The race among the kept tokens; probs need no normalizing for an argmax.
        win = -1.0
        for s in range(0, V, BLOCK_V):
            valid = s + cols < V
            x = tl.load(lrow + s + cols, mask=valid, other=float("-inf")) * inv_t
            e = tl.load(noise_ptr + row * s_n + s + cols, mask=valid, other=1.0)
            r = tl.where(valid & (_sortable(x) >= lo), tl.exp(x - m) / e, -1.0)
            br = tl.max(r, 0)
            bi = tl.argmax(r, 0)
            if br > win:
                token = s + bi
            win = tl.maximum(win, br)
    tl.store(out_ptr + row, token)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    exp_noise: torch.Tensor,
) -> torch.Tensor:
    """Triton version of :func:`sample_ref`: one program per row, no sort."""
    S, V = logits.shape
    if logits.stride(-1) != 1 or exp_noise.stride(-1) != 1:
        raise ValueError("logits and exp_noise need a contiguous last dim")
    out = torch.empty(S, dtype=torch.int64, device=logits.device)
    if S:
        _sample_kernel[(S,)](logits, temperature, top_k, top_p, exp_noise, out, V,
                             logits.stride(0), exp_noise.stride(0),
                             BLOCK_V=min(triton.next_power_of_2(V), 4096), num_warps=8)
    return out


def sample_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    exp_noise: torch.Tensor,
) -> torch.Tensor:
    """Next tokens [S] (int64) for rows of float32 logits [S, V].

    temperature [S]: 0 means greedy (argmax of the raw logits), else logits / temperature.
    top_k [S] int: keep the tokens at least as large as the k-th largest (0 = off), as
        transformers' TopKLogitsWarper does.
    top_p [S]: then keep the fewest most likely tokens whose mass reaches top_p: a token
        stays if the mass strictly above it is below top_p (1.0 = off; the best always stays).
    exp_noise [S, V]: Exp(1) draws; the token is argmax(probs / exp_noise).
    """
    greedy = temperature <= 0
    x = logits.float() / torch.where(greedy, 1.0, temperature.float())[:, None]
    V = x.shape[-1]
    k = torch.where((top_k > 0) & (top_k < V), top_k, V).long()
    kth = x.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
    x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    above = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
    drop_sorted = (above >= top_p.float()[:, None]) & (top_p.float() < 1.0)[:, None]
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    probs = probs.masked_fill(drop, 0.0)
    tokens = (probs / exp_noise).argmax(-1)
    return torch.where(greedy, logits.argmax(-1), tokens)
