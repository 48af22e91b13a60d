"""Fused bias + activation, including the gated (SwiGLU) pair."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import pdl
from .pdl import enter

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "silu_and_mul", "gelu_tanh_and_mul")


@triton.jit
def _act(x, KIND: tl.constexpr):
    """x in float32."""
    if KIND == "gelu":
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif KIND == "gelu_tanh":
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * tl.sigmoid(2.0 * u)  # 0.5 * (1 + tanh(u)) == sigmoid(2u)
    elif KIND == "relu":
        y = tl.maximum(x, 0.0)
    else:  # silu
        y = x * tl.sigmoid(x)
    return y


@triton.jit
def _bias_act_kernel(x_ptr, b_ptr, y_ptr, W, stride_x, stride_y,
                     KIND: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr = False):
    enter(PDL)  # see kernels/pdl.py
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < W  # W is the output width: half the input's when gated
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_BIAS:  # rounded to the activation dtype, as the unfused x + bias is
        g = g + tl.load(b_ptr + cols, mask=mask, other=0.0).to(g.dtype)
    y = _act(g.to(tl.float32), KIND).to(g.dtype)
    if GATED:
        u = tl.load(x_ptr + row * stride_x + W + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            u = u + tl.load(b_ptr + W + cols, mask=mask, other=0.0).to(u.dtype)
        y = y.to(tl.float32) * u.to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def split_kind(kind: str) -> tuple[str, bool]:
    """("silu", True) for "silu_and_mul": the kernel's activation and whether it is gated."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"unknown activation {kind!r}; known: {ACTIVATIONS}")
    return kind.removesuffix("_and_mul"), kind.endswith("_and_mul")


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Triton version of :func:`bias_act_ref`, one read of x and one write of the result."""
    base, gated = split_kind(kind)
    W = x.shape[-1] // 2 if gated else x.shape[-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], W), dtype=x.dtype, device=x.device)
    if y.numel():
        BLOCK = min(triton.next_power_of_2(W), 1024)
        _bias_act_kernel[(x2.shape[0], triton.cdiv(W, BLOCK))](
            x2, x2 if bias is None else bias, y, W, x2.stride(0), y.stride(0),
            KIND=base, GATED=gated, HAS_BIAS=bias is not None, BLOCK=BLOCK,
            num_warps=4, **pdl.launch_args(x.device))
    return y.view(*x.shape[:-1], W)


def bias_act_ref(x: torch.Tensor, bias: torch.Tensor | None, kind: str) -> torch.Tensor:
    """act(x + bias). The ``*_and_mul`` kinds take x = [gate | up] on the last dim and
    return act(gate) * up, half as wide."""
    if bias is not None:
        x = x + bias
    if kind.endswith("_and_mul"):
        gate, up = x.chunk(2, dim=-1)
        return bias_act_ref(gate, None, kind.removesuffix("_and_mul")) * up
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "relu":
        return F.relu(x)
    if kind == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {kind!r}; known: {ACTIVATIONS}")
