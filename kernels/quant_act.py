"""Per-token dynamic INT8 activation quantization, fused into residual-add + norm.

``add_norm_quant`` is ``kernels.norm.add_norm_ref`` whose normalized output goes
straight to int8: per row, scale = max|y| / 127 and q = round(y / scale) in -127..127
(symmetric; rounding is half-up, floor(v + 0.5), the same in kernel and reference).
The float y is never written, so a W8A8 linear after a norm reads 1 byte per element.
``quant_per_token`` is the same kernel without the norm, for linears fed by attention
or the activation (the o and down projections).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .norm import add_norm_ref
from .pdl import enter

_TINY = 1e-10  # an all-zero row gets scale 1e-10/127 and q = 0, not NaN


def quant_per_token_ref(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y [..., H] -> (q int8 [..., H], scale fp32 [...]) with y ~= q * scale[..., None]."""
    yf = y.float()
    scale = yf.abs().amax(-1).clamp(min=_TINY) / 127.0
    q = torch.floor(yf / scale[..., None] + 0.5).clamp(-127, 127).to(torch.int8)
    return q, scale


def add_norm_quant_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor | None, eps: float, rms: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, x + residual): :func:`add_norm_ref`'s output quantized per token."""
    y, h = add_norm_ref(x, residual, weight, bias, eps, rms)
    q, scale = quant_per_token_ref(y)
    return q, scale, h


@triton.jit
def _add_norm_quant_kernel(x_ptr, r_ptr, w_ptr, b_ptr, h_ptr, q_ptr, s_ptr, H, eps,
                           stride_x, stride_r, stride_h, stride_q,
                           HAS_RES: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    # One row per program. NORM: 0 none, 1 RMSNorm, 2 LayerNorm.
    enter(PDL)  # see kernels/pdl.py: W8A8 decode runs the chain of launches the float one does
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = h.dtype
    if HAS_RES:
        h = h + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)  # rounded to x's dtype, as torch
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    hf = h.to(tl.float32)
    if NORM == 1:
        inv = tl.rsqrt(tl.sum(hf * hf, axis=0) / H + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = ((hf * inv).to(dtype).to(tl.float32) * w).to(dtype)  # HF casts before the weight multiply
        if HAS_BIAS:
            y = (y.to(tl.float32) + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)).to(dtype)
    elif NORM == 2:
        mean = tl.sum(hf, axis=0) / H
        d = tl.where(mask, hf - mean, 0.0)
        inv = tl.rsqrt(tl.sum(d * d, axis=0) / H + eps)
        y = d * inv * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = y.to(dtype)
    else:
        y = h
    yf = tl.where(mask, y.to(tl.float32), 0.0)
    scale = tl.maximum(tl.max(tl.abs(yf), axis=0), 1e-10) / 127.0
    q = tl.minimum(tl.maximum(tl.floor(yf / scale + 0.5), -127.0), 127.0)
    tl.store(q_ptr + row * stride_q + cols, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
            bias: torch.Tensor | None, eps: float, norm: int):
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    q = torch.empty((T, H), device=x.device, dtype=torch.int8)
    scale = torch.empty(T, device=x.device, dtype=torch.float32)
    h = x2
    r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, H).contiguous()
        h = torch.empty_like(x2)
    if T:
        block = triton.next_power_of_2(H)
        dummy = x2
        _add_norm_quant_kernel[(T,)](
            x2, r2 if r2 is not None else dummy, weight if weight is not None else dummy,
            bias if bias is not None else dummy, h, q, scale, H, eps,
            x2.stride(0), r2.stride(0) if r2 is not None else 0, h.stride(0), q.stride(0),
            HAS_RES=r2 is not None, NORM=norm, HAS_BIAS=bias is not None, BLOCK=block,
            num_warps=min(max(block // 256, 1), 16), **pdl.launch_args(x.device))
    lead = x.shape[:-1]
    return q.reshape(*lead, H), scale.reshape(lead), h.reshape(*lead, H)


def add_norm_quant(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor | None, eps: float, rms: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of :func:`add_norm_quant_ref`: one pass over each row."""
    return _launch(x, residual, weight, bias, eps, 1 if rms else 2)


def quant_per_token(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`quant_per_token_ref`."""
    q, scale, _ = _launch(y, None, None, None, 0.0, 0)
    return q, scale
