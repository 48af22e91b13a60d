"""W8A8 GEMM: int8 activations x int8 weights on the integer tensor cores.

y[m, n] = (sum_k xq[m, k] * wq[n, k]) * x_scale[m] * w_scale[n] (+ bias[n])

The sum runs exactly in int32 (|sum| <= 127 * 127 * K stays below 2^31 for K < 133k);
the per-token x per-output-channel scales and the bias are applied once, in the
fp32 epilogue, so the output is the only float tensor written. ``xq``/``x_scale`` come
from ``kernels/quant_act.py`` (fused into the preceding norm, or standalone).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .activation import split_kind
from .quant_gemm import tile_ids
from .skinny_gemm import SKINNY_M, _num_sms, skinny_config, skinny_gemm


def w8a8_gemm_ref(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """xq [..., K] int8, x_scale [...] fp32, wq [N, K] int8, w_scale [N] fp32 -> [..., N] out_dtype."""
    # float64 holds every int8 x int8 dot product exactly (|sum| < 2**53), on CPU and CUDA alike
    acc = (xq.reshape(-1, xq.shape[-1]).double() @ wq.double().t()).float()
    y = acc * x_scale.reshape(-1, 1).float() * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*xq.shape[:-1], wq.shape[0])


@triton.jit
def _w8a8_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = (pid_m * BM + tl.arange(0, BM)) % M
    rn = (pid_n * BN + tl.arange(0, BN)) % N
    rk = tl.arange(0, BK)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None]  # [BK, BN] view of [N, K]
    acc = tl.zeros((BM, BN), tl.int32)
    for k0 in range(0, K, BK):
        kmask = rk < K - k0  # ragged K: zeros add nothing to the integer sum
        x = tl.load(x_ptrs, mask=kmask[None, :], other=0)
        w = tl.load(w_ptrs, mask=kmask[:, None], other=0)
        acc = tl.dot(x, w, acc, out_dtype=tl.int32)  # triton 3.6 defaults out_dtype to fp32
        x_ptrs += BK
        w_ptrs += BK
    _epilogue(acc, xs_ptr, ws_ptr, b_ptr, y_ptr, pid_m, pid_n, M, N, stride_ym, HAS_BIAS, BM, BN)


@triton.jit
def _epilogue(acc, xs_ptr, ws_ptr, b_ptr, y_ptr, pid_m, pid_n, M, N, stride_ym,
              HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Per-token x per-channel scales and the bias, in fp32, then the one float store."""
    om = pid_m * BM + tl.arange(0, BM)
    on = pid_n * BN + tl.arange(0, BN)
    xs = tl.load(xs_ptr + om, mask=om < M, other=0.0)
    ws = tl.load(ws_ptr + on, mask=on < N, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + on, mask=on < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + om[:, None] * stride_ym + on[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(om[:, None] < M) & (on[None, :] < N))


@triton.jit
def _w8a8_tma_kernel(x_desc, xs_ptr, w_desc, ws_ptr, b_ptr, y_ptr, M, N, K, stride_ym,
                     HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """The same product with both operands fetched by the Hopper TMA engine: one
    descriptor load per tile instead of per-thread address math, and the hardware
    zero-fills the ragged edges, so the loop needs no masks."""
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    acc = tl.zeros((BM, BN), tl.int32)
    for k0 in range(0, K, BK):
        x = x_desc.load([pid_m * BM, k0])
        w = w_desc.load([pid_n * BN, k0])
        acc = tl.dot(x, w.T, acc, out_dtype=tl.int32)
    _epilogue(acc, xs_ptr, ws_ptr, b_ptr, y_ptr, pid_m, pid_n, M, N, stride_ym, HAS_BIAS, BM, BN)


# Decode tiles for int8 x int8 (``kernels/skinny_gemm.py``): wgmma on 4 warps, about 2
# programs per SM (the fp16 weights' tiles were these until 2026-11-23). On an H100
# (2026-11-23, 7B shapes, M = 1) they gave qkv 22.0, o 9.5, gate_up 33.6, down 19.5 us
# (78/60/91/78% of copy bandwidth; W8A16 23.8, 11.6, 39.0, 23.1 in the same run). In a sweep
# over 6 tiles and 3 splits (``benchmarks.gemv --sweep --sweep-bits 8x8``) only qkv had a
# clearly faster one: 20.1 us with 32-row bands on one warp. Released 3 steps before their
# stream ends (skinny_config's ``release``; its gain was measured while the split-K counters
# were broken). The fp16 weights' deeper one-wave tiles (``FLOAT_TILES``) were not tried here.
DECODE_TILES = dict(num_warps=4, waves=2, A_REGS=False, release=3)


def decode_bk(K: int) -> int:
    """The skinny kernel's K tile for W8A8 decode: it has no ragged-K path, and the int8 MMA
    takes K in steps of 32. 0: K is no multiple of 32 (the tiled kernel takes it)."""
    return next((bk for bk in (128, 64, 32) if K % bk == 0), 0)


def default_config(M: int, N: int, K: int, sms: int = 132) -> dict:
    """Tiles by M; int8 MMA wants BK >= 32, and 128 keeps the loop short on Hopper.

    Up to 16 rows (decode) the weight-streaming kernel of ``kernels/skinny_gemm.py`` takes it
    ("kind": "skinny"), split along K to fill the ``sms`` SMs: with one program per 64 output
    channels, the tiled kernel left most SMs idle on the 7B shapes and W8A8 decode was
    slower than fp16 (4.09 against 3.66 ms a step on an H200, 2026-11-23).
    From 256 rows (prefill) the tiles are the fastest of a sweep over the 7B shapes on an
    H100 (``python -m benchmarks.w8a8_sweep --sweep``): 256x128x128 with TMA loads came
    within 4.4% of each shape's best and reached 1.56-1.71x fp16 cuBLAS, where the pointer
    kernel at 128x128x128 with 4 stages reached 1.04-1.15x. TMA=None means "where the
    hardware has it" (see :func:`_use_tma`).
    """
    if M <= SKINNY_M and decode_bk(K):
        return skinny_config(N, K, decode_bk(K), sms, **DECODE_TILES)
    if M <= 16:
        return dict(BM=16, BN=64, BK=128, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BM=64, BN=128, BK=128, GROUP_M=8, num_warps=4, num_stages=4)
    if M < 256:
        return dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=4, num_stages=3, TMA=None)
    return dict(BM=256, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=4, TMA=None)


def _use_tma(x2: torch.Tensor, wq: torch.Tensor) -> bool:
    """TMA needs Hopper or newer and 16-byte aligned rows and bases (int8: K % 16 == 0)."""
    if not x2.is_cuda or torch.cuda.get_device_capability(x2.device)[0] < 9:
        return False
    return all(t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (x2, wq))


def w8a8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, config: dict | None = None,
              act: str | None = None) -> torch.Tensor:
    """Triton version of :func:`w8a8_gemm_ref`; ``w_scale`` is fp32 and contiguous,
    ``config`` overrides :func:`default_config`. ``act`` (decode sizes only): the result
    goes through ``kernels.activation.bias_act(y, bias, act)`` in the same kernel."""
    K, N = xq.shape[-1], wq.shape[0]
    if wq.shape[1] != K:
        raise ValueError(f"xq has K={K} but wq is {tuple(wq.shape)}")
    x2 = xq.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    n_out = N // 2 if act is not None and split_kind(act)[1] else N
    y = torch.empty((M, n_out), device=xq.device, dtype=out_dtype)
    cfg = dict(config or default_config(M, N, K, _num_sms(xq.device)))
    skinny = cfg.pop("kind", None) == "skinny"
    if act is not None and not skinny:
        raise ValueError(f"an activation rides only in the decode kernel (<= {SKINNY_M} rows, K a multiple "
                         f"of 32), got {M} rows and K={K}")
    if M:
        xs = x_scale.reshape(-1).float().contiguous()
        if skinny:
            skinny_gemm(x2, wq, w_scale, bias, y, 8, K, cfg, act=act, x_scale=xs)
        else:
            _tiled(x2, xs, wq, w_scale, bias, y, cfg)
    return y.reshape(*xq.shape[:-1], n_out)


def _tiled(x2, xs, wq, w_scale, bias, y, cfg: dict) -> None:
    """The M x N tiled kernels (prefill, and K no multiple of 32)."""
    M, K, N = x2.shape[0], x2.shape[1], wq.shape[0]
    tma = cfg.pop("TMA", False)
    if tma is None:
        tma = _use_tma(x2, wq)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    b = bias if bias is not None else w_scale  # dummy pointer, never read
    if tma:
        xd = TensorDescriptor.from_tensor(x2, [cfg["BM"], cfg["BK"]])
        wd = TensorDescriptor.from_tensor(wq, [cfg["BN"], cfg["BK"]])
        _w8a8_tma_kernel[grid](xd, xs, wd, w_scale, b, y, M, N, K, N, HAS_BIAS=bias is not None, **cfg)
    else:
        _w8a8_kernel[grid](x2, xs, wq, w_scale, b, y, M, N, K, x2.stride(0), wq.stride(0), N,
                           HAS_BIAS=bias is not None, **cfg)
