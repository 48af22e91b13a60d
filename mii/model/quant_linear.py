"""The runtime side of weight quantization: :class:`QuantLinear`, a drop-in for ``Linear``
holding the integers and scales of :mod:`mii.model.quant`, and the per-token int8
activations (:class:`Int8Act`, made by :func:`norm_quant`) that W8A8 layers take.
On CUDA they run the Triton kernels, on CPU their plain-torch references.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn

from kernels.quant_act import add_norm_quant, add_norm_quant_ref, quant_per_token, quant_per_token_ref
from kernels.quant_gemm import wxa16_gemm, wxa16_gemm_ref
from kernels.skinny_gemm import SKINNY_M
from kernels.w8a8_gemm import decode_bk, w8a8_gemm, w8a8_gemm_ref
from .layers import Linear, Norm, _param, decode_sized
from .parallel import TP, Partial
from .quant import DEFAULT_GROUP_SIZE, _check_fits, check_quant_args, quantize_weight


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

    def forward(self, x: torch.Tensor | Int8Act, act: str | None = None, defer: bool = False,
                release_first: bool = False) -> torch.Tensor | Partial:
        """As ``Linear.forward``. ``release_first`` is not taken by W8A8's kernel, where it
        made the 7B bs=8 step 1.2% slower (H100, 2026-11-24)."""
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
        if not _on_gpu(x):
            return self._finish(wxa16_gemm_ref(x, self.qweight, self.scales, self._gemm_bias(), self.bits), defer)
        return self._finish(wxa16_gemm(x, self.qweight, self.scales, self._gemm_bias(), self.bits,
                                       release_first=release_first), defer)

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
