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


FIXED = tl.constexpr(2.0 ** 40)  # the candidates' fixed-point unit, 2^-40 (see the kernel)


@triton.jit
def _unsortable(key):
    """The float32 whose :func:`_sortable` key this is (the same xor undoes it)."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _fixed_sum(keys, mask, m):
    """The sum of exp(x - m) over the keys' x where ``mask``, in fixed point (units of 2^-40;
    each term is at most 1): an integer sum is exact in any order, and the candidates it is
    taken over lie in no set order (atomics placed them), so a seeded request still draws
    the same token every time."""
    fixed = (tl.exp(_unsortable(keys) - m) * FIXED).to(tl.int64)
    return tl.sum(tl.where(mask, fixed, 0), 0).to(tl.float32) / FIXED


@triton.jit
def _kth_largest(keys, lo, hi, k, FAN: tl.constexpr):
    """The largest t in [lo, hi] with count(keys >= t) >= k, given count(keys >= lo) >= k,
    over int32 keys held in registers (padding -2^31): each round counts the keys above FAN
    thresholds at once, so the range shrinks FAN-fold per block-wide sum (a bisection took
    32 of them, each a barrier)."""
    fan = tl.arange(0, FAN).to(tl.int64)
    while lo < hi:
        cand = lo + ((hi - lo) * (fan + 1) + FAN - 1) // FAN  # in (lo, hi], the last one hi
        n = tl.sum((keys[:, None] >= cand.to(tl.int32)[None, :]).to(tl.int32), 0)
        ok = n >= k  # true up to some candidate, false past it
        lo = tl.maximum(lo, tl.max(tl.where(ok, cand, lo), 0))
        hi = tl.minimum(hi, tl.min(tl.where(ok, hi, cand - 1), 0))
    return lo


@triton.jit
def _first_max(v, idx):
    """(max of v, the smallest idx where v takes it): per-lane running values reduced once."""
    best = tl.max(v, 0)
    return best, tl.min(tl.where(v == best, idx, 2147483647), 0)


@triton.jit
def _sample_kernel(logits_ptr, temp_ptr, topk_ptr, topp_ptr, noise_ptr, out_ptr, work_ptr, V, s_l, s_n,
                   BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, FAN: tl.constexpr, SUB: tl.constexpr,
                   NSUB: tl.constexpr, CAP: tl.constexpr):
    """One program per row. Top-k becomes a threshold on the sortable key, the k-th
    largest. The first pass keeps each SUB-column piece's largest key (NSUB of them at
    most, in ``work``); the k-th largest of those, found in registers, is a lower bound
    with few keys above it. One more pass copies those keys to ``work`` (CAP at most),
    where the k-th largest is found in registers too. Past CAP, a FAN-way search over the
    keys from that bound on (passes over the row, read from L2), which stops once
    exactly k keys lie at or above a candidate.
    Top-p needs no threshold: the race's winner j over the top-k set is kept if the mass
    strictly above it is below p, and then it also wins among the kept tokens, which all
    lie above it; if not, the kept tokens all lie strictly above j, and the race runs
    again among those. Each round ends with probability at least p.
    When top-k's candidates fit in CAP, they stay in registers with their columns, and the
    mass, the race and top-p's check run on them alone: two passes over the row in all.
    The passes keep per-lane running values (max, sum, winner) and reduce them once at
    the end, and the keys at or above the bound take their slots by atomics: a block-wide
    reduction or scan per iteration made each pass a chain of barriers. H100 (2026-11-24),
    temperature 0.8, us, before (per-iteration reductions, bisections, 8 warps over 4,096
    columns, every filter a pass) -> wide, reduced once -> candidates in registers:
    128,256 columns, top-k 50 and top-p 0.95, one row 328 -> 131 -> 89 (32 rows: 404 before,
    94 now); 50,257 columns, one row 133 -> 94 -> 73. Top-p alone, one row of 128,256: 206 -> 79
    -> 81; the last step costs the rows without top-k 0-6 us (up to 9%), cause not found."""
    row = tl.program_id(0).to(tl.int64)
    lrow = logits_ptr + row * s_l
    nrow = noise_ptr + row * s_n
    temp = tl.load(temp_ptr + row)
    k = tl.load(topk_ptr + row).to(tl.int32)
    p = tl.load(topp_ptr + row).to(tl.float32)
    cols = tl.arange(0, BLOCK_V)
    inv_t = 1.0 / tl.where(temp > 0, temp, 1.0)
    wrow = work_ptr + row * (NSUB + 2 * CAP + 1)  # pieces, candidates' keys and columns, a counter
    n_sub = (V + SUB - 1) // SUB  # piece i holds columns [i * SUB, (i + 1) * SUB)
    pieces = (temp > 0) & (k > 0) & (k < V) & (k <= n_sub) & (n_sub <= NSUB)
    # Pass 1: the best logit (greedy's answer, the first of equal ones as torch.argmax) and
    # the key range.
    v_best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    v_idx = tl.zeros([BLOCK_V], tl.int32)
    v_lo = tl.full([BLOCK_V], 2147483647, tl.int32)
    for s in range(0, V, BLOCK_V):
        valid = s + cols < V
        x = tl.load(lrow + s + cols, mask=valid, other=float("-inf"))
        if pieces:  # scaling by 1 / temperature keeps each piece's largest the largest
            sub = s // SUB + tl.arange(0, BLOCK_V // SUB)
            top = tl.max(tl.reshape(x, (BLOCK_V // SUB, SUB)), 1)
            tl.store(wrow + sub, _sortable(top * inv_t), mask=sub < n_sub)
        up = x > v_best  # strict: a lane keeps its first maximum
        v_idx = tl.where(up, s + cols, v_idx)
        v_best = tl.where(up, x, v_best)
        v_lo = tl.minimum(v_lo, tl.where(valid, _sortable(x * inv_t), 2147483647))
    best, token = _first_max(v_best, v_idx)
    if temp > 0:
        key_hi = _sortable(best * inv_t).to(tl.int64)
        lo = tl.min(v_lo, 0).to(tl.int64)
        # Top-k's candidates, when they fit: the keys at or above the bound and their columns,
        # held in registers, so that the mass, the race and top-p make no more passes.
        # (Their masses are computed again where needed rather than kept: fewer registers
        # live through the passes, which a program of 32 warps has few of.)
        m = best * inv_t
        c = tl.arange(0, CAP)
        n_cand = 0
        c_key = tl.full([CAP], -2147483648, tl.int32)
        c_col = tl.zeros([CAP], tl.int32)
        if (k > 0) & (k < V):  # largest key t with count(key >= t) >= k: the k-th largest
            hi = key_hi
            if pieces:
                count = wrow + NSUB + 2 * CAP
                tl.atomic_xchg(count, 0)
                tl.debug_barrier()  # the pieces' keys, stored by any thread, are read by all
                sub = tl.arange(0, NSUB)
                # k pieces reach this bound, so at least k keys do, all in those pieces
                bound = _kth_largest(tl.load(wrow + sub, mask=sub < n_sub, other=-2147483648), lo, hi, k, FAN)
                for s in range(0, V, BLOCK_V):  # the keys at or above it, in any order
                    key = _sortable(tl.load(lrow + s + cols, mask=s + cols < V, other=float("-inf")) * inv_t)
                    up = (s + cols < V) & (key >= bound)
                    at = tl.atomic_add(count + tl.zeros([BLOCK_V], tl.int32), 1, mask=up)
                    tl.store(wrow + NSUB + at, key, mask=up & (at < CAP))
                    tl.store(wrow + NSUB + CAP + at, s + cols, mask=up & (at < CAP))
                tl.debug_barrier()
                total = tl.atomic_add(count, 0)
                lo = bound
                if total <= CAP:
                    n_cand = total
                    c_key = tl.load(wrow + NSUB + c, mask=c < total, other=-2147483648)
                    c_col = tl.load(wrow + NSUB + CAP + c, mask=c < total, other=0)
                    lo = _kth_largest(c_key, lo, hi, k, FAN)
                    hi = lo
            fan = tl.arange(0, FAN).to(tl.int64)
            kcols = tl.arange(0, BLOCK_K)
            while lo < hi:  # count(key >= lo) >= k > count(key > hi)
                cand = lo + ((hi - lo) * (fan + 1) + FAN - 1) // FAN  # in (lo, hi], the last one hi
                c32 = cand.to(tl.int32)  # keys are int32: their compares cost half of int64's
                n = tl.zeros([FAN], dtype=tl.int32)
                for s in range(0, V, BLOCK_K):
                    valid = s + kcols < V
                    x = tl.load(lrow + s + kcols, mask=valid, other=float("-inf")) * inv_t
                    key = tl.where(valid, _sortable(x), -2147483648)
                    n += tl.sum((key[:, None] >= c32[None, :]).to(tl.int32), 0)
                ok = n >= k  # true up to some candidate, false past it
                lo = tl.maximum(lo, tl.max(tl.where(ok, cand, lo), 0))
                hi = tl.minimum(hi, tl.min(tl.where(ok, hi, cand - 1), 0))
                # exactly k keys at or above lo: they are the top k (a tie at the k-th largest
                # would put more there), so lo separates them as well as the k-th key does
                hi = tl.where(tl.min(tl.where(ok, n, 2147483647), 0) == k, lo, hi)
        live = c < n_cand
        z = 0.0
        if p < 1.0:  # the top-k set's mass
            if n_cand > 0:
                z = _fixed_sum(c_key, live & (c_key >= lo), m)
            else:
                v_z = tl.zeros([BLOCK_V], tl.float32)
                for s in range(0, V, BLOCK_V):
                    x = tl.load(lrow + s + cols, mask=s + cols < V, other=float("-inf")) * inv_t
                    v_z += tl.where(_sortable(x) >= lo, tl.exp(x - m), 0.0)
                z = tl.sum(v_z, 0)
        floor = lo  # the race runs among keys >= floor; probs need no normalizing for an argmax
        racing = 1
        while racing > 0:  # a comparison: the loop condition must be a 1-bit value
            if n_cand > 0:  # every key >= floor is a candidate
                e = tl.load(nrow + c_col, mask=live, other=1.0)
                mass = tl.exp(_unsortable(c_key) - m)
                win, tok = _first_max(tl.where(live & (c_key >= floor), mass / e, -1.0), c_col)
            else:
                v_win = tl.full([BLOCK_V], -1.0, tl.float32)
                v_tok = tl.zeros([BLOCK_V], tl.int32)
                for s in range(0, V, BLOCK_V):
                    valid = s + cols < V
                    x = tl.load(lrow + s + cols, mask=valid, other=float("-inf")) * inv_t
                    e = tl.load(nrow + s + cols, mask=valid, other=1.0)
                    r = tl.where(valid & (_sortable(x) >= floor), tl.exp(x - m) / e, -1.0)
                    up = r > v_win
                    v_tok = tl.where(up, s + cols, v_tok)
                    v_win = tl.where(up, r, v_win)
                win, tok = _first_max(v_win, v_tok)
            token = tl.where(win > -1.0, tok, token)  # a race with no runner keeps the token
            racing = 0
            if p < 1.0:
                kj = _sortable(tl.load(lrow + token) * inv_t).to(tl.int64)
                if kj < key_hi:  # the best token is always kept (p = 0 keeps it alone)
                    if n_cand > 0:
                        above = _fixed_sum(c_key, live & (c_key > kj) & (c_key >= lo), m)
                    else:
                        v_above = tl.zeros([BLOCK_V], tl.float32)
                        for s in range(0, V, BLOCK_V):
                            x = tl.load(lrow + s + cols, mask=s + cols < V, other=float("-inf")) * inv_t
                            key = _sortable(x)
                            v_above += tl.where((key > kj) & (key >= lo), tl.exp(x - m), 0.0)
                        above = tl.sum(v_above, 0)
                    if above >= p * z:  # j is out, and so is everything up to its key
                        floor = kj + 1
                        racing = 1
    tl.store(out_ptr + row, token)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    exp_noise: torch.Tensor,
    fan: int = 8,
    block_k: int = 1024,
    block_v: int = 16384,
    num_warps: int = 32,
) -> torch.Tensor:
    """Triton version of :func:`sample_ref`: one program per row, no sort. ``fan`` and
    ``block_k``: the top-k search's thresholds per round and columns per iteration;
    ``block_v``: columns per iteration of the other passes. The defaults were the fastest
    of 8 configurations on an H100 at both vocabularies above, at 1 and 32 rows (each
    pass is a chain of dependent loads, so the widest program that does not spill wins)."""
    S, V = logits.shape
    if logits.stride(-1) != 1 or exp_noise.stride(-1) != 1:
        raise ValueError("logits and exp_noise need a contiguous last dim")
    out = torch.empty(S, dtype=torch.int64, device=logits.device)
    if S:
        block_v = min(triton.next_power_of_2(V), block_v)
        sub = min(block_v, 128)
        nsub = cap = 2048  # V up to 262,144 with 128-column pieces
        work = torch.empty(S, nsub + 2 * cap + 1, dtype=torch.int32, device=logits.device)  # + a counter
        _sample_kernel[(S,)](logits, temperature, top_k, top_p, exp_noise, out, work, V,
                             logits.stride(0), exp_noise.stride(0), BLOCK_V=block_v,
                             BLOCK_K=min(triton.next_power_of_2(V), block_k), FAN=fan, SUB=sub,
                             NSUB=nsub, CAP=cap, num_warps=num_warps)
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
    before = sorted_p.cumsum(-1) - sorted_p  # mass sorted before each token
    # Mass strictly above a token leaves out the tokens equal to it (fp16 logits tie often):
    # each token takes the value at its tie group's first sorted position, so a tie group
    # is kept or dropped whole, whatever order the sort left it in.
    pos = torch.arange(V, device=x.device).expand_as(sorted_p)
    starts = (pos == 0) | (sorted_p != sorted_p.roll(1, -1))
    above = before.gather(-1, torch.where(starts, pos, 0).cummax(-1).values)
    drop_sorted = (above >= top_p.float()[:, None]) & (top_p.float() < 1.0)[:, None]
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    probs = probs.masked_fill(drop, 0.0)
    tokens = (probs / exp_noise).argmax(-1)
    return torch.where(greedy, logits.argmax(-1), tokens)
