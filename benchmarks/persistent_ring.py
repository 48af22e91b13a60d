"""The persistent GEMV chain again, with the weight stream kept going through each wait.

``benchmarks.persistent_chain`` found that a persistent kernel's dependency waits cost as much as
the kernel boundaries they replace (3-4 us per GEMV boundary on the H100), because Triton's
pipeliner issues no load across a data-dependent wait: while a program polls, only its small
register lookahead is in flight. This version is written in Gluon (Triton's lower-level
dialect), where the kernel owns its shared memory and its cp.async groups. Each program keeps a
ring of RING weight tiles in flight, issued in the order it will consume them, across item and
GEMV boundaries: the tiles of the items after a wait are already streaming in while it polls.
Same work items, counters, split-K reduction and meta table as ``persistent_chain.Chain``.

Each atomic takes only the memory order it needs (``--sem 1``, the default): Triton's default,
acq_rel, puts a fence before every poll and release, and a fence waits for the program's
in-flight tiles. Flags carried in the data words themselves (NCCL's LL protocol), tried in
commit 714a974, were slower and are not kept.

    python -m benchmarks.persistent_ring [--no-wait] [--ring N] [--sem S] [--trace]

GPU only: the Triton interpreter does not run Gluon. Figures are in
``benchmarks/results/notes.md`` (twenty-seventh and twenty-eighth sessions).
"""
from __future__ import annotations

import argparse

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

from .persistent_chain import CHAINS, Chain, compare, layer_chain

NREC = gl.constexpr(16)  # int64 fields per item in the record table (RingChain.records names them)
SPIN_LIMIT = gl.constexpr(1 << 20)  # a wait this long is a bug: count it in the last counter and go on


@gluon.jit
def _stamp(trace_ptr, i, k: gl.constexpr, TRACE: gl.constexpr):
    """TRACE: item i's k-th time stamp (ns, the GPU's global timer): 0 start, 1 input ready,
    2 tiles done, 3 epilogue done."""
    if TRACE:
        t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [i], dtype=gl.int64, is_pure=False,
                                      pack=1)
        gl.store(trace_ptr + i * 4 + k, t)


@gluon.constexpr_function
def _sem(SEM, weak):
    """The memory order of an atomic: SEM 0 acq_rel everywhere (Triton's default), 1 only the
    order it needs (``weak``), 2 relaxed (wrong: the cost of the fences alone)."""
    return ["acq_rel", weak, "relaxed"][SEM]


@gluon.jit
def _poll(ptr, POLL: gl.constexpr, SEM: gl.constexpr):
    """One look at a counter: by an atomic (POLL 0; each one queues at L2 behind every other
    program's on the same word) or by a volatile load (1, 2)."""
    if POLL == 0:
        c = gl.atomic_add(ptr, 0, sem=_sem(SEM, "acquire"))
    else:
        c = gl.load(ptr, volatile=True)
    return c


@gluon.jit
def _tile_rec(rec_ptr, i, n_items):
    """(weight offset of item i's first tile, K, tiles), the producer's part of the record."""
    rec = rec_ptr + gl.minimum(i, n_items - 1) * NREC
    return gl.multiple_of(gl.load(rec), 64), gl.multiple_of(gl.load(rec + 1), 64), gl.load(rec + 2).to(gl.int32)


@gluon.jit
def _issue(ring, w_ptr, rec_ptr, rows, cols, n_items, prod, slot, G, BK: gl.constexpr):
    """cp.async the producer's next tile (if any) into ``slot``, commit its group (empty past the
    program's last item, so the group count stays one per tile) and advance the producer.
    ``prod``: its item, tile, that item's (offset, K, tiles) and the next item's, loaded an
    item ahead so that no record load stalls the stream."""
    p_item, p_t, p_base, p_K, p_T, n_base, n_K, n_T = prod
    if p_item < n_items:
        ptrs = (w_ptr + gl.multiple_of(p_base + p_t * BK, 64) + rows[:, None] * gl.multiple_of(p_K, 64)
                + cols[None, :])
        cp.async_copy_global_to_shared(ring.index(slot), ptrs)
        p_t += 1
        if p_t == p_T:
            p_item += G
            p_t = 0
            p_base, p_K, p_T = n_base, n_K, n_T
            n_base, n_K, n_T = _tile_rec(rec_ptr, p_item + G, n_items)
    cp.commit_group()
    return p_item, p_t, p_base, p_K, p_T, n_base, n_K, n_T


@gluon.jit
def _ring_kernel(w_ptr, act_ptr, part_ptr, cnt_ptr, rec_ptr, trace_ptr, n_items, G, n_rdy, done_off,
                 BN: gl.constexpr, BK: gl.constexpr, RING: gl.constexpr, KS_MAX: gl.constexpr, WAIT: gl.constexpr,
                 POLL: gl.constexpr = 0, TRACE: gl.constexpr = False, SEM: gl.constexpr = 1):
    # Each thread copies and reads back the same 16-byte pieces of a tile, so a tile it waited
    # for is its own to read, and the slot it refills is one it finished with a tile ago.
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [gl.num_warps(), 1], [1, 0])
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    rows = gl.arange(0, BN, layout=gl.SliceLayout(1, blk))
    cols = gl.arange(0, BK, layout=gl.SliceLayout(0, blk))
    ring = gl.allocate_shared_memory(gl.float16, [RING, BN, BK], flat)
    xs = gl.allocate_shared_memory(gl.float16, [KS_MAX // BK, BK], flat)  # the item's x, row t for tile t
    xs_rows = xs._reinterpret(gl.float16, [KS_MAX // BK, 1, BK], flat)  # the same bytes: row t is [1, BK]
    pid = gl.program_id(0)
    prod = (pid, 0) + _tile_rec(rec_ptr, pid, n_items) + _tile_rec(rec_ptr, pid + G, n_items)
    for r in gl.static_range(RING - 1):
        prod = _issue(ring, w_ptr, rec_ptr, rows, cols, n_items, prod, r, G, BK)
    c_slot = 0
    known = -1  # the last slice counter seen ready: once ready, a slice stays ready
    i = pid
    while i < n_items:
        rec = rec_ptr + i * NREC  # independent loads: one round trip
        T = gl.load(rec + 2).to(gl.int32)
        x_off = gl.multiple_of(gl.load(rec + 3), 64)
        rdy = gl.load(rec + 4)
        need = gl.load(rec + 5)
        S = gl.load(rec + 8)
        p_off, N, s, bc = gl.load(rec + 6), gl.load(rec + 7), gl.load(rec + 9), gl.load(rec + 10)
        y_off, rdy_out = gl.load(rec + 11), gl.load(rec + 12)  # loaded now: their latency hides behind the item
        _stamp(trace_ptr, i, 0, TRACE)
        xr = gl.arange(0, KS_MAX // BK, layout=gl.SliceLayout(1, blk))
        x_ptrs = xr[:, None] * BK + cols[None, :]
        x_mask = (xr < T)[:, None] & (cols >= 0)[None, :]
        if WAIT & (rdy >= 0) & (rdy.to(gl.int32) != known):
            c = _poll(cnt_ptr + rdy, POLL, SEM)
            spins = 0
            while (c < need) & (spins < SPIN_LIMIT):
                c = _poll(cnt_ptr + rdy, POLL, SEM)
                spins += 1
            if POLL == 1:  # seen by plain loads: one acquiring read orders the x loads after the writer's release
                gl.atomic_add(cnt_ptr + rdy, 0, sem="acquire")
            if spins >= SPIN_LIMIT:
                gl.atomic_add(cnt_ptr + done_off + 1, 1)
            known = rdy.to(gl.int32)
        _stamp(trace_ptr, i, 1, TRACE)
        x = gl.load(act_ptr + x_off + x_ptrs, mask=x_mask, other=0.0, cache_modifier=".cg")
        # the item's x slice into shared memory, once, for all of its tiles
        gl.thread_barrier()  # the last item's reads of xs are done
        xs.store(x)
        gl.thread_barrier()
        acc = gl.zeros([BN, BK], gl.float32, layout=blk)
        for t in range(0, T):
            cp.wait_group(RING - 2)  # this thread's pieces of tile t have landed
            w = ring.index(c_slot).load(blk)
            prod = _issue(ring, w_ptr, rec_ptr, rows, cols, n_items, prod, (c_slot + RING - 1) % RING, G, BK)
            xt = xs_rows.index(t).load(blk)  # [1, BK]
            acc += w.to(gl.float32) * xt.to(gl.float32)
            c_slot = (c_slot + 1) % RING
        _stamp(trace_ptr, i, 2, TRACE)
        y = gl.sum(acc, axis=1)
        final = S == 1
        if S > 1:  # split-K: the last slice to arrive sums the partials in a fixed order
            p_ptrs = part_ptr + p_off + rows
            gl.store(p_ptrs + s * N, y)
            gl.thread_barrier()  # every thread's partial is stored before the count is released
            if gl.atomic_add(cnt_ptr + bc, 1, sem=_sem(SEM, "acq_rel")) == S - 1:
                total = gl.zeros([BN], gl.float32, layout=gl.SliceLayout(1, blk))
                for t2 in range(0, S):
                    total += gl.load(p_ptrs + t2 * N, cache_modifier=".cg")
                y = total
                final = True
                gl.atomic_xchg(cnt_ptr + bc, 0)
        if final:
            gl.store(act_ptr + y_off + rows, y.to(gl.float16))
            if rdy_out >= 0:
                gl.thread_barrier()
                gl.atomic_add(cnt_ptr + rdy_out, 1, sem=_sem(SEM, "release"))
        _stamp(trace_ptr, i, 3, TRACE)
        i += G
    cp.wait_group(0)
    gl.thread_barrier()
    if gl.atomic_add(cnt_ptr + done_off, 1) == G - 1:  # the last program out zeroes the slice counters
        for r0 in range(0, n_rdy, 128):
            o = r0 + gl.arange(0, 128, layout=gl.SliceLayout(0, blk))
            gl.store(cnt_ptr + o, gl.zeros([128], gl.int32, layout=gl.SliceLayout(0, blk)), mask=o < n_rdy)
        gl.atomic_xchg(cnt_ptr + done_off, 0)


class RingChain(Chain):
    """``Chain`` run by the Gluon kernel: ``ring`` weight tiles in flight per program."""

    def __init__(self, shapes, device, ring=8, poll=0, sem=1, **kw):
        super().__init__(shapes, device, **kw)
        if ring < 2:
            raise ValueError(f"a ring of {ring} tiles cannot overlap loads with use")
        self.ring, self.poll, self.sem = ring, poll, sem
        self.ks_max = max(ks for _, _, ks in shapes)
        self.rec = self.records().to(device)
        self.trace = self.rec  # no trace: any pointer will do (TRACE is off while trace is rec; trace_report sets its own)

    def records(self) -> torch.Tensor:
        """One int64 row per item, everything it needs in independent loads: weight offset of its
        first tile, K, tiles, x offset, counter to wait on (-1 none) and its target, partials'
        base, N, slices, slice, band counter, output offset, counter to count into (-1 none)."""
        meta, item_g, g_start = self.meta.cpu().tolist(), self.item_g.cpu().tolist(), self.g_start.cpu().tolist()
        rec = torch.zeros(self.n_items, 16, dtype=torch.int64)
        for i, g in enumerate(item_g):
            w_off, n, k, x_in, y_out, n_s, part, bandc, rdy_in, rdy_out, next_k, ks, next_ks, need = meta[g]
            bands = n // self.BN
            band, s = (i - g_start[g]) % bands, (i - g_start[g]) // bands
            counts = rdy_out >= 0 and band * self.BN < next_k  # only the columns the next GEMV reads
            rec[i] = torch.tensor([w_off + s * ks + band * self.BN * k, k, ks // self.BK, x_in + s * ks,
                                   rdy_in + s if rdy_in >= 0 else -1, need, part + band * self.BN, n, n_s, s,
                                   bandc + band, y_out + band * self.BN,
                                   rdy_out + band * self.BN // next_ks if counts else -1, 0, 0, 0])
        return rec

    def _call(self, grid, warmup=False):
        args = (self.w, self.act, self.part, self.cnt, self.rec, self.trace, self.n_items, self.G, self.n_rdy, self.done_off)
        kw = dict(BN=self.BN, BK=self.BK, RING=self.ring, KS_MAX=self.ks_max, WAIT=self.wait, POLL=self.poll, SEM=self.sem, TRACE=self.trace is not self.rec,
                  num_warps=self.num_warps)
        return _ring_kernel.warmup(*args, grid=grid, **kw) if warmup else _ring_kernel[grid](*args, **kw)


def trace_report(chain: RingChain, bw: float) -> None:
    """One traced launch: per GEMV kind, mean over layers (us) of its span (the last epilogue of
    the GEMV before to its own last), its bytes over copy bandwidth, the first wait to end after
    the GEMV before was done (how long the release took to be seen), and the GEMV's last item:
    when its wait ended, how long its tiles took after that, and its epilogue."""
    chain.trace = torch.zeros(chain.n_items, 4, dtype=torch.int64, device=chain.w.device)
    for _ in range(3):  # the last of three launches: compiled, warm
        chain.launch()
    torch.cuda.synchronize()
    t = chain.trace.cpu().double() / 1e3
    steps = t.flatten().unique().diff()
    print(f"traced launch: {t.max() - t[t > 0].min():.1f} us, timer step {steps[steps > 0].min() * 1e3:.0f} ns")
    t -= t[t > 0].min()
    g_of = chain.item_g.cpu()
    per = len(linear_names := ["qkv", "o", "gate_up", "down"])
    rows = {n: [] for n in linear_names}
    last = None
    for g, (n, k, _) in enumerate(chain.shapes):
        tg = t[g_of == g]
        end = tg[:, 3].max()
        if last is not None:
            crit = tg[tg[:, 3].argmax()]
            rows[linear_names[g % per]].append([end - last, n * k * 2 / bw * 1e6, tg[:, 1].min() - last,
                                                crit[1] - last, crit[2] - crit[1], crit[3] - crit[2]])
        last = end
    print("GEMV: span, bytes/bw, release seen after, last item: ready after, tiles, epilogue (us, mean of layers)")
    for name, r in rows.items():
        m = torch.tensor(r).mean(0).tolist()
        print(f"  {name}: " + ", ".join(f"{v:.2f}" for v in m))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-wait", action="store_true", help="drop the waits: the streaming bound (wrong outputs)")
    ap.add_argument("--ring", type=int, nargs="+", default=[8], help="weight tiles in flight per program")
    ap.add_argument("--bn", type=int, default=16, help="rows per work item")
    ap.add_argument("--per-sm", type=int, default=4, help="at most this many programs an SM")
    ap.add_argument("--chains", nargs="+", default=list(CHAINS))
    ap.add_argument("--poll", type=int, default=0, help="0 atomics, 1 volatile loads then one acquire, 2 volatile only")
    ap.add_argument("--sem", type=int, default=1, help="atomics: 0 acq_rel, 1 the order needed, 2 relaxed (wrong)")
    ap.add_argument("--ks", type=int, default=2048, help="K-slice of an item")
    ap.add_argument("--trace", action="store_true", help="time stamps per item (llama-1b): where each boundary goes")
    args = ap.parse_args()
    from .timing import copy_bandwidth
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s")
    if args.trace:
        chain = RingChain(layer_chain("llama-1b", args.ks), "cuda", ring=args.ring[0], poll=args.poll, sem=args.sem)
        chain.fill_gpu(args.per_sm)
        chain.launch()
        trace_report(chain, bw)
        return
    for name in args.chains:
        skinny = None
        for ring in args.ring:
            chain = RingChain(layer_chain(name, args.ks), "cuda", ring=ring, wait=not args.no_wait, BN=args.bn,
                              poll=args.poll, sem=args.sem)
            skinny = compare(chain, name, f"ring {ring} BN {args.bn} poll {args.poll} sem {args.sem} KS {args.ks}", bw,
                             skinny, args.per_sm)

if __name__ == "__main__":
    main()
