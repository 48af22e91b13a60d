"""What a persistent decode kernel's dependency waits cost: a chain of fp16 one-row GEMVs.

Issues 5 and 6 need fewer kernel boundaries per layer: a persistent kernel that tracks
dependencies per tile. This measures the core of one. It runs a chain of GEMVs with the
decode layers' shapes (each GEMV reads the first K of the previous one's outputs; no norms,
no attention) as one launch, and times it against today's path, one ``skinny_linear`` per
GEMV under PDL in one CUDA graph. It is an experiment, not an engine path.

The kernel: a work item is (GEMV, band of BN output rows, K-slice of KS columns), numbered in
one global order, GEMV by GEMV and slice-major inside one (every band's first slice, then
every band's second...). Program p takes items p, p + G, ... An item waits until every band of
the previous GEMV inside its K-slice is final (a counter per slice, polled by atomics), then
streams its [BN, KS] weight in [BN, BK] tiles through a pipelined loop. Its first two tiles
were loaded into registers before the item ahead of it ran its epilogue, so loads stay in
flight across the wait. The last of a band's slices to arrive sums the partials in a fixed
order, stores the band, and counts it into the next GEMV's slice counter; the last program to
leave zeroes the slice counters. The smallest unfinished item waits only on earlier items,
and its program has finished all of its own, so nothing deadlocks as long as every program
is resident: the grid is the driver's occupancy times the SM count.

    python -m benchmarks.persistent_chain [--no-wait]

``--no-wait`` drops the waits (the outputs are then wrong): the bound that streaming alone
sets. Figures are in ``benchmarks/results/notes.md`` (twenty-sixth session).
"""
from __future__ import annotations

import argparse
import ctypes
import itertools

import torch
import triton
import triton.language as tl

NFIELD = tl.constexpr(14)  # int64 fields per GEMV in the meta table (Chain.__init__ names them)
SPIN_LIMIT = tl.constexpr(1 << 20)  # a wait this long is a bug: count it in the last counter and go on


@triton.jit
def _item(i, item_g_ptr, g_start_ptr, meta_ptr, BN: tl.constexpr):
    """Item i -> (its GEMV's meta row, band, slice), slice-major."""
    g = tl.load(item_g_ptr + i)
    local = i - tl.load(g_start_ptr + g)
    m = meta_ptr + g * NFIELD
    bands = tl.load(m + 1) // BN
    return m, local % bands, local // bands


@triton.jit
def _first_tiles(w_ptr, m, band, s, ok, BN: tl.constexpr, BK: tl.constexpr):
    """The item's first two [BN, BK] weight tiles (zeros unless ``ok``)."""
    K = tl.multiple_of(tl.load(m + 2), 64)
    KS = tl.multiple_of(tl.load(m + 11), 64)
    rows = (band * BN + tl.arange(0, BN))[:, None].to(tl.int64)
    ptrs = w_ptr + tl.multiple_of(tl.load(m + 0), 64) + s * KS + rows * K + tl.arange(0, BK)[None, :]
    mask = (tl.zeros([BN, BK], tl.int32) + ok) > 0
    return tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + BK, mask=mask, other=0.0)


@triton.jit
def _chain_kernel(w_ptr, act_ptr, part_ptr, cnt_ptr, meta_ptr, item_g_ptr, g_start_ptr, n_items, G, n_rdy, done_off,
                  BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, WAIT: tl.constexpr):
    rows = tl.arange(0, BN)
    cols = tl.arange(0, BK)
    i = tl.program_id(0)
    m, band, s = _item(tl.minimum(i, n_items - 1), item_g_ptr, g_start_ptr, meta_ptr, BN)
    w0, w1 = _first_tiles(w_ptr, m, band, s, (i < n_items).to(tl.int32), BN, BK)
    known = -1  # the last slice counter seen ready: once ready, a slice stays ready
    while i < n_items:
        m, band, s = _item(i, item_g_ptr, g_start_ptr, meta_ptr, BN)
        j = i + G
        N = tl.multiple_of(tl.load(m + 1), 64)
        K = tl.multiple_of(tl.load(m + 2), 64)
        S = tl.load(m + 5)
        KS = tl.multiple_of(tl.load(m + 11), 64)
        rdy_in = tl.load(m + 8)
        if WAIT & (rdy_in >= 0) & ((rdy_in + s).to(tl.int32) != known):
            need = tl.load(m + 13)
            c = tl.atomic_add(cnt_ptr + rdy_in + s, 0)
            spins = 0
            while (c < need) & (spins < SPIN_LIMIT):
                c = tl.atomic_add(cnt_ptr + rdy_in + s, 0)
                spins += 1
            if spins >= SPIN_LIMIT:
                tl.atomic_add(cnt_ptr + done_off + 1, 1)
            known = (rdy_in + s).to(tl.int32)
        x_ptrs = act_ptr + tl.multiple_of(tl.load(m + 3), 64) + s * KS + cols
        acc = tl.sum(w0.to(tl.float32) * tl.load(x_ptrs, cache_modifier=".cg").to(tl.float32)[None, :], 1)
        acc += tl.sum(w1.to(tl.float32) * tl.load(x_ptrs + BK, cache_modifier=".cg").to(tl.float32)[None, :], 1)
        w_ptrs = (w_ptr + tl.multiple_of(tl.load(m + 0), 64) + s * KS + (band * BN + rows)[:, None].to(tl.int64) * K
                  + cols[None, :])
        for t in tl.range(2, KS // BK, num_stages=STAGES):
            w = tl.load(w_ptrs + t * BK)
            x = tl.load(x_ptrs + t * BK, cache_modifier=".cg")
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], 1)
        # the next item's first tiles go out before this item's epilogue and the next one's wait
        m2, band2, s2 = _item(tl.minimum(j, n_items - 1), item_g_ptr, g_start_ptr, meta_ptr, BN)
        w0, w1 = _first_tiles(w_ptr, m2, band2, s2, (j < n_items).to(tl.int32), BN, BK)
        final = S == 1
        if S > 1:  # split-K: the last slice to arrive sums the partials in a fixed order
            p_ptrs = part_ptr + tl.multiple_of(tl.load(m + 6), 64) + band * BN + rows
            tl.store(p_ptrs + s * N, acc)
            tl.debug_barrier()  # every thread's partial is stored before the count is released
            bc = cnt_ptr + tl.load(m + 7) + band
            if tl.atomic_add(bc, 1) == S - 1:
                total = tl.zeros([BN], tl.float32)
                for t2 in range(0, S):
                    total += tl.load(p_ptrs + t2 * N, cache_modifier=".cg")
                acc = total
                final = True
                tl.atomic_xchg(bc, 0)
        if final:
            tl.store(act_ptr + tl.multiple_of(tl.load(m + 4), 64) + band * BN + rows, acc.to(tl.float16))
            rdy_out = tl.load(m + 9)
            if (rdy_out >= 0) & (band * BN < tl.load(m + 10)):  # only the columns the next GEMV reads
                tl.debug_barrier()
                tl.atomic_add(cnt_ptr + rdy_out + (band * BN) // tl.load(m + 12), 1)
        i = j
    tl.debug_barrier()
    if tl.atomic_add(cnt_ptr + done_off, 1) == G - 1:  # the last program out zeroes the slice counters
        for r in range(0, n_rdy, 128):
            o = r + tl.arange(0, 128)
            tl.store(cnt_ptr + o, tl.zeros([128], tl.int32), mask=o < n_rdy)
        tl.atomic_xchg(cnt_ptr + done_off, 0)


class Chain:
    """GEMVs ``shapes`` [(N, K, KS)] with random fp16 weights in one buffer; GEMV g reads the
    first K of GEMV g-1's N outputs, in K-slices of KS; activations share one buffer too."""

    def __init__(self, shapes, device, BN=16, BK=256, num_warps=4, stages=3, wait=True, seed=0):
        for (n, _, _), (_, k2, _) in zip(shapes, shapes[1:]):
            if k2 > n:
                raise ValueError(f"a GEMV of K={k2} cannot read the {n} outputs of the one before")
        for n, k, ks in shapes:
            if n % BN or k % ks or ks % BK or ks < 2 * BK or ks % BN:
                raise ValueError(f"(N, K, KS) = {(n, k, ks)} does not tile by BN={BN}, BK={BK}")
        gen = torch.Generator().manual_seed(seed)
        self.shapes, self.BN, self.BK, self.num_warps, self.stages, self.wait = shapes, BN, BK, num_warps, stages, wait
        self.w_offs = _offsets([n * k for n, k, _ in shapes])
        self.w = torch.cat([(torch.randn(n * k, generator=gen) * (0.5 / k ** 0.5)).half() for n, k, _ in shapes]).to(device)
        self.act_offs = [shapes[0][1] + o for o in _offsets([n for n, _, _ in shapes])]
        self.act = torch.zeros(self.act_offs[-1] + shapes[-1][0], device=device, dtype=torch.float16)
        self.act[:shapes[0][1]] = torch.randn(shapes[0][1], generator=gen).half()
        # counters: [each GEMV's input slices][each GEMV's bands][done][timed-out waits]
        rdy = _offsets([k // ks for _, k, ks in shapes])
        self.n_rdy = sum(k // ks for _, k, ks in shapes)
        bandc = [self.n_rdy + o for o in _offsets([n // BN for n, _, _ in shapes])]
        self.done_off = self.n_rdy + sum(n // BN for n, _, _ in shapes)
        self.cnt = torch.zeros(self.done_off + 2, dtype=torch.int32, device=device)
        parts = [(k // ks) * n for n, k, ks in shapes]
        self.part = torch.empty(max(sum(parts), 1), dtype=torch.float32, device=device)
        meta, last, part_offs = [], len(shapes) - 1, _offsets(parts)
        for g, (n, k, ks) in enumerate(shapes):
            nxt = shapes[g + 1] if g < last else (0, 0, 1)
            meta.append([self.w_offs[g], n, k, 0 if g == 0 else self.act_offs[g - 1], self.act_offs[g],  # 0-4
                         k // ks, part_offs[g], bandc[g],  # 5 slices, 6 partials, 7 band counters
                         -1 if g == 0 else rdy[g], rdy[g + 1] if g < last else -1,  # 8-9 slice counters in, out
                         nxt[1], ks, nxt[2], ks // BN])  # 10 next K, 11 KS, 12 next KS, 13 bands per slice
        counts = [(n // BN) * (k // ks) for n, k, ks in shapes]
        self.meta = torch.tensor(meta, dtype=torch.int64, device=device)
        self.g_start = torch.tensor(_offsets(counts), dtype=torch.int32, device=device)
        self.item_g = torch.tensor([g for g, c in enumerate(counts) for _ in range(c)], dtype=torch.int32, device=device)
        self.n_items, self.G = sum(counts), 1

    def _call(self, grid, warmup=False):
        args = (self.w, self.act, self.part, self.cnt, self.meta, self.item_g, self.g_start, self.n_items, self.G,
                self.n_rdy, self.done_off)
        kw = dict(BN=self.BN, BK=self.BK, STAGES=self.stages, WAIT=self.wait, num_warps=self.num_warps)
        return _chain_kernel.warmup(*args, grid=grid, **kw) if warmup else _chain_kernel[grid](*args, **kw)

    def launch(self):
        self._call((self.G,))

    def fill_gpu(self, cap: int = 4) -> tuple[int, int]:
        """Set G to every program the GPU holds at once (the driver's occupancy, with all of L1
        as shared memory): all must be resident, or the waits deadlock. -> (per SM, registers)."""
        k = self._call((1,), warmup=True)
        k._init_handles()
        from kernels.pdl import _libcuda, set_carveout
        set_carveout(k, 100)
        n = ctypes.c_int(0)
        rc = _libcuda().cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(n), ctypes.c_void_p(k.function), ctypes.c_int(32 * self.num_warps),
            ctypes.c_size_t(k.metadata.shared))
        if rc != 0:
            raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed with CUDA error {rc}")
        # at most cap an SM: 5 (where the registers allowed) was slower (H100, 2026-11-24)
        self.G = min(n.value, cap) * torch.cuda.get_device_properties(self.w.device).multi_processor_count
        return n.value, k.n_regs

    def timed_out_waits(self) -> int:
        return int(self.cnt[-1])

    def weight(self, g):
        n, k, _ = self.shapes[g]
        return self.w[self.w_offs[g]:self.w_offs[g] + n * k].view(n, k)

    def x_of(self, g):
        off = 0 if g == 0 else self.act_offs[g - 1]
        return self.act[off:off + self.shapes[g][1]]

    def y_of(self, g):
        return self.act[self.act_offs[g]:self.act_offs[g] + self.shapes[g][0]]


def _offsets(sizes: list[int]) -> list[int]:
    return list(itertools.accumulate(sizes, initial=0))[:-1]


CHAINS = ("llama-1b", "opt-1.3b", "llama-1b:mlp")  # a model's layers, or only its MLP ("model:mlp")


def layer_chain(name: str, ks: int = 2048) -> list[tuple[int, int, int]]:
    """(N, K, KS) of every decode linear of the model's layers (benchmarks.linears.linear_shapes), in order."""
    from .linears import linear_shapes
    from .models import SHAPES
    model, _, part = name.partition(":")
    shapes = list(linear_shapes(model).values())
    if part == "mlp":
        shapes = shapes[2:]
    return [(n, k, min(ks, k)) for n, k in shapes] * SHAPES[model][1]["num_hidden_layers"]


def _time_graph(fn) -> float:
    """Median us of a CUDA graph that calls fn once."""
    from .timing import time_calls
    return time_calls(fn, [()], min_calls=1, replays=20) * 1e6


def _skinny_chain(chain: Chain):
    from kernels.skinny_gemm import skinny_linear
    ws = [chain.weight(g) for g in range(len(chain.shapes))]
    x0 = chain.x_of(0).view(1, -1)

    def run():
        x = x0
        for g, w in enumerate(ws):
            y = skinny_linear(x, w)
            x = y[:, :chain.shapes[g + 1][1]] if g + 1 < len(ws) else y
    return run


def compare(chain: Chain, name: str, label: str, bw: float, skinny: float | None = None, per_sm: int = 4) -> float:
    """Time ``chain`` (a whole launch, graph replay) against the skinny chain of its shapes, and print
    both against its weights over copy bandwidth. Returns the skinny chain's time, so that a sweep
    over variants of one chain times it once."""
    ideal = chain.w.numel() * 2 / bw * 1e6
    skinny = skinny or _time_graph(_skinny_chain(chain))
    fit, regs = chain.fill_gpu(per_sm)
    ours = _time_graph(chain.launch)
    print(f"{name}, {label}: {len(chain.shapes)} GEMVs, weights / copy bw {ideal:.1f} us; skinny chain {skinny:.1f} us "
          f"({ideal / skinny:.1%}); {label} {ours:.1f} us ({ideal / ours:.1%}), {chain.G} programs "
          f"({fit} fit an SM, {regs} registers), timed-out waits {chain.timed_out_waits()}")
    return skinny


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-wait", action="store_true", help="drop the waits: the streaming bound (wrong outputs)")
    args = ap.parse_args()
    from .timing import copy_bandwidth
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s")
    for name in CHAINS:
        compare(Chain(layer_chain(name), "cuda", wait=not args.no_wait), name, "persistent", bw)


if __name__ == "__main__":
    main()
