"""The one place where the model's hot ops are bound to an implementation.

Every fused op the decoder calls goes through an ``Ops`` table. On CPU it holds the
plain-torch references from ``kernels/``; on CUDA it takes each op's Triton kernel
where one exists and the reference otherwise. Swapping a kernel in never touches
the model code.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.activation import bias_act_ref
from kernels.argmax import argmax_ref
from kernels.attention import decode_attention_ref, paged_attention_ref
from kernels.norm import add_norm_ref
from kernels.rotary import rotary_cache_ref
from kernels.sampling import sample_ref


@dataclass(frozen=True, slots=True)
class Ops:
    add_norm: Callable
    bias_act: Callable
    rotary_cache: Callable
    paged_attention: Callable
    decode_attention: Callable  # rotary_cache + paged_attention for steps of one token per sequence
    sample: Callable
    argmax: Callable  # greedy sampling
    backend: str


REFERENCE = Ops(add_norm_ref, bias_act_ref, rotary_cache_ref, paged_attention_ref, decode_attention_ref, sample_ref,
                argmax_ref, "torch")

# op name -> (module, function) of its Triton implementation, for CUDA.
_TRITON = {
    "add_norm": ("kernels.norm", "add_norm"),
    "bias_act": ("kernels.activation", "bias_act"),
    "rotary_cache": ("kernels.rotary", "rotary_cache"),
    "paged_attention": ("kernels.attention", "paged_attention"),
    "decode_attention": ("kernels.decode_attention", "decode_attention"),
    "sample": ("kernels.sampling", "sample"),
    "argmax": ("kernels.argmax", "argmax"),
}


def ops_for(device: torch.device, use_triton: bool = True) -> Ops:
    """References on CPU (or when asked); Triton kernels on CUDA where they exist."""
    if device.type != "cuda" or not use_triton:
        return REFERENCE
    chosen = {}
    for name, (mod, fn) in _TRITON.items():
        impl = getattr(importlib.import_module(mod), fn, None)
        chosen[name] = impl if impl is not None else getattr(REFERENCE, name)
    backend = "triton" if any(chosen[n] is not getattr(REFERENCE, n) for n in chosen) else "torch"
    return Ops(**chosen, backend=backend)
