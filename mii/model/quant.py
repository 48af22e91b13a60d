"""ZeroQuant-style weight quantization: the modes, their group sizes, and quantizing one
weight to the integers and scales the kernels read (and back). The runtime module holding
them is :class:`mii.model.quant_linear.QuantLinear`; the module swap that puts it in a
model is in ``mii/model/quant_swap.py``.

Modes (all symmetric, no zero points):
- ``w8a16``: int8 weights, one fp32 scale per ``group_size`` inputs of each output row
  (scale = max|w| / 127 over the group); activations stay fp16/bf16.
- ``w4a16``: int4 weights in -7..7 (scale = max|w| / 7; -8 is never produced, so the
  grid is symmetric around zero), two per byte along the input dim; group scales as above.
- ``w8a8``: int8 weights with one fp32 scale per output channel, and int8 activations
  quantized per token at run time (``kernels/quant_act.py``); ``group_size`` is unused.

Quantization runs on each tensor-parallel shard's own weight, after slicing, so it
composes with TP: a row-parallel shard's groups never straddle two ranks.

Group size: ``quantize_model`` uses the requested size (default 128) wherever it divides
a layer's inputs, and otherwise the largest power of two >= 32 that does (SmolLM2's
hidden size 576 = 9 * 64 gets groups of 64); a layer with no such divisor is a ValueError.
"""
from __future__ import annotations

import torch

from kernels.quant_gemm import dequantize_ref, pack_int4

MODES = ("w8a16", "w4a16", "w8a8")
DEFAULT_GROUP_SIZE = 128
MIN_GROUP_SIZE = 32  # the kernels' smallest K tile: tl.dot needs 16 per operand, int4 halves it
_QMAX = {"w8a16": 127, "w4a16": 7, "w8a8": 127}


def check_quant_args(mode: str, group_size: int) -> None:
    """ValueError naming the value for an unknown mode or a group size that is not a
    power of two >= 32 (w8a8 ignores the group size)."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; known: {MODES}")
    if mode != "w8a8" and (not isinstance(group_size, int) or group_size < MIN_GROUP_SIZE
                           or group_size & (group_size - 1)):
        raise ValueError(f"group_size={group_size!r} must be a power of two >= {MIN_GROUP_SIZE}")


def _check_fits(in_features: int, mode: str, group_size: int, what: str) -> None:
    if mode != "w8a8" and in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features} of {what}; "
                         f"pick a power of two that divides it")


def group_size_for(in_features: int, mode: str, group_size: int, what: str = "a layer") -> int:
    """The group size a layer with ``in_features`` inputs gets: ``group_size`` where it divides
    them, else the largest power of two >= 32 that does (see the module docstring)."""
    if mode == "w8a8" or in_features % group_size == 0:
        return group_size
    fallback = in_features & -in_features  # the largest power of two dividing in_features
    if fallback < MIN_GROUP_SIZE:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features} of {what}, "
                         f"and no power of two >= {MIN_GROUP_SIZE} does")
    return fallback


def quantize_weight(w: torch.Tensor, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """Quantize w [out, in] to the tensors a :class:`QuantLinear` stores: ``qweight`` and ``scales``.

    Each element's error is at most scale / 2 (round to nearest, nothing clipped, since
    the scale maps the group's max magnitude exactly onto the largest integer).
    """
    check_quant_args(mode, group_size)
    _check_fits(w.shape[1], mode, group_size, "the weight")
    qmax = _QMAX[mode]
    wf = w.detach().float()
    g = w.shape[1] if mode == "w8a8" else group_size
    groups = wf.reshape(w.shape[0], -1, g)
    scales = groups.abs().amax(-1).clamp(min=1e-10) / qmax  # [out, in/g]; an all-zero group gets q = 0
    q = torch.round(groups / scales[..., None]).clamp(-qmax, qmax).reshape(w.shape).to(torch.int8)
    if mode == "w4a16":
        return {"qweight": pack_int4(q), "scales": scales}
    if mode == "w8a8":
        return {"qweight": q, "scales": scales[:, 0].contiguous()}
    return {"qweight": q, "scales": scales}


def dequantize_weight(tensors: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    """The float32 weight [out, in] that :func:`quantize_weight`'s tensors stand for."""
    check_quant_args(mode, DEFAULT_GROUP_SIZE)
    scales = tensors["scales"]
    return dequantize_ref(tensors["qweight"], scales[:, None] if scales.dim() == 1 else scales,
                          4 if mode == "w4a16" else 8)
