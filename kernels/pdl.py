"""Programmatic dependent launch (Hopper): let a decode step's next kernel start early.

A bs=1 decode step is a chain of short kernels, each too small to fill the GPU for long:
every boundary costs a launch, a ramp-up while the first loads are in flight, and a tail
where the last programs run on a nearly idle GPU. With PDL a kernel is launched while the
one before it is still running (once each of its programs has started or ended); it runs
what does not depend on that kernel (the weight stream of a GEMV, which only needs the
weights) and then waits in ``griddepcontrol.wait`` until the kernel before has finished and
its writes are visible.

Rules every kernel launched this way follows (``enter`` does both):
- every program calls ``gdc_wait`` before it reads anything an earlier kernel wrote or
  writes anything an earlier kernel reads, and before it exits; that keeps the chain
  transitive (kernel C waits for B, which waited for A);
- it releases its dependents at once (``gdc_launch_dependents``): they are only scheduled
  once every program of this kernel has started, so they never take an SM from it.

Reads of what no kernel of the step writes (step inputs copied in before the step's first
kernel, the KV cache of earlier steps, the weights) may come before the wait: the GEMV
streams its first weight tiles that way, decode attention its context length, block table
and first K/V tile, the norms their weight and bias.
"""
from __future__ import annotations

import ctypes
import functools

import torch
import triton
import triton.language as tl

try:  # triton >= 3.4 on sm90+; elsewhere the kernels take the PDL=False path
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - old triton
    gdc_launch_dependents = gdc_wait = None


@functools.cache
def supported(device: torch.device) -> bool:
    """PDL on this device: a Hopper-or-later GPU and a Triton that exposes grid dependency control."""
    if device.type != "cuda" or gdc_wait is None:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


class _Switch:
    """Process-wide on/off, for A/B benchmarks (``benchmarks/pdl_ab.py``); on by default."""

    enabled = True


def use(device: torch.device) -> bool:
    return _Switch.enabled and supported(device)


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: the kernel's ``PDL`` switch and Triton's launch flag."""
    on = use(device)
    return {"PDL": on, "launch_pdl": on}


def set_enabled(flag: bool) -> None:
    _Switch.enabled = bool(flag)


@triton.jit
def enter(PDL: tl.constexpr):
    """Release this kernel's dependents, then wait for the kernel before (no-op unless PDL)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


# CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT in the driver API.
_CARVEOUT = 9
_carved: set[tuple[int, int]] = set()


@functools.cache
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def set_carveout(kernel, percent: int) -> None:
    """Prefer ``percent`` of each SM's unified L1/shared memory as shared memory while
    ``kernel`` (a compiled Triton kernel, as a launch returns it; None in the interpreter)
    runs. Under PDL the split decides how many of a kernel's programs an SM takes while the
    kernel before still holds it (see ``kernels/skinny_gemm.py``'s ROW_TILES). Set before a
    graph captures the kernel; repeated calls are free."""
    function = getattr(kernel, "function", None)
    if function is None or (function, percent) in _carved:
        return
    rc = _libcuda().cuFuncSetAttribute(ctypes.c_void_p(function), ctypes.c_int(_CARVEOUT), ctypes.c_int(percent))
    if rc != 0:
        raise RuntimeError(f"cuFuncSetAttribute(carveout={percent}) failed with CUDA error {rc}")
    _carved.add((function, percent))
