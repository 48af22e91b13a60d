"""The one-shot peer-memory all-reduce (kernels/allreduce.py).

On CPU: real processes under Triton's interpreter, sharing memory as GPUs share it over
NVLink (each process maps the others' buffers and signal pads at its own addresses),
checked against the sum in rank order, over repeated calls, with the flags left clean.
On 2+ GPUs (multi_gpu): against NCCL's all-reduce, eagerly and replayed from a CUDA graph.
"""
import os

import pytest
import torch
import torch.multiprocessing as mp


def _run_ranks(world: int, target, args: tuple, timeout: float) -> None:
    """One spawned process per rank; a hang (a flag never raised) fails rather than blocks."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung and all(p.exitcode == 0 for p in procs), f"ranks hung or failed: {[p.exitcode for p in procs]}"


MAX_BYTES = 128 * 1024  # regions of 4 KB: a 1,024-element fp32 chunk


def _interpreted(r, world, bufs_t, pads_t):
    """Rank r's all-reduce over CPU shared memory, run by Triton's interpreter."""
    os.environ["TRITON_INTERPRET"] = "1"  # a fresh spawned process: before triton loads
    from kernels.allreduce import PeerAllReduce
    return PeerAllReduce(r, world, [t.data_ptr() for t in bufs_t], [t.data_ptr() for t in pads_t],
                         torch.device("cpu"), MAX_BYTES)


def _shared_buffers(world):
    from kernels.allreduce import PeerAllReduce
    bufs = [torch.zeros(PeerAllReduce.buffer_bytes(world, MAX_BYTES), dtype=torch.uint8).share_memory_()
            for _ in range(world)]
    pads = [torch.zeros(PeerAllReduce.pad_slots(world), dtype=torch.int32).share_memory_() for _ in range(world)]
    return bufs, pads


def _interpreted_rank(r, world, xs, bufs_t, pads_t, outs, start=0):
    ar = _interpreted(r, world, bufs_t, pads_t)
    ar.counters.fill_(start)
    for call in range(outs[r].shape[0]):
        outs[r][call].copy_(ar(xs[r] * (call + 1)))


@pytest.mark.parametrize("world,dtype,start", [(2, torch.float16, 0), (3, torch.float32, 0),
                                               (2, torch.float32, 2**31 - 2)])
def test_one_shot_all_reduce_interpreted(world, dtype, start):
    """Three calls, so each program writes both parities' regions and then the first again;
    from ``start`` calls on, where the int32 call counters wrap on the way (after 2^31 calls,
    about a day of decode steps)."""
    n, calls = 1100, 3  # two programs of 1,024, the second ragged
    g = torch.Generator().manual_seed(world)
    xs = [torch.randn(n, generator=g).to(dtype).share_memory_() for _ in range(world)]
    bufs, pads = _shared_buffers(world)
    outs = [torch.zeros(calls, n, dtype=dtype).share_memory_() for _ in range(world)]
    _run_ranks(world, _interpreted_rank, (world, xs, bufs, pads, outs, start), timeout=240)
    for call in range(calls):
        want = sum((x * (call + 1)).float() for x in xs).to(dtype)  # fp32, rank order
        for r in range(world):
            assert torch.equal(outs[r][call], want), (r, call)
    assert all(int(p.abs().sum()) == 0 for p in pads)  # every flag raised was lowered


FUSED_CASES = ((True, False), (False, True), (True, True))  # (RMSNorm, linear and norm biases)


def _fused_rank(r, world, n, xs, residual, lbias, w, b, bufs_t, pads_t, ys, hs):
    ar = _interpreted(r, world, bufs_t, pads_t)
    hs[r][-1].copy_(ar(xs[r].clone()))  # a plain call first: program 0 is one call ahead of 1 and 2
    for call, (rms, has_bias) in enumerate(FUSED_CASES):
        y, h = ar.add_norm(xs[r], lbias if has_bias else None, residual, w, b if has_bias else None, 1e-5, rms)
        ys[r][call].copy_(y)
        hs[r][call].copy_(h)


@pytest.mark.parametrize("world", [2, 3])
def test_reduce_add_norm_interpreted(world):
    """The fused all-reduce + bias + residual + norm against the unfused chain: the sum in rank
    order, ``+ bias``, then ``kernels.norm.add_norm`` (bit for bit) and its torch reference."""
    from kernels.norm import add_norm, add_norm_ref
    T, n, dtype = 3, 96, torch.float16  # a ragged row: BLOCK 128
    g = torch.Generator().manual_seed(world)
    xs = [torch.randn(T, n, generator=g).to(dtype).share_memory_() for _ in range(world)]
    residual, lbias = torch.randn(T, n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    w, b = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype), torch.randn(n, generator=g).to(dtype)
    bufs, pads = _shared_buffers(world)
    ys = [torch.zeros(len(FUSED_CASES), T, n, dtype=dtype).share_memory_() for _ in range(world)]
    hs = [torch.zeros(len(FUSED_CASES) + 1, T, n, dtype=dtype).share_memory_() for _ in range(world)]
    _run_ranks(world, _fused_rank, (world, n, xs, residual, lbias, w, b, bufs, pads, ys, hs), timeout=240)
    total = sum(x.float() for x in xs).to(dtype)  # fp32, rank order
    assert all(torch.equal(hs[r][-1], total) for r in range(world))
    for call, (rms, has_bias) in enumerate(FUSED_CASES):
        summed = total + lbias if has_bias else total
        want = add_norm(summed, residual, w, b if has_bias else None, 1e-5, rms)
        ref = add_norm_ref(summed, residual, w, b if has_bias else None, 1e-5, rms)
        for r in range(world):
            assert torch.equal(hs[r][call], want[1]) and torch.equal(ys[r][call], want[0]), (r, call)
            torch.testing.assert_close(ys[r][call], ref[0], rtol=1e-3, atol=2e-3)
    assert all(int(p.abs().sum()) == 0 for p in pads)


def _gather_rank(r, world, xs, bufs_t, pads_t, outs):
    ar = _interpreted(r, world, bufs_t, pads_t)
    outs[r][0].copy_(ar.all_gather_last_dim(xs[r]))
    ar(xs[r].clone().reshape(-1)[:1024])  # one program only: program 0's counter runs ahead
    outs[r][1].copy_(ar.all_gather_last_dim(xs[r] * 2))


@pytest.mark.parametrize("world", [2, 3])
def test_all_gather_last_dim_interpreted(world):
    """The peer-memory all-gather (a vocab-parallel LM head's logits) against ``torch.cat``
    of every rank's part, bit for bit: rows of 700 that straddle programs of 1,024 elements,
    before and after a call that only advances the first program's parity."""
    T, C, dtype = 3, 700, torch.float16
    g = torch.Generator().manual_seed(world)
    xs = [torch.randn(T, C, generator=g).to(dtype).share_memory_() for _ in range(world)]
    bufs, pads = _shared_buffers(world)
    outs = [torch.zeros(2, T, world * C, dtype=dtype).share_memory_() for _ in range(world)]
    _run_ranks(world, _gather_rank, (world, xs, bufs, pads, outs), timeout=240)
    for r in range(world):
        assert torch.equal(outs[r][0], torch.cat(xs, dim=-1)), r
        assert torch.equal(outs[r][1], torch.cat([x * 2 for x in xs], dim=-1)), r
    assert all(int(p.abs().sum()) == 0 for p in pads)


def _agreement_rank(r, world, port, q):
    import torch.distributed as dist
    from kernels.peer_memory import PeerMemory, _agree
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=world)
    seen = []
    # only the last rank fails: every rank must raise, naming it, and none go on alone
    try:
        _agree(dist.group.WORLD, r != world - 1, "handle" if r != world - 1 else "no P2P here", "sharing")
    except RuntimeError as e:
        seen.append(str(e))
    assert _agree(dist.group.WORLD, True, r, "sharing") == list(range(world))
    try:  # no CUDA in this process: every rank reports its own failure
        PeerMemory(4096, dist.group.WORLD, torch.device("cpu"))
    except RuntimeError as e:
        seen.append(str(e))
    dist.destroy_process_group()
    q.put((r, seen))


def test_peer_memory_ranks_fail_together():
    """Setting up peer memory is all or nothing: a rank that cannot share or map its
    buffer makes every rank raise (and fall back to NCCL together), never one rank alone,
    which would leave the other spinning on flags nobody raises."""
    world = 3
    q = mp.get_context("spawn").SimpleQueue()
    _run_ranks(world, _agreement_rank, (world, 29100 + os.getpid() % 1000, q), timeout=120)
    seen = dict(q.get() for _ in range(world))
    for r in range(world):
        sharing, cuda = seen[r]
        assert sharing == f"sharing failed on rank {world - 1}: no P2P here"
        assert cuda.startswith("sharing peer memory failed on rank 0: ")
        assert all(f"rank {p}: " in cuda for p in range(world))


def _gpu_rank(r, world, port, q):
    import torch.distributed as dist
    from kernels.allreduce import PeerAllReduce
    torch.cuda.set_device(r)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=world)
    ar = PeerAllReduce.create(dist.group.WORLD, torch.device("cuda", r))
    ar.counters.fill_(2**31 - 2)  # the calls below cross the int32 wrap of the call counters
    ar.bands.counters.fill_(2**31 - 2)
    ok = []
    for n, dtype in ((4096, torch.float16), (8 * 5120 + 3, torch.bfloat16), (200_000, torch.float16),
                     (1000, torch.float32)):
        g = torch.Generator(device="cuda").manual_seed(1000 * r + n)
        x = torch.randn(n, device="cuda", dtype=dtype, generator=g)
        want = x.clone()
        dist.all_reduce(want)
        got = ar(x.clone())
        ok.append(bool(torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2)))
    # inside a CUDA graph, 64 in a row (a decode step's worth), replayed with new inputs
    x = torch.empty(4096, device="cuda", dtype=torch.float16)
    bufs = [x.clone() for _ in range(64)]
    graph, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(s), torch.cuda.graph(graph):
        for b in bufs:
            ar(b)
    for _ in range(3):
        src = [torch.randn(4096, device="cuda", dtype=torch.float16) for _ in bufs]
        for b, v in zip(bufs, src):
            b.copy_(v)
        graph.replay()
        for b, v in zip(bufs, src):
            dist.all_reduce(v)
            ok.append(bool(torch.allclose(b.float(), v.float(), rtol=1e-2, atol=1e-2)))
    # the fused all-reduce + bias + residual + norm, bit for bit against the unfused kernels
    from kernels.norm import add_norm
    for T, rms in ((1, True), (16, False)):
        g = torch.Generator(device="cuda").manual_seed(r)
        x = torch.randn(T, 4096, device="cuda", dtype=torch.float16, generator=g)
        res, lb, w, b = (torch.randn(*s, device="cuda", dtype=torch.float16) for s in ((T, 4096), (4096,),
                                                                                       (4096,), (4096,)))
        dist.broadcast(res, 0)
        y, h = ar.add_norm(x, lb, res, w, None if rms else b, 1e-5, rms)
        want = add_norm(ar(x.clone()) + lb, res, w, None if rms else b, 1e-5, rms)
        ok.append(bool(torch.equal(y, want[0]) and torch.equal(h, want[1])))
    # the all-gather of a vocab-parallel LM head's logits, against NCCL's
    for T in (1, 16):
        x = torch.randn(T, 16000, device="cuda", dtype=torch.float16)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ok.append(bool(torch.equal(ar.all_gather_last_dim(x), torch.cat(parts, dim=-1))))
    ok += _gpu_exchange_gemv(ar, r, world)
    torch.cuda.synchronize()
    q.put((r, ok))
    dist.barrier()
    dist.destroy_process_group()


def _gpu_exchange_gemv(ar, r, world) -> list[bool]:
    """The row-parallel decode GEMV that sums its bands over the ranks (tests/test_exchange_gemv.py),
    7B shapes: against NCCL's sum of the float32 partials, the same bits on every rank, eagerly
    and 64 to a CUDA graph (a decode step's worth), replayed with new inputs."""
    import torch.distributed as dist
    from kernels.skinny_gemm import skinny_linear
    ok = []
    N, k = 4096, 5504 // world
    w = torch.randn(N, k, device="cuda", dtype=torch.float16) / k ** 0.5
    bias = torch.randn(N, device="cuda", dtype=torch.float16)
    dist.broadcast(bias, 0)
    for T in (1, 16):
        xs = [torch.randn(T, k, device="cuda", dtype=torch.float16) for _ in range(64)]
        res = [torch.randn(T, N, device="cuda", dtype=torch.float16) for _ in range(64)]
        for t in res:
            dist.broadcast(t, 0)
        outs = [None] * 64
        graph, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        skinny_linear(xs[0], w, bias, residual=res[0], exchange=ar.bands)  # compile outside the capture
        torch.cuda.synchronize()
        with torch.cuda.stream(s), torch.cuda.graph(graph):
            for i in range(64):
                outs[i] = skinny_linear(xs[i], w, bias, residual=res[i], exchange=ar.bands)
        for replay in range(3):
            for t in xs:
                t.copy_(torch.randn_like(t))
            graph.replay()
            for i in (0, 31, 63):
                part = xs[i].float() @ w.float().T
                dist.all_reduce(part)
                want = (part + bias.float()).half() + res[i]
                y = outs[i][0]
                mine = torch.cat((y.float().flatten(), outs[i][1].flatten()))
                theirs = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(theirs, mine)
                ok.append(bool(torch.allclose(y.float(), want.float(), atol=2e-2, rtol=1e-2)))
                ok.append(all(torch.equal(t, theirs[0]) for t in theirs))
    return ok


@pytest.mark.multi_gpu
def test_peer_all_reduce_matches_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q = mp.get_context("spawn").SimpleQueue()
    _run_ranks(2, _gpu_rank, (2, 29000 + os.getpid() % 1000, q), timeout=180)
    results = dict(q.get() for _ in range(2))
    assert all(results[0]) and all(results[1]), results
