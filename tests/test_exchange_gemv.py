"""A row-parallel decode GEMV that sums its bands over the ranks in its own epilogue
(``kernels.skinny_gemm.skinny_gemm``'s exchange), the step that lets TP ranks fold their norms.

On CPU: real processes under Triton's interpreter sharing memory as GPUs do over NVLink
(tests/test_allreduce.py), each rank holding its own slice of K. Every rank must write the
same bits, and those must be the sum over the ranks' slices (torch, float32), plus the bias,
rounded, plus the residual, with the band statistics of that sum, over repeated calls (both
parities of every band's region, then the first again, where the last call's words
still lie). On two GPUs the engine-level test
is ``tests/test_tensor_parallel_gpu.py``: TP=2 folds there and tracks TP=1, and
``tests/test_allreduce.py`` checks the GEMV against NCCL. On one GPU (gpu): both ranks on
their own streams, compiled.
"""
import pytest
import torch

from tests.test_allreduce import _interpreted, _run_ranks, _shared_buffers

CALLS = 3


def _case(world: int, M: int, N: int, K: int, seed: int):
    """Every rank's x [M, K / world] and weight [N, K / world] per call; bias and residual."""
    g = torch.Generator().manual_seed(seed)
    k = K // world
    xs = [torch.randn(CALLS, M, k, generator=g).half().share_memory_() for _ in range(world)]
    ws = [(torch.randn(N, k, generator=g) / k ** 0.5).half().share_memory_() for _ in range(world)]
    bias = torch.randn(N, generator=g).half().share_memory_()
    res = torch.randn(CALLS, M, N, generator=g).half().share_memory_()
    return xs, ws, bias, res


def _rank(r, world, split, rms, start, case, bufs_t, pads_t, hs, stats):
    ar = _interpreted(r, world, bufs_t, pads_t)  # sets TRITON_INTERPRET before triton loads
    ar.bands.counters.fill_(start)
    from kernels.skinny_gemm import skinny_config, skinny_gemm
    xs, ws, bias, res = case
    M, k = xs[r].shape[1:]
    N = ws[r].shape[0]
    cfg = skinny_config(N, k, k, 4, BN=32, BK=32)
    cfg.pop("kind")
    cfg["SPLIT_K"] = split
    for call in range(CALLS):
        y = torch.empty(M, N, dtype=torch.float16)
        st = torch.empty(N // 32, 2, M)
        skinny_gemm(xs[r][call], ws[r], ws[r], bias, y, 16, k, cfg, residual=res[call], stats=st, rms=rms,
                    exchange=ar.bands)
        hs[r][call].copy_(y)
        stats[r][call].copy_(st)


# start: the bands' call counters at first; 2^31 - 2 wraps them on the way (int32, after about a
# day of 7B decode steps), where the parity and the words' call numbers must stay right
@pytest.mark.parametrize("world,M,split,rms,start", [(2, 1, 1, True, 0), (2, 3, 2, False, 2**31 - 2),
                                                     (3, 2, 1, True, 0)])
def test_gemv_sums_its_bands_over_the_ranks(world, M, split, rms, start):
    N, K = 128, 64 * world
    case = _case(world, M, N, K, seed=10 * world + M)
    xs, ws, bias, res = case
    bufs, pads = _shared_buffers(world)
    hs = [torch.zeros(CALLS, M, N, dtype=torch.float16).share_memory_() for _ in range(world)]
    stats = [torch.zeros(CALLS, N // 32, 2, M).share_memory_() for _ in range(world)]
    _run_ranks(world, _rank, (world, split, rms, start, case, bufs, pads, hs, stats), timeout=300)
    for call in range(CALLS):
        for r in range(1, world):  # the sum in rank order: the same bits everywhere
            assert torch.equal(hs[r][call], hs[0][call]) and torch.equal(stats[r][call], stats[0][call])
        total = sum(xs[r][call].float() @ ws[r].float().T for r in range(world))
        want = (total + bias.float()).half() + res[call]
        # fp16 outputs of O(1): a rounding step of the sum or the residual add
        torch.testing.assert_close(hs[0][call], want, atol=4e-3, rtol=2e-3)
        h = hs[0][call].float().T.reshape(N // 32, 32, M)  # [bands, columns, rows]
        if rms:
            want_st = torch.stack((h.square().sum(1), torch.zeros(N // 32, M)), 1)
        else:
            want_st = torch.stack((h.sum(1), (h - h.mean(1, keepdim=True)).square().sum(1)), 1)
        torch.testing.assert_close(stats[0][call], want_st, atol=1e-3, rtol=1e-4)


def _two_streams(_):
    """Both ranks of a TP=2 pair in one process on one GPU, each replaying its own CUDA graph
    on its own stream, so their GEMVs run at once as on two GPUs: compiled (PTX, not the
    interpreter), with the GPU's own memory ordering for the words and their call numbers.
    Graphs, as the engine runs them: a launch that allocates (cudaMalloc) may wait for the
    spinning peer kernel, which never finishes alone."""
    from kernels.band_exchange import BandExchange, MAX_BANDS
    from kernels.skinny_gemm import skinny_linear
    world, N, k = 2, 4096, 2048  # the 7B o_proj's share at TP=2: one program per band, no split-K
    areas = [torch.zeros(BandExchange.area_bytes(world), dtype=torch.uint8, device="cuda") for _ in range(world)]
    bufs = torch.tensor([a.data_ptr() for a in areas], dtype=torch.int64, device="cuda")
    # the call counters 2 short of their int32 wrap: the 6 calls below cross it compiled, where
    # a signed `% 2` would give -1 (the interpreter's numpy remainder would not)
    ex = [BandExchange(bufs, torch.full((MAX_BANDS,), 2**31 - 2, dtype=torch.int32, device="cuda"), r, world)
          for r in range(world)]
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(N, k, device="cuda", generator=g).half() / k ** 0.5 for _ in range(world)]
    bias = torch.randn(N, device="cuda", generator=g).half()
    for T in (1, 16):
        xs = [torch.zeros(T, k, device="cuda", dtype=torch.float16) for _ in range(world)]
        res = torch.zeros(T, N, device="cuda", dtype=torch.float16)
        graphs, outs = [], []
        for r in range(world):
            graph, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            with torch.cuda.stream(s), torch.cuda.graph(graph):  # compiles, launches nothing
                outs.append(skinny_linear(xs[r], ws[r], bias, residual=res, exchange=ex[r]))
            graphs.append((graph, s))
        for _ in range(3):  # both parities, then the first again
            for t in (*xs, res):
                t.copy_(torch.randn(t.shape, device="cuda", generator=g))
            torch.cuda.synchronize()
            for graph, s in graphs:
                with torch.cuda.stream(s):
                    graph.replay()
            torch.cuda.synchronize()
            want = (sum(x.float() @ w.float().T for x, w in zip(xs, ws)) + bias.float()).half() + res
            assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
            torch.testing.assert_close(outs[0][0], want, atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
def test_band_exchange_compiled_on_one_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    _run_ranks(1, _two_streams, (), timeout=180)  # a word never seen would spin: fail, not hang
