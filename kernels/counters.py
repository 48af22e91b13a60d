"""Zeroed int32 counters that persist from one kernel launch to the next.

The split-K GEMV counts each band's arriving programs, and decode attention each merge
group's slices. Every launch leaves its counters at zero again, so they are zeroed once, at
allocation, and never by the host. They must live outside every CUDA graph's memory pool:
a buffer allocated during a capture takes pool memory that an earlier graph's intermediates
also use (replaying that graph overwrites it), and its zero-fill is captured, not run. The
model runner's eager warm-up before each capture sizes them in time.
"""
from __future__ import annotations

import torch

_RETIRED: list[torch.Tensor] = []  # outgrown buffers: graphs captured with them still use them


def zeroed(store: dict[torch.device, torch.Tensor], device: torch.device, n: int, minimum: int,
           what: str) -> torch.Tensor:
    """At least n zeroed counters from ``store``'s buffer for ``device``, grown (never inside a
    CUDA-graph capture: RuntimeError) to max(n, minimum) when short."""
    buf = store.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{what} needs {n} counters on {device} during a CUDA-graph capture but has "
                               f"{0 if buf is None else buf.numel()}: run the shape eagerly first")
        if buf is not None:
            _RETIRED.append(buf)
        buf = store[device] = torch.zeros(max(n, minimum), dtype=torch.int32, device=device)
    return buf
