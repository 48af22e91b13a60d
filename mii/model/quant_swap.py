"""The module swap: :func:`quantize_model` replaces a model's quantizable ``Linear`` layers
by :class:`QuantLinear` layers quantized from their weights, and :func:`quantized_skeleton`
by empty ones that a pre-quantized checkpoint loads into; :func:`saved_quantization` reads
how such a checkpoint (written by ``mii.quantize``) was quantized from its config.json.
A layer is quantizable when its dotted name ends with one of the policy's names.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from mii.policies.base import DEFAULT_QUANTIZABLE
from .layers import GatedUpLinear, Linear, QKVLinear
from .parallel import TP
from .quant import DEFAULT_GROUP_SIZE, check_quant_args, group_size_for
from .quant_linear import QuantLinear


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
