"""Weight-only quantized GEMM (W8A16, W4A16): y = x W^T (+ b) with W held as integers.

Storage (see ``mii/model/quant.py``): ``qweight`` [N, K] int8, or [N, K/2] uint8 with two
INT4 values per byte (element 2j in the low nibble, 2j+1 in the high one, each stored
as q + 8); ``scales`` [N, K/group] float32, symmetric, so W[n, k] = q[n, k] * scales[n, k // group].

The integers never become a float weight in memory: each tile is dequantized in
registers (exactly: int8/int4 values are exact in fp16/bf16, see ``kernels/dequant.py``),
its partial product over one scale group taken on the raw integers by the tensor cores,
and scaled once in fp32. ``scales`` may be strided: ``QuantLinear`` keeps each group's
scales contiguous. Three paths by rows of x:
- M <= 16 (decode): the weight-streaming kernel of ``kernels/skinny_gemm.py`` (one row of
  x against int8 weights on the CUDA cores, ``ROW_TILES``; more rows on the MMA);
- M > 16 (prefill chunks): ``_gemm_kernel``, plain ``tl.dot`` tiles;
- M >= DEQUANT_MIN_M: the weight dequantized once and cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import bias_act, split_kind
from .dequant import dequant4, dequant8
from .skinny_gemm import (ROW_TILES, SKINNY_M, RowNorm, _num_sms, _rows2, _smem, residual_stats, skinny_config,
                          skinny_gemm)


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


DEQUANT_MIN_M = 1024  # rows from which wxa16_gemm dequantizes and calls cuBLAS


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in ``dtype`` (one rounding of q * scale), group by group."""
    q = qweight if bits == 8 else unpack_int4(qweight)
    N, K = q.shape
    G = scales.shape[1]
    return (q.view(N, G, K // G).to(dtype) * scales.to(dtype)[:, :, None]).view(N, K)


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
def tile_ids(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row-blocks share each weight column-block
    while it is in L2. Shared with ``kernels/w8a8_gemm.py``."""
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_sg, stride_ym,
                 GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = (pid_m * BM + tl.arange(0, BM)) % M
    rn = (pid_n * BN + tl.arange(0, BN)) % N
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):  # BK divides the group, the group divides K
        if BITS == 8:
            rk = tl.arange(0, BK)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + rk[None, :])
            q = tl.load(w_ptr + rn[None, :] * stride_wn + k0 + rk[:, None])  # [BK, BN]
            part = tl.dot(x, dequant8(q, x.dtype, ASM, False))
        else:
            rk = tl.arange(0, BK // 2)
            xe = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + 2 * rk[None, :])
            xo = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + 2 * rk[None, :] + 1)
            p = tl.load(w_ptr + rn[None, :] * stride_wn + k0 // 2 + rk[:, None]).to(tl.uint8, bitcast=True)
            lo, hi = dequant4(p, xe.dtype, ASM, False)
            part = tl.dot(xe, lo) + tl.dot(xo, hi)
        s = tl.load(s_ptr + rn * stride_sn + (k0 // GROUP) * stride_sg)
        acc += part * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    om = pid_m * BM + tl.arange(0, BM)
    on = pid_n * BN + tl.arange(0, BN)
    ptr = y_ptr + om[:, None] * stride_ym + on[None, :]
    tl.store(ptr, acc.to(y_ptr.dtype.element_ty), mask=(om[:, None] < M) & (on[None, :] < N))


def default_config(M: int, N: int, K: int, group: int, bits: int, device: torch.device) -> dict:
    """Launch parameters by shape: the weight-streaming kernel for M <= 16, GEMM tiles above."""
    if M == 1 and bits == 8:
        return skinny_config(N, K, group, _num_sms(device), **ROW_TILES, bits=bits, smem=_smem(device))
    if M <= SKINNY_M:
        # Tried for W8A16 and not kept: the fp16 tiles' split rule (at most 2 programs per SM,
        # 8 tiles each). Each 7B GEMV got faster back to back in one CUDA graph (H100,
        # 2026-11-23, M = 1, us: qkv 24.2 -> 22.7, o 12.5 -> 10.9, gate_up 39.5 -> 36.6, down
        # 23.6 -> 22.7), but on one machine the 7B W8A16 bs=1 step took 3.62 ms with it and
        # 3.43 ms without. Not yet explained.
        return skinny_config(N, K, group, _num_sms(device), bits=bits)
    bm = 64 if M <= 64 else 128
    return dict(kind="gemm", BM=bm, BN=128, BK=min(group, 64), GROUP_M=8, num_warps=4 if bm == 64 else 8,
                num_stages=4)


def wxa16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
               bits: int, config: dict | None = None, act: str | None = None,
               residual: torch.Tensor | None = None, rms: bool = True, norm: RowNorm | None = None,
               release_first: bool = False):
    """Triton y = x @ dequant(W)^T + bias for x [..., K] in fp16/bf16 (fp32 works, as tf32 on GPU).

    ``bits`` is 8 or 4; ``config`` overrides :func:`default_config` (benchmarks sweep it).
    ``act``: y = bias_act(x @ dequant(W)^T, bias, act), in the decode kernel's epilogue where
    it runs (N / 2 columns for a gated kind). ``residual``, ``rms`` and ``norm``: a norm folded
    into the decode kernel, as ``kernels.skinny_gemm.skinny_linear`` takes them (decode only).
    ``release_first``: see ``kernels.skinny_gemm.skinny_gemm`` (decode only).
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
    fold = residual is not None or norm is not None
    if fold and (M > SKINNY_M or config is not None and config["kind"] != "skinny"):
        raise ValueError(f"a folded norm runs in the decode kernel only (at most {SKINNY_M} rows), got M={M}")
    if act is not None and (M > SKINNY_M or config is not None and config["kind"] != "skinny"):
        return bias_act(wxa16_gemm(x, qweight, scales, None, bits, config), bias, act)  # no epilogue there
    if M >= DEQUANT_MIN_M and not fold and config is None and x.is_cuda and x.dtype != torch.float32:
        # Prefill: the fused kernel ran a 4,096-token 7B prefill at 0.43x fp16 (H100,
        # 2026-11-22). Dequantizing the weight once for the step and calling cuBLAS costs
        # one extra pass over the weight, small against M rows of matmul.
        w = dequantize(qweight, scales, bits, x.dtype)
        return torch.nn.functional.linear(x2, w, bias).reshape(*x.shape[:-1], N)
    cfg = dict(config or default_config(M, N, K, group, bits, x.device))
    kind = cfg.pop("kind")
    if group % cfg["BK"] and not (cfg["BM"] == 1 and cfg["BK"] % group == 0):
        raise ValueError(f"block K={cfg['BK']} must divide group size {group} (or, one row at a time, be a "
                         f"multiple of it)")
    n_out = N // 2 if act is not None and split_kind(act)[1] else N
    y = torch.empty((M, n_out), device=x.device, dtype=x.dtype)
    stats = residual_stats(y, cfg) if residual is not None else None
    if M == 0:
        pass
    elif kind == "skinny":
        skinny_gemm(x2, qweight, scales, bias, y, bits, group, cfg, act, residual=_rows2(residual, N), stats=stats,
                    rms=rms, norm=norm, release_first=release_first)
    else:
        grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
        _gemm_kernel[grid](x2, qweight, scales, bias if bias is not None else scales, y, M, N, K, x2.stride(0),
                           qweight.stride(0), scales.stride(0), scales.stride(1), N, GROUP=group, BITS=bits,
                           HAS_BIAS=bias is not None, ASM=x.is_cuda, **cfg)
    y = y.reshape(*x.shape[:-1], n_out)
    return y if residual is None else (y, stats, cfg["BN"])


def w8a16_gemm(x, qweight, scales, bias=None, config=None):
    return wxa16_gemm(x, qweight, scales, bias, 8, config)


def w4a16_gemm(x, qweight, scales, bias=None, config=None):
    return wxa16_gemm(x, qweight, scales, bias, 4, config)
