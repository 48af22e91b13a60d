"""Fused residual-add + LayerNorm / RMSNorm."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import enter


@triton.jit
def norm_params(w_ptr, b_ptr, cols, mask, HAS_BIAS: tl.constexpr):
    """The norm's weight and bias as stored. Kernels load them before their PDL wait: no
    kernel of the step writes them, so their latency overlaps the kernel before."""
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    b = w
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=mask, other=0.0)
    return w, b


@triton.jit
def norm_row(h, w, b, mask, N, eps, HAS_BIAS: tl.constexpr, RMS: tl.constexpr):
    """norm(h) * w (+ b) of one row h, held in the activation dtype (the residual sum's
    rounding), with the statistics in float32: the rounding of :func:`add_norm_ref`.
    w and b as :func:`norm_params` loads them."""
    hf = h.to(tl.float32)
    w = w.to(tl.float32)
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / N + eps)
        # HF Llama rounds to the activation dtype before the weight multiply.
        y = ((hf * rstd).to(h.dtype).to(tl.float32) * w).to(h.dtype)
        if HAS_BIAS:
            y = y + b.to(h.dtype)
    else:
        mean = tl.sum(hf, 0) / N
        d = tl.where(mask, hf - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 0) / N + eps)
        y = d * rstd * w
        if HAS_BIAS:
            y = y + b.to(tl.float32)
    return y


# -- a norm folded into the decode GEMVs around it (kernels/skinny_gemm.py, mii/model/fold.py)
# The GEMV before the norm adds the residual in its epilogue and leaves, per band of its
# output columns and per row, two float32 statistics of h; the GEMVs after it, whose weights
# hold the norm's weight (and bias), stream h itself and sum the bands' statistics in a fixed
# order to scale their output rows. Stats layout: [bands, 2, M].

@triton.jit
def band_stats(h, cols_ok, RMS: tl.constexpr):
    """Statistics of a band of h^T [cols, rows] (float32), per row: RMS (sum h^2, 0); else
    (sum h, sum (h - band mean)^2), which merge stably across bands (Chan et al.)."""
    hf = tl.where(cols_ok[:, None], h, 0.0)
    if RMS:
        a = tl.sum(hf * hf, 0)
        b = tl.zeros_like(a)
    else:
        n = tl.sum(cols_ok.to(tl.float32), 0)
        a = tl.sum(hf, 0)
        d = tl.where(cols_ok[:, None], hf - a[None, :] / n, 0.0)
        b = tl.sum(d * d, 0)
    return a, b


@triton.jit
def row_stats_load(st_ptr, n_bands, M, rm, RMS: tl.constexpr, NB: tl.constexpr):
    """The bands' statistics [NB, rows] for :func:`row_stats_of` (the second is the first for RMS)."""
    b = tl.arange(0, NB)
    ok = (b[:, None] < n_bands) & (rm[None, :] < M)
    ptrs = st_ptr + b[:, None] * 2 * M + rm[None, :]
    a = tl.load(ptrs, mask=ok, other=0.0)
    m2 = a
    if not RMS:
        m2 = tl.load(ptrs + M, mask=ok, other=0.0)
    return a, m2


@triton.jit
def row_stats_of(a, m2, n_bands, band, K, M, eps, rm, RMS: tl.constexpr, NB: tl.constexpr):
    """(mean, rstd) per row rm of h [M, K] from the bands' statistics (NB >= n_bands, a
    power of two); the sums run in the same order in every program."""
    if RMS:
        var = tl.sum(a, 0) / K
        mean = var * 0.0
    else:
        b = tl.arange(0, NB)
        ok = (b[:, None] < n_bands) & (rm[None, :] < M)
        n = tl.minimum(tl.maximum(K - b * band, 0), band).to(tl.float32)[:, None]
        mean = tl.sum(a, 0) / K
        dm = tl.where(ok, a / tl.maximum(n, 1.0) - mean[None, :], 0.0)
        var = tl.sum(m2 + n * dm * dm, 0) / K
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _add_norm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, h_ptr, N, eps,
                     stride_x, stride_r, stride_y, stride_h,
                     HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w, b = norm_params(w_ptr, b_ptr, cols, mask, HAS_BIAS)
    enter(PDL)  # see kernels/pdl.py
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        # The sum is rounded to x's dtype before the statistics, as the unfused model does.
        h = h + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    y = norm_row(h, w, b, mask, N, eps, HAS_BIAS, RMS)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def norm_warps(block: int) -> int:
    """Warps for one program per row of ``block`` (power of two) columns."""
    return min(max(block // 512, 1), 16)


def add_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`add_norm_ref`: one program per row, one pass over memory."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is None:
        r2, h = x2, x
    else:
        r2 = residual.reshape(-1, N)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h2 = h.view(-1, N)
    if x2.shape[0]:
        BLOCK = triton.next_power_of_2(N)
        _add_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, weight if bias is None else bias, y, h2, N, eps,
            x2.stride(0), r2.stride(0), y.stride(0), h2.stride(0),
            HAS_RES=residual is not None, HAS_BIAS=bias is not None, RMS=rms, BLOCK=BLOCK,
            num_warps=norm_warps(BLOCK), **pdl.launch_args(x.device))
    return y.view(x.shape), h


def add_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (norm(x + residual) * weight + bias, x + residual).

    With residual None the sum is x itself. The statistics are taken in float32, as
    transformers does, and the outputs keep x's dtype.
    """
    h = x if residual is None else x + residual
    hf = h.float()
    if rms:
        y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
        y = y.to(x.dtype) * weight  # HF Llama casts before the weight multiply
    else:
        y = torch.nn.functional.layer_norm(hf, (h.shape[-1],), weight.float(),
                                           None if bias is None else bias.float(), eps).to(x.dtype)
        return y, h
    if bias is not None:
        y = y + bias
    return y, h
