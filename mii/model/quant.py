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

Group size: ``quantize_model`` uses the requested size (default 128) wherever it divides
a layer's inputs, and otherwise the largest power of two >= 32 that does (SmolLM2's
hidden size 576 = 9 * 64 gets groups of 64); a layer with no such divisor is a ValueError.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from kernels.quant_act import add_norm_quant, add_norm_quant_ref, quant_per_token, quant_per_token_ref
from kernels.quant_gemm import dequantize_ref, pack_int4, wxa16_gemm, wxa16_gemm_ref
from kernels.skinny_gemm import SKINNY_M
from kernels.w8a8_gemm import decode_bk, w8a8_gemm, w8a8_gemm_ref
from mii.policies.base import DEFAULT_QUANTIZABLE
from .layers import GatedUpLinear, Linear, Norm, QKVLinear, _param, decode_sized
from .parallel import TP, Partial

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


def _on_gpu(x: torch.Tensor) -> bool:
    """The one place that picks Triton (CUDA) over the plain-torch references (CPU)."""
    return x.device.type == "cuda"


class Int8Act(NamedTuple):
    """A per-token int8 activation, x ~= q * scale[..., None], standing for a ``dtype`` tensor."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def norm_quant(x: torch.Tensor, residual: torch.Tensor | None, norm: Norm) -> tuple[Int8Act, torch.Tensor]:
    """``ops.add_norm`` with the normalized output quantized per token in the same kernel
    (W8A8: the float output is never written): (int8 activation, x + residual)."""
    fn = add_norm_quant if _on_gpu(x) else add_norm_quant_ref
    q, scale, h = fn(x, residual, norm.weight, norm.bias, norm.eps, norm.rms)
    return Int8Act(q, scale, x.dtype), h


def _contiguous_state(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    for k, v in state.items():
        if k.startswith(prefix) and not v.is_contiguous():
            state[k] = v.contiguous()


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
            # [out, groups] stored group-major: the decode kernel reads one group's scales for a band
            # of rows per step, and contiguous they come in one coalesced load (W8A16 decode GEMVs
            # 3-5% faster on an H100 than with each row's scales contiguous).
            self.scales = nn.Parameter(torch.empty(in_features // group_size, out_features, dtype=torch.float32).t(),
                                       requires_grad=False)
        self.bias = _param(out_features, dtype=dtype) if bias else None
        self._register_state_dict_hook(_contiguous_state)  # checkpoints hold [out, groups] row-major
        self.shard_loader: Callable[[nn.Parameter, torch.Tensor], None] | None = None  # see weight_loader

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, kind: str | None, fuse_bias: bool,
              dtype: torch.dtype, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> QuantLinear:
        """Uninitialized storage to load a pre-quantized checkpoint into (no fp weight is made).
        Build it under ``torch.device("meta")`` and ``to_empty`` as the fp model is built."""
        return cls(in_features, out_features, bias, kind, fuse_bias, dtype, mode, group_size)

    @classmethod
    def from_linear(cls, linear: Linear, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                    tensors: dict[str, torch.Tensor] | None = None) -> QuantLinear:
        """Quantize an (already sliced) float linear; ``linear.weight`` can be freed afterwards.
        ``tensors``: ``quantize_weight``-shaped integers and scales chosen elsewhere (GPTQ)."""
        w = linear.weight
        with torch.device(w.device):
            m = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.kind,
                    linear.fuse_bias, w.dtype, mode, group_size)
        with torch.no_grad():
            for name, t in (tensors or quantize_weight(w, mode, group_size)).items():
                getattr(m, name).copy_(t)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def weight_loader(self, param: nn.Parameter, w: torch.Tensor, shard: str | None) -> None:
        # A quantized checkpoint holds whole fused tensors ([q;k;v], [gate;up]) whose rows are
        # output channels and whose columns (packed int4 pairs, scale groups) are inputs, as
        # in the fp weight: under TP the fp layer's own loader takes this rank's slice.
        if TP.size > 1:
            if self.shard_loader is None:
                raise ValueError("this quantized layer was not built to load a checkpoint under tensor parallelism")
            self.shard_loader(param, w)
            return
        if param.shape != w.shape:
            raise ValueError(f"quantized tensor: checkpoint shape {tuple(w.shape)} does not fit {tuple(param.shape)}")
        param.data.copy_(w)

    def _gemm_bias(self) -> torch.Tensor | None:
        return self.bias if self.fuse_bias and self.kind != "row" else None

    def _finish(self, y: torch.Tensor, defer: bool) -> torch.Tensor | Partial:
        if self.kind != "row":
            return y
        y = Partial(y, self.bias if self.fuse_bias else None)  # see Linear.forward
        return y if defer and TP.size > 1 else y.reduced()

    @property
    def takes_int8(self) -> bool:
        """Whether this layer wants its input as an :class:`Int8Act` (so the norm before it quantizes)."""
        return self.mode == "w8a8"

    def fuses_act(self, x: torch.Tensor | Int8Act) -> bool:
        """As on ``Linear``: decode applies the activation in its kernel's epilogue (W8A8 on
        the int8 activation its norm quantized, when the decode kernel takes its K)."""
        if self.kind == "row":
            return False
        if self.mode == "w8a8":
            return (isinstance(x, Int8Act) and x.q.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
                    and x.q.numel() <= SKINNY_M * x.q.shape[-1] and decode_bk(self.in_features) > 0)
        return isinstance(x, torch.Tensor) and decode_sized(x)

    def forward(self, x: torch.Tensor | Int8Act, act: str | None = None, defer: bool = False
                ) -> torch.Tensor | Partial:
        if act is not None:  # see Linear.forward
            if not self.fuses_act(x):
                raise ValueError(f"this {self.mode} layer cannot fuse an activation on this input")
            if self.mode == "w8a8":
                return w8a8_gemm(x.q, x.scale, self.qweight, self.scales, self.bias, x.dtype, act=act)
            return wxa16_gemm(x, self.qweight, self.scales, self.bias, self.bits, act=act)
        if isinstance(x, Int8Act):
            return self.forward_int8(*x, defer=defer)
        if self.mode == "w8a8":
            xq, x_scale = (quant_per_token if _on_gpu(x) else quant_per_token_ref)(x)
            return self.forward_int8(xq, x_scale, x.dtype, defer)
        gemm = wxa16_gemm if _on_gpu(x) else wxa16_gemm_ref
        return self._finish(gemm(x, self.qweight, self.scales, self._gemm_bias(), self.bits), defer)

    def forward_int8(self, xq: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype, defer: bool = False
                     ) -> torch.Tensor | Partial:
        """w8a8 on activations already quantized per token (by ``kernels.quant_act.add_norm_quant``)."""
        if self.mode != "w8a8":
            raise ValueError(f"forward_int8 needs mode 'w8a8', this layer is {self.mode!r}")
        gemm = w8a8_gemm if _on_gpu(xq) else w8a8_gemm_ref
        return self._finish(gemm(xq, x_scale, self.qweight, self.scales, self._gemm_bias(), dtype), defer)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, mode={self.mode}, group={self.group_size}, "
                f"kind={self.kind}, bias={self.bias is not None}")


def _matches(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _swap_linears(model: nn.Module, mode: str, group_size: int, quantizable: tuple[str, ...], make,
                  show_progress: bool, whole: bool = False) -> nn.Module:
    """Replace each quantizable ``Linear`` by ``make(linear, group)``; every target is checked
    (and its group size chosen) before any is swapped, so a ValueError leaves the model as it was.
    ``whole``: choose groups by the whole layer's inputs, not this rank's (row-parallel layers)."""
    check_quant_args(mode, group_size)

    def inputs(m: Linear) -> int:
        return m.in_features * (TP.size if whole and m.kind == "row" else 1)

    targets = [(name, group_size_for(inputs(m), mode, group_size, name))
               for name, m in model.named_modules() if isinstance(m, Linear) and _matches(name, quantizable)]
    # names, not modules: nothing here keeps a float weight alive once its layer is swapped
    for name, group in tqdm(targets, desc=f"Quantizing ({mode})", unit="layer", disable=not show_progress):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, make(getattr(parent, attr), group))
    return model


def quantize_model(model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                   quantizable: tuple[str, ...] = DEFAULT_QUANTIZABLE, show_progress: bool = False,
                   weights: Callable[[Linear, int], dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """Swap every ``Linear`` whose dotted name ends with one of ``quantizable`` for a
    :class:`QuantLinear`, in place, and return the model.

    ``weights(linear, group)`` picks the integers and scales (default: round to nearest,
    :func:`quantize_weight`; GPTQ passes its own). Each fp weight is dropped as soon as its
    layer is quantized, so peak memory grows by one layer.
    """
    def make(lin: Linear, group: int) -> QuantLinear:
        return QuantLinear.from_linear(lin, mode, group, None if weights is None else weights(lin, group))
    return _swap_linears(model, mode, group_size, quantizable, make, show_progress)


def _shard_loader(lin: Linear) -> Callable[[nn.Parameter, torch.Tensor], None]:
    """Loads a whole fused quantized tensor into this rank's ``param`` the way the fp layer
    ``lin`` slices its weight (by heads for [q; k; v], each half by rank for [gate; up])."""
    if isinstance(lin, GatedUpLinear):
        def load(param: nn.Parameter, w: torch.Tensor) -> None:
            gate, up = w.chunk(2)
            lin.weight_loader(param, gate, "gate")
            lin.weight_loader(param, up, "up")
        return load
    shard = "qkv" if isinstance(lin, QKVLinear) else None
    return lambda param, w: lin.weight_loader(param, w, shard)


def quantized_skeleton(model: nn.Module, mode: str, group_size: int, quantizable: tuple[str, ...]) -> nn.Module:
    """Swap the quantizable linears of a model built on ``meta`` for empty :class:`QuantLinear`
    storage, so that a quantized checkpoint loads without any fp weight being made.

    The checkpoint was quantized whole, so a row-parallel layer keeps the whole layer's groups,
    which must then fit this rank's inputs."""
    def empty(lin: Linear, group: int) -> QuantLinear:
        if mode != "w8a8" and lin.in_features % group:
            raise ValueError(f"the checkpoint's groups of {group} inputs do not fit a rank's {lin.in_features} "
                             f"inputs at tensor_parallel={TP.size}; quantize it with a smaller group size")
        q = QuantLinear.empty(lin.in_features, lin.out_features, lin.bias is not None, lin.kind,
                              lin.fuse_bias, lin.weight.dtype, mode, group)
        if TP.size > 1:
            q.shard_loader = _shard_loader(lin)  # lin lives on meta: it holds no memory
        return q
    return _swap_linears(model, mode, group_size, quantizable, empty, False, whole=True)


QUANT_CONFIG_KEY = "mii_quantization"  # the config.json section written by ``mii.quantize``


def saved_quantization(hf_config) -> dict | None:
    """``{"mode", "group_size", "modules"}`` of a checkpoint written by ``mii.quantize``, else None."""
    saved = getattr(hf_config, QUANT_CONFIG_KEY, None)
    if saved is None:
        return None
    if not isinstance(saved, dict) or not {"mode", "group_size", "modules"} <= set(saved):
        raise ValueError(f"config.json's {QUANT_CONFIG_KEY} section is malformed: {saved!r}")
    check_quant_args(saved["mode"], saved["group_size"])
    return saved
