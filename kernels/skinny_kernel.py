"""The decode GEMM's kernel (M <= 16 rows): y = x W^T (+ b), bound by streaming the weight.

Each program streams a band of weight rows along K in 16-byte loads, pipelined into
shared memory; the MMA takes the weight tile as its wide operand and the few x rows
(padded to 16) as the narrow one (one row of x against int8 weights skips the MMA: see
``ROW_TILES``); split-K fills the GPU when N alone cannot, and the last
program of each band reduces the partials in the same launch. Under programmatic
dependent launch (``kernels/pdl.py``) a program pulls its first weight tiles into L2
before waiting for the kernel before it, since the weights do not depend on that kernel.
Launch parameters and the typed wrappers are in ``kernels/skinny_gemm.py``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .activation import _act
from .band_exchange import band_sum
from .dequant import dequant4, dequant8, prefetch_l2
from .norm import band_stats, row_stats_load, row_stats_of
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
def _across(acc, pid_n, rm, M, xb_ptr, xc_ptr, XCHG: tl.constexpr, XRANK: tl.constexpr, XW: tl.constexpr,
            XREGION: tl.constexpr):
    """XCHG: the band's y^T [BN, BM] summed over the ranks in fp32, in rank order (the same
    bits on every rank; ``kernels/band_exchange.py``); otherwise acc as it is."""
    if XCHG:
        offs = tl.arange(0, acc.shape[0])[:, None] * acc.shape[1] + rm[None, :]
        out = band_sum(acc.to(tl.float32), offs, rm[None, :] < M, xb_ptr, xc_ptr, pid_n, XREGION, XRANK, XW)
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


@triton.jit
def _grouped(p, s, GROUP: tl.constexpr):
    """Products p [BN, BK'] of one tile summed per row, each group's sum times its scale: ``s``
    is [BN] for a tile within one group, else [BN, groups] (``GROUP`` counts p's columns)."""
    if p.shape[1] > GROUP:
        out = tl.sum(tl.sum(tl.reshape(p, (p.shape[0], p.shape[1] // GROUP, GROUP)), axis=2) * s, axis=1)
    else:
        out = tl.sum(p, axis=1) * s
    return out


@triton.jit
def _row_dot(q, x, s, ASM: tl.constexpr, A_REGS: tl.constexpr, BITS: tl.constexpr, XQ: tl.constexpr,
             U: tl.constexpr, GROUP: tl.constexpr):
    """One x row [1, BK] against a weight tile [BN, BK or BK / 2]: the tile's sums [BN] in fp32,
    each group's scaled by its scale in ``s`` for integer weights (exact int32 sums for XQ)."""
    tl.static_assert(U == 1, "the one-row path streams one tile a step")
    if XQ:
        out = tl.sum(q.to(tl.int32) * x.to(tl.int32), axis=1)
    elif BITS == 16:
        out = tl.sum(q.to(tl.float32) * x.to(tl.float32), axis=1)
    elif BITS == 8:
        out = _grouped(dequant8(q, tl.float32, ASM, A_REGS) * x.to(tl.float32), s, GROUP)
    else:
        lo, hi = dequant4(q.to(tl.uint8, bitcast=True), x.dtype, ASM, A_REGS)
        xe, xo = tl.split(tl.reshape(x, (1, x.shape[1] // 2, 2)))
        out = _grouped(lo.to(tl.float32) * xe.to(tl.float32) + hi.to(tl.float32) * xo.to(tl.float32), s, GROUP // 2)
    return out


# M, SPLIT_K and the scale stride stay runtime values: one compiled kernel per tile config
# serves every decode batch size, split and layer (down_proj's K/128 = 86 is no multiple of 16).
RUNTIME_ARGS = ["M", "stride_sn", "stride_sg", "SPLIT_K"]


@triton.jit(do_not_specialize=RUNTIME_ARGS)
def _skinny_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, lock_ptr, xs_ptr, M, N, K, NP,
                   stride_xm, stride_wn, stride_sn, stride_sg, stride_ym, SPLIT_K,
                   r_ptr, st_ptr, c_ptr, n_bands, band, eps, xb_ptr, xc_ptr,
                   GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, U: tl.constexpr, A_REGS: tl.constexpr,
                   PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0,
                   ACT: tl.constexpr = "", GATED: tl.constexpr = False, XQ: tl.constexpr = False,
                   RELEASE: tl.constexpr = 0, RES: tl.constexpr = False, NORM: tl.constexpr = False,
                   RMS: tl.constexpr = True, NB: tl.constexpr = 1,
                   LOOP_STAGES: tl.constexpr = 0, XCHG: tl.constexpr = False, XRANK: tl.constexpr = 0,
                   XW: tl.constexpr = 1, XREGION: tl.constexpr = 0):
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
    # XCHG (a row-parallel layer under tensor parallelism, with RES): each band's partial is
    # summed over the ranks before its bias and residual (_across), so the folded norm's
    # statistics are of the whole sum, and no all-reduce kernel runs (skinny_gemm's exchange).
    # BM = 1 (one row of x, ROW_TILES in skinny_gemm.py): no MMA, which would pad the row to
    # 16; each tile times the row is summed on the CUDA cores (_row_dot), and a tile may then
    # span several scale groups.
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
    # RES's residual and NORM's statistics are used only after the loop: loaded now, so their
    # latency hides behind the stream, and the statistics summed after it (summed here, before
    # the loop, the 7B W8A16 gate_up took 39.6 us against 37.1 and the OPT-1.3B fp16 bs=1 step
    # 1.284 ms against 1.272; H100, 2026-11-24).
    res = tl.zeros((BN, BM), dt)
    if RES:
        on = pid_n * BN + tl.arange(0, BN)
        res = tl.load(r_ptr + rm[None, :] * stride_ym + on[:, None], mask=(on[:, None] < N) & (rm[None, :] < M),
                      other=0.0)
    st_a = tl.zeros((NB, BM), tl.float32)
    st_m2 = st_a
    if NORM:
        st_a, st_m2 = row_stats_load(st_ptr, n_bands, M, rm, RMS, NB)
    if XQ:
        acc = tl.zeros((BN, BM), tl.int32)
    else:
        acc = tl.zeros((BN, BM), tl.float32)
    # Only the MMA operands go through the shared-memory pipeline, so the scales are loaded
    # by hand one step ahead into registers, where their latency hides behind a step's MMAs
    # (7B W8A16 GEMVs 1-3% faster, H100), and pulled into L2 two steps ahead.
    s_next = tl.zeros((BN,), tl.float32)
    if BITS != 16 and U == 1 and not XQ and BK <= GROUP:
        s_next = tl.load(s_ptrs + (tl.minimum(i0, tiles - 1) * BK // GROUP) * stride_sg)
    s_step = s_next
    # LOOP_STAGES (one row of x, long streams; see ROW_TILES): Triton pipelines this loop's
    # loads through shared memory. Without a dot in the loop it would not, and MMA tiles
    # take the launch's num_stages instead.
    for i in tl.range(i0, i1, num_stages=LOOP_STAGES if LOOP_STAGES > 0 else None):
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
            if U == 1 and BK <= GROUP:
                s_next = tl.load(s_ptrs + (tl.minimum(i + 1, tiles - 1) * BK // GROUP) * stride_sg)
        for j in tl.static_range(U):
            t = i * U + j
            ok = (tl.zeros((1, 1), tl.int32) + t) < tiles  # a short last step: its missing tiles load as zeros
            q = tl.load(w_ptrs + t * KB, mask=ok, other=0)
            x = tl.load(x_ptrs + t * BK, mask=(rm[:, None] < M) & ok, other=0.0)
            if BM == 1:  # one row of x: multiply-add on the CUDA cores (see above)
                if BITS != 16 and not XQ and BK > GROUP:  # a tile of several groups: [BN, groups] scales
                    s_row = tl.load(s_ptrs[:, None] + (t * (BK // GROUP) + tl.arange(0, BK // GROUP))[None, :]
                                    * stride_sg)
                else:
                    s_row = s_step
                acc += _row_dot(q, x, s_row, ASM, A_REGS, BITS, XQ, U, GROUP)[:, None]
            elif BITS == 16:
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
    mean = tl.zeros((BM,), tl.float32)
    rstd = mean
    if NORM:
        mean, rstd = row_stats_of(st_a, st_m2, n_bands, band, K, M, eps, rm, RMS, NB)
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
            out = _normed(_scaled(total, xs_ptr, s_ptr, rn, rm, M, XQ), mean, rstd, c_ptr, rn, NORM, RMS)
            out = _across(out, pid_n, rm, M, xb_ptr, xc_ptr, XCHG, XRANK, XW, XREGION)
            _epilogue(out, b_ptr, y_ptr, pid_n, rn, rm, M, N, stride_ym, HAS_BIAS, ACT, GATED, BN, BM, res, st_ptr,
                      RES, RMS)
            tl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next launch
    else:
        out = _normed(_scaled(acc, xs_ptr, s_ptr, rn, rm, M, XQ), mean, rstd, c_ptr, rn, NORM, RMS)
        out = _across(out, pid_n, rm, M, xb_ptr, xc_ptr, XCHG, XRANK, XW, XREGION)
        _epilogue(out, b_ptr, y_ptr, pid_n, rn, rm, M, N, stride_ym, HAS_BIAS, ACT, GATED, BN, BM, res, st_ptr,
                  RES, RMS)


# The same kernel for launches that exchange (XCHG), compiled apart: it waits on its peers,
# so the engine's precompile passes must skip it on every rank (mii/engine/precompile.py).
_skinny_exchange_kernel = triton.jit(_skinny_kernel.fn, do_not_specialize=RUNTIME_ARGS)
