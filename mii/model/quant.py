"""ZeroQuant-style weight quantization: a module swap plus one small runtime module.

Modes (all symmetric, no zero points):
- ``w8a16``: int8 weights, one fp32 scale per ``group_size`` inputs of each output row
  (scale = max|w| / 127 over the group); activations stay fp16/bf16.
- ``w4a16``: int4 weights in -7..7 (scale = max|w| / 7; -8 is never produced, so the
  grid is symmetric around zero), two per byte along the input dim; group scales as above.
- ``w8a8``: int8 weights with one fp32 scale per output channel, and int8 activations
  quantized per token at run time (``kernels/quant_act.py``); ``group_size`` is unused.

Quantization runs on each tensor-parallel shard's own weight, after slicing, so it
composes with TP: a row-parallel shard's groups never straddle two ranks.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kernels.quant_act import quant_per_token, quant_per_token_ref
from kernels.quant_gemm import dequantize_ref, pack_int4, wxa16_gemm, wxa16_gemm_ref
from kernels.w8a8_gemm import w8a8_gemm, w8a8_gemm_ref
from mii.policies.base import DEFAULT_QUANTIZABLE
from .layers import Linear, _param
from .parallel import TP, all_reduce

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


def _on_gpu(x: torch.Tensor) -> bool:
    """The one place that picks Triton (CUDA) over the plain-torch references (CPU)."""
    return x.device.type == "cuda"


class QuantLinear(nn.Module):
    """Drop-in for :class:`mii.model.layers.Linear` holding quantized weights.

    Shapes are this rank's (already tensor-parallel-sliced). ``kind`` and ``fuse_bias``
    mean what they mean on ``Linear``: a row-parallel layer all-reduces before adding
    its bias once, and ``fuse_bias=False`` leaves ``.bias`` for the caller's epilogue.
    Parameters ``qweight``, ``scales`` and ``bias`` are the checkpoint names.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, kind: str | None, fuse_bias: bool,
                 dtype: torch.dtype, mode: str, group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__()
        check_quant_args(mode, group_size)
        _check_fits(in_features, mode, group_size, "a QuantLinear")
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.fuse_bias, self.mode = kind, fuse_bias, mode
        self.group_size = in_features if mode == "w8a8" else group_size
        self.bits = 4 if mode == "w4a16" else 8
        if mode == "w4a16":
            if in_features % 2:
                raise ValueError(f"w4a16 packs two inputs per byte; in_features={in_features} is odd")
            self.qweight = _param(out_features, in_features // 2, dtype=torch.uint8)
        else:
            self.qweight = _param(out_features, in_features, dtype=torch.int8)
        if mode == "w8a8":
            self.scales = _param(out_features, dtype=torch.float32)
        else:
            self.scales = _param(out_features, in_features // group_size, dtype=torch.float32)
        self.bias = _param(out_features, dtype=dtype) if bias else None

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, kind: str | None, fuse_bias: bool,
              dtype: torch.dtype, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> QuantLinear:
        """Uninitialized storage to load a pre-quantized checkpoint into (no fp weight is made).
        Build it under ``torch.device("meta")`` and ``to_empty`` as the fp model is built."""
        return cls(in_features, out_features, bias, kind, fuse_bias, dtype, mode, group_size)

    @classmethod
    def from_linear(cls, linear: Linear, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> QuantLinear:
        """Quantize an (already sliced) float linear; ``linear.weight`` can be freed afterwards."""
        w = linear.weight
        with torch.device(w.device):
            m = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.kind,
                    linear.fuse_bias, w.dtype, mode, group_size)
        with torch.no_grad():
            for name, t in quantize_weight(w, mode, group_size).items():
                getattr(m, name).copy_(t)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def weight_loader(self, param: nn.Parameter, w: torch.Tensor, shard: str | None) -> None:
        # A quantized checkpoint holds whole fused tensors ([q;k;v], [gate;up]); re-slicing
        # those for TP > 1 would repeat each fused layer's own loader, so quantize on the fly there.
        if TP.size > 1:
            raise ValueError("pre-quantized checkpoints load at tensor_parallel=1 only; "
                             "for tensor parallelism load the fp checkpoint and quantize on the fly")
        if param.shape != w.shape:
            raise ValueError(f"quantized tensor: checkpoint shape {tuple(w.shape)} does not fit {tuple(param.shape)}")
        param.data.copy_(w)

    def _gemm_bias(self) -> torch.Tensor | None:
        return self.bias if self.fuse_bias and self.kind != "row" else None

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "row":
            y = all_reduce(y)
            if self.fuse_bias and self.bias is not None:
                y = y + self.bias  # bias once, after the sum
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "w8a8":
            xq, x_scale = (quant_per_token if _on_gpu(x) else quant_per_token_ref)(x)
            return self.forward_int8(xq, x_scale, x.dtype)
        gemm = wxa16_gemm if _on_gpu(x) else wxa16_gemm_ref
        return self._finish(gemm(x, self.qweight, self.scales, self._gemm_bias(), self.bits))

    def forward_int8(self, xq: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """w8a8 on activations already quantized per token (by ``kernels.quant_act.add_norm_quant``)."""
        if self.mode != "w8a8":
            raise ValueError(f"forward_int8 needs mode 'w8a8', this layer is {self.mode!r}")
        gemm = w8a8_gemm if _on_gpu(xq) else w8a8_gemm_ref
        return self._finish(gemm(xq, x_scale, self.qweight, self.scales, self._gemm_bias(), dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, mode={self.mode}, group={self.group_size}, "
                f"kind={self.kind}, bias={self.bias is not None}")


def _matches(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def quantize_model(model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                   quantizable: tuple[str, ...] = DEFAULT_QUANTIZABLE) -> nn.Module:
    """Swap every ``Linear`` whose dotted name ends with one of ``quantizable`` for a
    :class:`QuantLinear`, in place, and return the model.

    Every target is checked before any is swapped, so a ValueError leaves the model as it was.
    Each fp weight is dropped as soon as its layer is quantized, so peak memory grows by one layer.
    """
    check_quant_args(mode, group_size)
    targets = []
    for name, m in model.named_modules():
        if isinstance(m, Linear) and _matches(name, quantizable):
            _check_fits(m.in_features, mode, group_size, name)
            targets.append(name)
    for name in targets:  # names, not modules: nothing here keeps a float weight alive
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantLinear.from_linear(getattr(parent, attr), mode, group_size))
    return model
