"""Timing helpers of the kernel micro-benchmarks (``benchmarks.gemv`` and the tools that borrow them):
the device's copy bandwidth, the yardstick their rooflines use; calls timed back to back inside
one CUDA graph, as decode runs them; and how many weight copies to cycle over so that no call
finds its weight still in L2."""
from __future__ import annotations

import statistics

import torch


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20, CUDA events)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


def time_calls(fn, args: list[tuple], min_calls: int = 64, replays: int = 10) -> float:
    """Median seconds per ``fn(*a)``, run back to back in one CUDA graph over ``args`` in turn."""
    calls = [args[i % len(args)] for i in range(max(min_calls, len(args)))]
    for a in args:  # compile (and any autotuning) before capture
        fn(*a)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for a in calls:
            fn(*a)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times) / len(calls)


def copies_for(nbytes: int) -> int:
    """Weight copies to cycle over so each is evicted from L2 before its next use."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, -(-4 * l2 // nbytes))
