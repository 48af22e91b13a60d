"""Weight-only quantized GEMM (W8A16, W4A16): y = x W^T (+ b) with W held as integers.

Storage (see ``mii/model/quant.py``): ``qweight`` [N, K] int8, or [N, K/2] uint8 with two
INT4 values per byte (element 2j in the low nibble, 2j+1 in the high one, each stored
as q + 8); ``scales`` [N, K/group] float32, symmetric, so W[n, k] = q[n, k] * scales[n, k // group].

The integers never become a float weight in memory: each tile is dequantized in
registers. Two kernels share that storage:
- ``_gemv_kernel`` for M == 1 (batch-1 decode): no tensor cores, each program streams
  a band of weight rows once; split-K adds programs when N alone cannot fill the GPU.
- ``_gemm_kernel`` for M > 1: ``tl.dot`` tiles; with M <= 16 it runs BM=16 tiles and
  split-K, the decode-batch shape, which is also bound by weight bandwidth.
In both, int8/int4 values are exact in fp16/bf16, so each group's partial product is
taken on the raw integers and scaled once in fp32: fewer multiplies than scaling the
weight tile, and no rounding of q * scale to 16 bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] int8 in -8..7 (low nibble first)."""
    p = packed.to(torch.int16)
    return torch.stack(((p & 15) - 8, (p >> 4) - 8), dim=-1).flatten(-2).to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in -8..7 -> [N, K/2] uint8 (low nibble first); K must be even."""
    u = (q.to(torch.int16) + 8).reshape(*q.shape[:-1], q.shape[-1] // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).to(torch.uint8)


def dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 weight [N, K] that (qweight, scales) stand for."""
    q = qweight if bits == 8 else unpack_int4(qweight)
    group = q.shape[1] // scales.shape[1]
    return q.float() * scales.float().repeat_interleave(group, dim=1)


def wxa16_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    """x [..., K] @ dequant(W)^T + bias, in float32, rounded once to x's dtype."""
    y = x.float() @ dequantize_ref(qweight, scales, bits).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def w8a16_gemm_ref(x, qweight, scales, bias=None):
    return wxa16_gemm_ref(x, qweight, scales, bias, 8)


def w4a16_gemm_ref(x, qweight, scales, bias=None):
    return wxa16_gemm_ref(x, qweight, scales, bias, 4)


@triton.jit
def _int4_pair(p):
    """uint8 tile -> (low, high) nibbles as signed int32 in -8..7."""
    p = p.to(tl.int32)
    return (p & 15) - 8, (p >> 4) - 8


@triton.jit
def tile_ids(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row-blocks share each weight column-block
    while it is in L2. Shared with ``kernels/w8a8_gemm.py``."""
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_wn, stride_sn, stride_ys,
                 GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr):
    # One x row; program (n-band, k-split). Weight rows are read along K, contiguous.
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = (pid_n * BN + tl.arange(0, BN)) % N  # wrapped rows keep loads unmasked
    tiles = K // BK
    per = tl.cdiv(tiles, SPLIT_K)
    t0 = pid_k * per
    t1 = tl.minimum(t0 + per, tiles)
    if BITS == 8:
        rk = tl.arange(0, BK)
        acc = tl.zeros((BN, BK), tl.float32)
    else:
        rk = tl.arange(0, BK // 2)
        acc = tl.zeros((BN, BK // 2), tl.float32)
    for t in range(t0, t1):
        k0 = t * BK
        s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP)[:, None]
        if BITS == 8:
            xk = tl.load(x_ptr + k0 + rk).to(tl.float32)
            q = tl.load(w_ptr + rn[:, None] * stride_wn + k0 + rk[None, :])
            acc += q.to(tl.float32) * s * xk[None, :]
        else:
            xe = tl.load(x_ptr + k0 + 2 * rk).to(tl.float32)
            xo = tl.load(x_ptr + k0 + 2 * rk + 1).to(tl.float32)
            lo, hi = _int4_pair(tl.load(w_ptr + rn[:, None] * stride_wn + k0 // 2 + rk[None, :]))
            acc += (lo.to(tl.float32) * xe[None, :] + hi.to(tl.float32) * xo[None, :]) * s
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(b_ptr + rn).to(tl.float32)
    out = pid_n * BN + tl.arange(0, BN)
    tl.store(y_ptr + pid_k * stride_ys + out, y.to(y_ptr.dtype.element_ty), mask=out < N)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                 stride_xm, stride_wn, stride_sn, stride_ym, stride_ys,
                 GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    pid_k = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)) % M
    rn = (pid_n * BN + tl.arange(0, BN)) % N
    tiles = K // BK  # BK divides the group, the group divides K
    per = tl.cdiv(tiles, SPLIT_K)
    t0 = pid_k * per
    t1 = tl.minimum(t0 + per, tiles)
    acc = tl.zeros((BM, BN), tl.float32)
    for t in range(t0, t1):
        k0 = t * BK
        if BITS == 8:
            rk = tl.arange(0, BK)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + rk[None, :])
            q = tl.load(w_ptr + rn[None, :] * stride_wn + k0 + rk[:, None])  # [BK, BN]
            part = tl.dot(x, q.to(x.dtype))
        else:
            rk = tl.arange(0, BK // 2)
            xe = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + 2 * rk[None, :])
            xo = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + 2 * rk[None, :] + 1)
            lo, hi = _int4_pair(tl.load(w_ptr + rn[None, :] * stride_wn + k0 // 2 + rk[:, None]))
            part = tl.dot(xe, lo.to(xe.dtype)) + tl.dot(xo, hi.to(xo.dtype))
        s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP)
        acc += part * s[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    om = pid_m * BM + tl.arange(0, BM)
    on = pid_n * BN + tl.arange(0, BN)
    ptr = y_ptr + pid_k * stride_ys + om[:, None] * stride_ym + on[None, :]
    tl.store(ptr, acc.to(y_ptr.dtype.element_ty), mask=(om[:, None] < M) & (on[None, :] < N))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: keep grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_k(programs: int, tiles: int, target: int) -> int:
    """Double the K-splits until ``target`` programs run, keeping >= 4 K-tiles per split."""
    split = 1
    while programs * split < target and tiles // (split * 2) >= 4:
        split *= 2
    return split


def default_config(M: int, N: int, K: int, group: int, bits: int, device: torch.device) -> dict:
    """Launch parameters by shape. M == 1: GEMV; M <= 16: BM=16 tiles; else GEMM tiles.

    The M <= 16 choices are the fastest of a sweep on an H100 (2026-11-22, triton 3.6) at
    N, K in {4096, 11008}: split-K pays only when N alone gives under a wave of programs.
    """
    sms = _num_sms(device)
    if M == 1:
        bn, bk = 16, min(group, 128)
        return dict(kind="gemv", BN=bn, BK=bk, SPLIT_K=_split_k(triton.cdiv(N, bn), K // bk, 4 * sms),
                    num_warps=4, num_stages=2)
    if M <= 16:
        bn, bk = 32, min(group, 128)
        return dict(kind="gemm", BM=16, BN=bn, BK=bk, GROUP_M=1, SPLIT_K=_split_k(triton.cdiv(N, bn), K // bk, sms),
                    num_warps=4, num_stages=5 if bits == 8 else 3)
    bm = 64 if M <= 64 else 128
    return dict(kind="gemm", BM=bm, BN=128, BK=min(group, 64), GROUP_M=8, SPLIT_K=1,
                num_warps=4 if bm == 64 else 8, num_stages=4)


def wxa16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
               bits: int, config: dict | None = None) -> torch.Tensor:
    """Triton y = x @ dequant(W)^T + bias for x [..., K] in fp16/bf16 (fp32 works, as tf32 on GPU).

    ``bits`` is 8 or 4; ``config`` overrides :func:`default_config` (benchmarks sweep it).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    K = x.shape[-1]
    N = qweight.shape[0]
    if qweight.shape[1] * (8 // bits) != K:
        raise ValueError(f"x has K={K} but qweight {tuple(qweight.shape)} holds {qweight.shape[1] * (8 // bits)}")
    group = K // scales.shape[1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    cfg = dict(config or default_config(M, N, K, group, bits, x.device))
    kind, split = cfg.pop("kind"), cfg["SPLIT_K"]
    if group % cfg["BK"]:
        raise ValueError(f"block K={cfg['BK']} must divide group size {group}")
    out_dtype = x.dtype if split == 1 else torch.float32
    y = torch.empty((split, M, N), device=x.device, dtype=out_dtype)
    b = bias if bias is not None else scales  # dummy pointer, never read
    common = dict(GROUP=group, BITS=bits, HAS_BIAS=bias is not None)
    if M == 0:
        pass
    elif kind == "gemv":
        if M != 1:
            raise ValueError(f"the GEMV path takes one row, got M={M}")
        _gemv_kernel[(triton.cdiv(N, cfg["BN"]), split)](
            x2, qweight, scales, b, y, N, K, qweight.stride(0), scales.stride(0), M * N, **common, **cfg)
    else:
        grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]), split)
        _gemm_kernel[grid](x2, qweight, scales, b, y, M, N, K, x2.stride(0), qweight.stride(0),
                           scales.stride(0), N, M * N, **common, **cfg)
    y = y[0] if split == 1 else y.sum(0).to(x.dtype)
    return y.reshape(*x.shape[:-1], N)


def w8a16_gemm(x, qweight, scales, bias=None, config=None):
    return wxa16_gemm(x, qweight, scales, bias, 8, config)


def w4a16_gemm(x, qweight, scales, bias=None, config=None):
    return wxa16_gemm(x, qweight, scales, bias, 4, config)
