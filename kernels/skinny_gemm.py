"""The decode GEMM (M <= 16 rows): y = x W^T (+ b), bound by streaming the weight.

One kernel serves fp16/bf16 weights (``skinny_linear``, the engine's decode linears) and
the integer weights of W8A16/W4A16 (``kernels/quant_gemm.py``, storage described there).
Each program streams a band of weight rows along K in 16-byte loads, pipelined into
shared memory; the MMA takes the weight tile as its wide operand and the few x rows
(padded to 16) as the narrow one; split-K fills the GPU when N alone cannot, and the last
program of each band reduces the partials in the same launch. Under programmatic
dependent launch (``kernels/pdl.py``) a program pulls its first weight tiles into L2
before waiting for the kernel before it, since the weights do not depend on that kernel.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import pdl
from .activation import _act, split_kind
from .counters import zeroed
from .dequant import dequant4, dequant8, prefetch_l2
from .norm import band_stats, row_stats
from .pdl import gdc_launch_dependents, gdc_wait


@triton.jit
def _epilogue(acc, b_ptr, y_ptr, pid_n, rn, rm, M, N, stride_ym, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
              GATED: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, res, st_ptr, RES: tl.constexpr,
              RMS: tl.constexpr):
    """Store a band's y^T [BN, BM]: plus the bias, and with ACT through the activation as
    ``kernels.activation.bias_act`` does it (bias added and result rounded in the output dtype),
    so a decode step's MLP runs no separate activation kernel. GATED: the band's rows are
    gate/up pairs (see the kernel); the output has N / 2 columns. RES: y is rounded, then
    the residual ``res`` (the band's [BN, BM], loaded by the caller) is added in the output
    dtype as ``kernels.norm.add_norm`` adds it, and the band's statistics of that sum go to
    st_ptr for the norm that the next GEMVs fold in."""
    dt: tl.constexpr = y_ptr.dtype.element_ty
    if GATED:
        I = N // 2
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BN // 2, 2, BM)), (0, 2, 1)))
        on = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        gate, up = gate.to(dt), up.to(dt)
        if HAS_BIAS:
            gate += tl.load(b_ptr + on, mask=on < I, other=0.0).to(dt)[:, None]
            up += tl.load(b_ptr + I + on, mask=on < I, other=0.0).to(dt)[:, None]
        y = _act(gate.to(tl.float32), ACT).to(dt).to(tl.float32) * up.to(tl.float32)
        n_out = I
    else:
        on = pid_n * BN + tl.arange(0, BN)
        y = acc
        if ACT != "":
            y = y.to(dt)
            if HAS_BIAS:
                y += tl.load(b_ptr + rn).to(dt)[:, None]
            y = _act(y.to(tl.float32), ACT)
        elif HAS_BIAS:
            y += tl.load(b_ptr + rn).to(tl.float32)[:, None]
        n_out = N
        if RES:
            y = y.to(dt) + res
            a, b = band_stats(y.to(tl.float32), on < N, RMS)
            st = st_ptr + pid_n * 2 * M + rm
            tl.store(st, a, mask=rm < M)
            tl.store(st + M, b, mask=rm < M)
    tl.store(y_ptr + rm[None, :] * stride_ym + on[:, None], y.to(dt), mask=(on[:, None] < n_out) & (rm[None, :] < M))


@triton.jit
def _scaled(acc, xs_ptr, ws_ptr, rn, rm, M, XQ: tl.constexpr):
    """XQ (W8A8): the exact int32 sums y^T [BN, BM] times each x row's and each weight row's
    scale, in the order of ``kernels.w8a8_gemm.w8a8_gemm_ref``; otherwise acc as it is.
    (A new value, not acc reassigned: acc changes type, which Triton refuses inside a
    branch taken at run time.)"""
    if XQ:
        xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
        out = acc.to(tl.float32) * xs[None, :] * tl.load(ws_ptr + rn)[:, None]
    else:
        out = acc
    return out


@triton.jit
def _normed(acc, mean, rstd, c_ptr, rn, NORM: tl.constexpr, RMS: tl.constexpr):
    """NORM: y^T [BN, BM] of the normalized x from the sums over h itself (see the kernel)."""
    if NORM:
        if RMS:
            out = acc * rstd[None, :]
        else:
            out = (acc - mean[None, :] * tl.load(c_ptr + rn)[:, None]) * rstd[None, :]
    else:
        out = acc
    return out


# M, SPLIT_K and the scale stride stay runtime values: one compiled kernel per tile config
# serves every decode batch size, split and layer (down_proj's K/128 = 86 is no multiple of 16).
@triton.jit(do_not_specialize=["M", "stride_sn", "stride_sg", "SPLIT_K"])
def _skinny_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, lock_ptr, xs_ptr, M, N, K, NP,
                   stride_xm, stride_wn, stride_sn, stride_sg, stride_ym, SPLIT_K,
                   r_ptr, st_ptr, c_ptr, n_bands, band, eps,
                   GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, U: tl.constexpr, A_REGS: tl.constexpr,
                   PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0,
                   ACT: tl.constexpr = "", GATED: tl.constexpr = False, XQ: tl.constexpr = False,
                   RELEASE: tl.constexpr = 0, RES: tl.constexpr = False, NORM: tl.constexpr = False,
                   RMS: tl.constexpr = True, NB: tl.constexpr = 1):
    # Program (pid_n, pid_k) streams weight rows [pid_n*BN, +BN) over its share of K in
    # steps of U [BN, BK] tiles side by side along K (U > 1 reads longer runs of each row at
    # once; on the H100 it measured no faster than U = 1, the default). Loads are 16 bytes
    # wide and pipelined into shared memory. Each tile is the MMA's A operand and x^T its B:
    # the weight fills the wide side of the MMA, the M <= BM = 16 rows of x the narrow one,
    # so the result is y^T [BN, BM]. GATED (W = [gate; up], N = 2I rows): band pid_n takes the
    # gate rows [pid_n*BN/2, +BN/2) and their up rows, interleaved, so that one program holds
    # both halves of its outputs for the activation epilogue. XQ (W8A8): x is int8 too, with
    # one scale per row in xs_ptr, and the weight has one scale per row (s_ptr [N]): the
    # integer tensor cores sum exactly in int32, and the scales come once, in the epilogue.
    # RES and NORM fold a residual-add norm into the GEMVs around it (kernels/norm.py): RES
    # adds the residual r [M, N] to y and leaves the band statistics in st_ptr; NORM takes x
    # as the un-normed sum h, with the norm's weight already in W's columns, and scales the
    # sums of each row by its rstd from the statistics that n_bands bands of ``band`` columns
    # left, after taking out mean * (the row sums of W, at c_ptr) for a layer norm.
    # Normalizing x tile by tile instead cost 4.8 us per GEMV (1B gate_up, H100): wgmma's
    # x operand could no longer go straight from global to shared memory.
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    if GATED:
        slot = tl.arange(0, BN)
        rn = (pid_n * (BN // 2) + slot // 2) % (N // 2) + (slot % 2) * (N // 2)
    else:
        rn = (pid_n * BN + tl.arange(0, BN)) % N  # wrapped rows keep the weight loads unmasked
    rm = tl.arange(0, BM)
    KB: tl.constexpr = BK // 2 if BITS == 4 else BK  # elements of one weight row per tile (BITS 16: fp16 weights)
    tiles = K // BK  # BK divides the group, the group divides K
    steps = tl.cdiv(tiles, U)
    i0 = pid_k * steps // SPLIT_K  # splits differ by at most one step
    i1 = (pid_k + 1) * steps // SPLIT_K
    w_ptrs = w_ptr + rn[:, None] * stride_wn + tl.arange(0, KB)[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + tl.arange(0, BK)[None, :]
    s_ptrs = s_ptr + rn * stride_sn
    dt: tl.constexpr = x_ptr.dtype.element_ty
    if PDL and PREFETCH > 0:
        # The weights do not depend on the kernel before this one: pull this program's first
        # PREFETCH tiles into L2 (a 128-byte line per row and step) while that kernel finishes.
        LINE: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth
        NL: tl.constexpr = PREFETCH * KB // LINE if PREFETCH * KB >= LINE else 1
        lines = tl.arange(0, NL) * LINE
        first = i0 * U * KB
        prefetch_l2(w_ptr + rn[:, None] * stride_wn + (first + tl.minimum(lines, tiles * KB - first - 1))[None, :])
    if PDL:
        gdc_wait()
    res = tl.zeros((BN, BM), dt)
    if RES:  # loaded now, so its latency hides behind the stream rather than the tail
        on = pid_n * BN + tl.arange(0, BN)
        res = tl.load(r_ptr + rm[None, :] * stride_ym + on[:, None], mask=(on[:, None] < N) & (rm[None, :] < M),
                      other=0.0)
    mean = tl.zeros((BM,), tl.float32)
    rstd = mean
    if NORM:  # loaded now, so its latency hides behind the stream rather than the tail
        mean, rstd = row_stats(st_ptr, n_bands, band, K, M, eps, rm, RMS, NB)
    if XQ:
        acc = tl.zeros((BN, BM), tl.int32)
    else:
        acc = tl.zeros((BN, BM), tl.float32)
    # Only the MMA operands go through the shared-memory pipeline, so the scales are loaded
    # by hand one step ahead into registers, where their latency hides behind a step's MMAs
    # (7B W8A16 GEMVs 1-3% faster, H100), and pulled into L2 two steps ahead.
    s_next = tl.zeros((BN,), tl.float32)
    if BITS != 16 and U == 1 and not XQ:
        s_next = tl.load(s_ptrs + (tl.minimum(i0, tiles - 1) * BK // GROUP) * stride_sg)
    for i in range(i0, i1):
        if PDL and RELEASE > 0:
            # Dependents are released RELEASE steps before this program's weight stream ends
            # (0: after it), unlike the small kernels (kernels/pdl.py): released at entry, the
            # next GEMV's programs took SM slots during the stream and the 7B W8A16 decode
            # step went from 3.63 to 4.12 ms; released after the stream, 3.43 ms (H100,
            # 2026-11-22). A few steps early, the next kernel's launch overlaps the stream's
            # last steps instead of following them (skinny_config has the figures).
            if i == tl.maximum(i1 - RELEASE, i0):
                gdc_launch_dependents()
        if BITS != 16 and not XQ:
            if ASM:
                prefetch_l2(s_ptrs + (tl.minimum((i + 2) * U, tiles - 1) * BK // GROUP) * stride_sg)
            s_step = s_next
            if U == 1:
                s_next = tl.load(s_ptrs + (tl.minimum(i + 1, tiles - 1) * BK // GROUP) * stride_sg)
        for j in tl.static_range(U):
            t = i * U + j
            ok = (tl.zeros((1, 1), tl.int32) + t) < tiles  # a short last step: its missing tiles load as zeros
            q = tl.load(w_ptrs + t * KB, mask=ok, other=0)
            x = tl.load(x_ptrs + t * BK, mask=(rm[:, None] < M) & ok, other=0.0)
            if BITS == 16:
                acc += tl.dot(q, tl.trans(x))
            elif XQ:
                acc = tl.dot(q, tl.trans(x), acc, out_dtype=tl.int32)
            else:
                if U == 1:
                    s = s_step
                else:
                    s = tl.load(s_ptrs + (tl.minimum(t, tiles - 1) * BK // GROUP) * stride_sg)
                if BITS == 8:
                    part = tl.dot(dequant8(q, dt, ASM, A_REGS), tl.trans(x))
                else:  # element 2j of a row is the low nibble of byte j: pair it with x's even columns
                    lo, hi = dequant4(q.to(tl.uint8, bitcast=True), dt, ASM, A_REGS)
                    xe, xo = tl.split(tl.reshape(x, (BM, KB, 2)))
                    part = tl.dot(lo, tl.trans(xe)) + tl.dot(hi, tl.trans(xo))
                acc += part * s[:, None]
    if PDL and RELEASE == 0:
        gdc_launch_dependents()
    if SPLIT_K > 1:
        # Split-K in one launch: each program leaves its fp32 partial, and the last of an
        # n-band's SPLIT_K programs to arrive (counted by an atomic) sums them in a fixed
        # order, so the result is deterministic and no zeroing or reduction kernel runs.
        # Partials are indexed by the band's slots (NP = bands * BN), whatever rows they hold;
        # XQ's are int32, so the split sum stays exact.
        p_ptrs = part_ptr + rm[None, :] * NP + (pid_n * BN + tl.arange(0, BN))[:, None]
        pmask = rm[None, :] < M
        tl.store(p_ptrs + pid_k * M * NP, acc, mask=pmask)
        tl.debug_barrier()  # every thread's partial is stored before the count is released
        if tl.atomic_add(lock_ptr + pid_n, 1) == SPLIT_K - 1:  # acq_rel: the others' partials are visible
            total = tl.zeros_like(acc)
            for i in range(SPLIT_K):
                total += tl.load(p_ptrs + i * M * NP, mask=pmask, other=0, cache_modifier=".cg")
            _epilogue(_normed(_scaled(total, xs_ptr, s_ptr, rn, rm, M, XQ), mean, rstd, c_ptr, rn, NORM, RMS), b_ptr, y_ptr, pid_n, rn, rm, M, N, stride_ym,
                      HAS_BIAS, ACT, GATED, BN, BM, res, st_ptr, RES, RMS)
            tl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next launch
    else:
        _epilogue(_normed(_scaled(acc, xs_ptr, s_ptr, rn, rm, M, XQ), mean, rstd, c_ptr, rn, NORM, RMS), b_ptr, y_ptr, pid_n, rn, rm, M, N, stride_ym,
                  HAS_BIAS, ACT, GATED, BN, BM, res, st_ptr, RES, RMS)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: keep grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


SKINNY_M = 16  # up to this many rows (decode batches) take the weight-streaming kernel
SKINNY_PREFETCH = 1  # tiles per program pulled into L2 before waiting on the kernel before (PDL)
# A weight of at most this many bytes is pulled into L2 whole, each program prefetching its
# entire slice before its PDL wait, to use the HBM left idle by decode attention and norms.
# Off: every size tried made the step slower on the H100 (Llama-1B 1.152 ms at 0, 1.154 /
# 1.169 / 1.201 ms at 8 / 16 / 32 MB; 7B W8A16 3.26 -> 3.34 ms at 24 MB; 2026-11-23). Kept
# for ``benchmarks.pdl_ab --prefetch-whole-mb``.
SKINNY_PREFETCH_WHOLE_BYTES = 0
SKINNY_RELEASE: int | None = None  # overrides skinny_config's ``release`` (``benchmarks.pdl_ab --release``)


def skinny_config(N: int, K: int, group: int, sms: int, BN: int = 64, BK: int = 128, num_warps: int = 2,
                  num_stages: int = 3, waves: int = 4, U: int = 1, A_REGS: bool = True,
                  prefetch: int | None = None, min_tiles: int = 4, bits: int = 16, release: int = 2) -> dict:
    """Launch parameters of the M <= 16 kernel: [BN, BK] tiles (BK capped by the group), and
    enough K-splits that about ``waves`` programs per SM stream at once (so every SM has
    loads in flight while the last ones finish), keeping at least ``min_tiles`` K-tiles per split.

    The defaults, mma.sync on 2 warps with the operands converted in registers and about
    4 programs per SM, were the fastest for W4A16 in a sweep on an H100 (2026-11-22, triton
    3.6, the 7B shapes, M = 1 and 16; ``python -m benchmarks.gemv --sweep``) and within 3%
    of the fastest for W8A16 (BN=32 on 1 warp). wgmma with the converted tile staged in
    shared memory (``num_warps=4, A_REGS=False``) was 10-30% slower: it is bound by
    shared-memory traffic. 8 programs per SM cost 3-10%.

    ``release``: under PDL, how many steps before the end of its stream a program releases
    the next kernel (0: after the stream). bs=1 decode graph replay on an H100 (2026-11-23,
    ms, after the stream / 2 steps early / 3 early): the int8 tiles (these defaults), 7B
    W8A16 3.224 / 3.153 / 3.315 (4 early: 3.475); the 2-per-SM tiles (``FLOAT_TILES``, W8A8's),
    Llama-1B 1.139 / 1.106 / 1.091, GPT-2 0.373 / 0.350 / 0.344, OPT-1.3B 1.438 / 1.429 /
    1.441, 7B 4.990 / 4.943 / 4.961, 7B W8A8 3.227 / 3.157 / 3.123. Too early, and the next
    kernel's programs take SM slots mid-stream.
    """
    BK = min(group & -group, BK)  # a power of two dividing the group, and so K (fp16: group = K)
    if BK < 16:
        raise ValueError(f"K={K} with groups of {group}: the kernel needs K tiles of at least 16")
    bands, tiles = triton.cdiv(N, BN), K // BK
    split = max(1, min(triton.cdiv(waves * sms, bands), tiles // min_tiles, triton.cdiv(tiles, U)))
    if prefetch is None:
        whole = N * K * bits // 8 <= SKINNY_PREFETCH_WHOLE_BYTES
        # A power of two: the kernel prefetches [BN, lines] at once (past the slice's end, the
        # lines of the next split, which its own program prefetches too).
        prefetch = triton.next_power_of_2(triton.cdiv(tiles, split)) if whole else SKINNY_PREFETCH
    if SKINNY_RELEASE is not None:
        release = SKINNY_RELEASE
    return dict(kind="skinny", BM=SKINNY_M, BN=BN, BK=BK, U=U, A_REGS=A_REGS, SPLIT_K=split, num_warps=num_warps,
                num_stages=num_stages, PREFETCH=prefetch, RELEASE=release)


# Per device: one int32 arrival counter per n-band for the split-K kernel (kernels/counters.py).
# Kept per (device, stream) once, the capture stream got a buffer inside the graphs' pool, and a
# mixed prefill graph's replay overwrote it: the next decode step's bands were reduced by no
# program or the wrong one (garbage logits for bloom-560m shapes at bs=3, H100, 2026-11-23).
_LOCKS: dict[torch.device, torch.Tensor] = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    return zeroed(_LOCKS, device, n, 4096, "the split-K GEMV")


class RowNorm(NamedTuple):
    """A norm whose weight (and bias) were folded into the decode GEMV's weight (and bias), left
    for the GEMV to finish (``mii/model/fold.py``): x is the residual stream h, ``stats``
    [bands, 2, M] what the GEMV that wrote h left (``skinny_gemm``'s ``stats``), in bands of
    ``band`` columns; a layer norm also takes ``row_sums`` [N] fp32, each weight row's sum."""

    stats: torch.Tensor
    band: int
    eps: float
    rms: bool
    row_sums: torch.Tensor | None = None


def skinny_gemm(x2, w, scales, bias, y, bits, group, cfg, act: str | None = None,
                x_scale: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                stats: torch.Tensor | None = None, rms: bool = True, norm: RowNorm | None = None) -> None:
    """Launch the kernel on 2-D x2 into y; ``bits`` 16 (float weight, ``scales`` unused), 8 or
    4; ``cfg`` from :func:`skinny_config`, minus "kind". ``act``: a ``kernels.activation``
    kind applied, with the bias, in the epilogue; y is [M, N / 2] for a gated kind, else [M, N].
    ``x_scale`` [M] fp32 (W8A8): x2 is int8, ``scales`` [N] one per weight row, bits 8.
    ``residual`` [M, N]: y = x W^T + b + residual, and ``stats`` [bands, 2, M] fp32 (bands =
    N / cfg's BN) receive its statistics for an RMS (``rms``) or layer norm. ``norm``: x2 is
    normalized by it, its weight already in w (see :class:`RowNorm`)."""
    M, N, K = x2.shape[0], w.shape[0], x2.shape[1]
    if w.shape[1] * (2 if bits == 4 else 1) != K:
        raise ValueError(f"x has K={K} columns but the weight {tuple(w.shape)} takes "
                         f"{w.shape[1] * (2 if bits == 4 else 1)}")
    kind, gated = split_kind(act) if act is not None else ("", False)
    if gated and N % 2:
        raise ValueError(f"a gated activation needs [gate; up] weight rows, got an odd {N}")
    if M > cfg["BM"]:
        raise ValueError(f"the skinny kernel takes at most BM={cfg['BM']} rows, got M={M}")
    xq = x_scale is not None
    if xq and (bits != 8 or scales.dim() != 1):
        raise ValueError("int8 x takes an int8 weight with one scale per row")
    if residual is not None and (act is not None or stats is None or residual.shape != y.shape
                                 or residual.stride() != y.stride()):
        raise ValueError("a residual takes no activation, a stats buffer, and the output's shape and strides")
    if norm is not None and (xq or norm.stats.shape[2] != M or (not norm.rms and norm.row_sums is None)):
        raise ValueError(f"a folded norm needs float x, stats for its {M} rows, and row sums for a layer norm")
    if K % cfg["BK"]:  # the loop covers K // BK whole tiles: a ragged K would lose its tail
        raise ValueError(f"K={K} is not a multiple of the tile's BK={cfg['BK']}")
    cfg = dict(cfg)
    split = cfg.pop("SPLIT_K")
    n_bands = triton.cdiv(N // 2, cfg["BN"] // 2) if gated else triton.cdiv(N, cfg["BN"])
    if residual is not None and tuple(stats.shape) != (n_bands, 2, M):
        raise ValueError(f"stats must be [{n_bands}, 2, {M}], got {tuple(stats.shape)}")
    NP = n_bands * cfg["BN"]
    part = torch.empty((split, M, NP) if split > 1 else (1,), device=x2.device,
                       dtype=torch.int32 if xq else torch.float32)
    locks = _locks(x2.device, n_bands) if split > 1 else part
    stride_sn, stride_sg = (0, 0) if bits == 16 else (scales.stride(0), scales.stride(1) if scales.dim() == 2 else 0)
    nrm = norm if norm is not None else RowNorm(part, 1, 0.0, rms)
    st = stats if residual is not None else nrm.stats
    _skinny_kernel[(n_bands, split)](x2, w, scales, bias if bias is not None else w, y, part, locks,
                                     x_scale if xq else scales, M, N, K, NP, x2.stride(0), w.stride(0),
                                     stride_sn, stride_sg, y.stride(0), split,
                                     residual if residual is not None else y, st,
                                     nrm.row_sums if nrm.row_sums is not None else part, nrm.stats.shape[0],
                                     nrm.band, nrm.eps, GROUP=group, BITS=bits, HAS_BIAS=bias is not None, ASM=x2.is_cuda,
                                     ACT=kind, GATED=gated, XQ=xq, RES=residual is not None, NORM=norm is not None,
                                     RMS=nrm.rms,
                                     NB=triton.next_power_of_2(nrm.stats.shape[0]), **pdl.launch_args(x2.device),
                                     **cfg)


# The fp16 weight's tiles: wgmma on 4 warps with about 2 programs per SM was the fastest in
# a sweep on the H100 (2026-11-22, the 7B shapes at M = 1, `benchmarks.gemv --sweep
# --sweep-bits 16`): 147 us for one layer's four GEMVs against 154 us with the int8 tiles,
# 88-98% of copy bandwidth except the 4096x4096 o projection (77%).
FLOAT_TILES = dict(num_warps=4, waves=2, A_REGS=False, release=3)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: dict | None = None, act: str | None = None, residual: torch.Tensor | None = None,
                  rms: bool = True, norm: RowNorm | None = None):
    """y = x W^T + b for a float weight [N, K] and x [..., K] with at most 16 rows: the same
    weight-streaming kernel as W8A16 decode, so fp16 decode GEMMs join the PDL chain.
    ``act``: y = bias_act(x W^T, b, act) in the same kernel (N / 2 columns for a gated kind).
    ``residual``: returns (y + residual, its band statistics for an RMS (``rms``) or layer
    norm, their band width); ``norm``: x is normalized by it first (see :class:`RowNorm`)."""
    K, N = x.shape[-1], weight.shape[0]
    if weight.shape[1] != K or weight.dtype != x.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not fit weight {tuple(weight.shape)} {weight.dtype}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        raise ValueError("weight rows must be contiguous")
    n_out = N // 2 if act is not None and split_kind(act)[1] else N
    y = torch.empty((x2.shape[0], n_out), device=x.device, dtype=x.dtype)
    cfg = dict(config or skinny_config(N, K, K, _num_sms(x.device), **FLOAT_TILES))
    cfg.pop("kind")
    stats = None if residual is None else residual_stats(y, cfg)
    if x2.shape[0]:
        skinny_gemm(x2, weight, weight, bias, y, 16, K, cfg, act, residual=_rows2(residual, N), stats=stats,
                    rms=rms, norm=norm)
    y = y.reshape(*x.shape[:-1], n_out)
    return y if residual is None else (y, stats, cfg["BN"])


def residual_stats(y: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The [bands, 2, M] float32 statistics buffer of a GEMV with a residual into y [M, N]."""
    return torch.empty((triton.cdiv(y.shape[-1], cfg["BN"]), 2, y.numel() // y.shape[-1]), device=y.device,
                       dtype=torch.float32)


def _rows2(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1, n).contiguous()
