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


def _interpreted_rank(r, world, n, block, xs, bufs_t, pads_t, outs):
    os.environ["TRITON_INTERPRET"] = "1"  # a fresh spawned process: before triton loads
    from kernels.allreduce import SLOT0, _one_shot_kernel
    bufs = torch.tensor([b.data_ptr() for b in bufs_t], dtype=torch.int64)
    pads = torch.tensor([p.data_ptr() for p in pads_t], dtype=torch.int64)
    for call in range(outs[r].shape[0]):
        x = xs[r] * (call + 1)
        _one_shot_kernel[(triton_cdiv(n, block),)](x, bufs, pads, n, RANK=r, W=world, BLOCK=block, SLOT=SLOT0)
        outs[r][call].copy_(x)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("world,dtype", [(2, torch.float16), (3, torch.float32)])
def test_one_shot_all_reduce_interpreted(world, dtype):
    n, block, calls = 1100, 1024, 2  # two programs, the second ragged
    g = torch.Generator().manual_seed(world)
    xs = [torch.randn(n, generator=g).to(dtype).share_memory_() for _ in range(world)]
    bufs = [torch.zeros(n * 4, dtype=torch.uint8).share_memory_() for _ in range(world)]
    pads = [torch.zeros(4096, dtype=torch.int32).share_memory_() for _ in range(world)]
    outs = [torch.zeros(calls, n, dtype=dtype).share_memory_() for _ in range(world)]
    _run_ranks(world, _interpreted_rank, (world, n, block, xs, bufs, pads, outs), timeout=240)
    for call in range(calls):
        want = sum((x * (call + 1)).float() for x in xs).to(dtype)  # fp32, rank order
        for r in range(world):
            assert torch.equal(outs[r][call], want), (r, call)
    assert all(int(p.abs().sum()) == 0 for p in pads)  # every flag raised was lowered


def _gpu_rank(r, world, port, q):
    import torch.distributed as dist
    from kernels.allreduce import PeerAllReduce
    torch.cuda.set_device(r)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=world)
    ar = PeerAllReduce(dist.group.WORLD, torch.device("cuda", r))
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
    torch.cuda.synchronize()
    q.put((r, ok))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.multi_gpu
def test_peer_all_reduce_matches_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q = mp.get_context("spawn").SimpleQueue()
    _run_ranks(2, _gpu_rank, (2, 29000 + os.getpid() % 1000, q), timeout=180)
    results = dict(q.get() for _ in range(2))
    assert all(results[0]) and all(results[1]), results
