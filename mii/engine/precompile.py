"""Compile the Triton kernels that a set of forward passes needs, on several threads, before
the passes run for real.

A cold start (an empty Triton cache: a new machine, a new container) compiles every kernel
specialization that graph capture meets: each tile config, activation, norm kind and batch
bucket. Met one by one during capture, they compile one after another. Here each pass first
runs with compiles deferred: a kernel that is not compiled yet is neither compiled nor
launched, only its specialization is recorded (Triton's ``jit_cache_hook``). The recorded
ones then compile together on a thread pool (Triton's ``AsyncCompileMode``, which keeps
the results in each kernel's own cache), and the real passes find them ready.

The deferred passes compute garbage, which is harmless: their kernels take their grids and
indices from shapes and from the inputs (never from another kernel's output), as CUDA-graph
capture already requires, and nothing of theirs is kept.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class _Skipped:
    """Stands in a kernel's cache for a deferred specialization, so that its later launches
    in the deferred passes skip at once instead of re-entering the compile path, whose hook
    serializes the specialization each time: without it a warm start (every kernel in the
    Triton cache on disk) of the Llama-1B shape took 1.0-1.7 s longer than with no precompile,
    with it 0.4-0.8 s (H100, 16 cores, 2026-11-24)."""

    function = packed_metadata = None  # read by a launch (and by kernels.pdl.set_carveout: nothing to set)

    def launch_metadata(self, *args) -> None:
        return None

    def run(self, *args, **kwargs) -> None:
        """The launch: nothing to run."""


_SKIPPED = _Skipped()


@contextlib.contextmanager
def deferred() -> Iterator[dict]:
    """Inside, a Triton kernel launch that would compile is skipped instead; the returned dict
    collects {(kernel, cache key): (kernel, specialization)}, each specialization once.

    The tensor-parallel exchange kernels are skipped even when compiled: each waits for
    its peers' flags, so a rank must launch one exactly when every peer does. A process
    that built an engine before holds them compiled where a freshly spawned peer does not;
    it ran them for real while the peer skipped them, and spun on flags no one raised (a
    second TP=2 engine in one process hung, 2x H200, 2026-11-24)."""
    from triton import knobs

    from kernels.allreduce import EXCHANGE_KERNELS
    from kernels.skinny_kernel import _skinny_exchange_kernel

    seen: dict = {}
    stand_ins: list = []
    previous = knobs.runtime.jit_cache_hook
    held = [(entry[0], dict(entry[0])) for kernel in (*EXCHANGE_KERNELS, _skinny_exchange_kernel)
            for entry in getattr(kernel, "device_caches", {}).values()]  # none under the interpreter
    for cache, _ in held:
        cache.clear()

    def hook(*, key, fn, compile, **_) -> bool:
        kernel = fn.jit_function
        seen.setdefault((kernel, key), (kernel, compile["specialization_data"]))
        cache = kernel.device_caches[compile["device"]][0]
        cache[key] = _SKIPPED
        stand_ins.append((cache, key))
        return True  # skip the compile, and with it this launch

    knobs.runtime.jit_cache_hook = hook
    try:
        yield seen
    finally:
        knobs.runtime.jit_cache_hook = previous
        for cache, key in stand_ins:
            if cache.get(key) is _SKIPPED:
                del cache[key]
        for cache, compiled in held:
            cache.update(compiled)


def compile_all(specs: Iterable[tuple], workers: int) -> int:
    """Compile recorded specializations on ``workers`` threads into their kernels' caches."""
    from triton.runtime._async_compile import AsyncCompileMode

    specs = list(specs)
    if specs:
        with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool):
            for kernel, data in specs:
                kernel.preload(data)
    return len(specs)


def precompile(passes: Iterable[Callable[[], object]], workers: int) -> int:
    """Run ``passes`` with compiles deferred, then compile what they met in parallel.
    Returns how many kernels it compiled (or loaded from Triton's cache on disk). With a
    Triton older than 3.5 (no ``AsyncCompileMode``) it does nothing, and the kernels compile
    as the passes meet them later."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    try:
        from triton.runtime import _async_compile  # noqa: F401
    except ImportError:
        return 0
    t0 = time.perf_counter()
    with deferred() as seen:
        for run in passes:
            run()
    n = compile_all(seen.values(), workers)
    if n:
        log.info("%d Triton kernels compiled (or loaded from Triton's cache) on %d threads in %.1f s", n, workers,
                 time.perf_counter() - t0)
    return n
