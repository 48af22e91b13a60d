"""Quantization kernels at real shapes on a CUDA device (``pytest -m gpu -s``), with a
short timing table: batch-1 decode against the fp16 cuBLAS GEMV, W8A8 prefill against fp16."""
import pytest
import torch
import torch.nn.functional as F

from kernels.quant_act import add_norm_quant, add_norm_quant_ref
from kernels import pdl
from kernels.activation import bias_act
from kernels.norm import add_norm
from kernels.quant_gemm import wxa16_gemm, wxa16_gemm_ref
from kernels.skinny_gemm import skinny_linear
from kernels.w8a8_gemm import w8a8_gemm, w8a8_gemm_ref
from mii.model.layers import Linear
from mii.model.quant import quantize_weight
from mii.model.quant_linear import QuantLinear

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quantized(n: int, k: int, mode: str, group: int = 128) -> dict[str, torch.Tensor]:
    return quantize_weight(torch.randn(n, k, device="cuda") * 0.02, mode, group)


@pytest.mark.parametrize("mode", ["w8a16", "w4a16"])
@pytest.mark.parametrize("M", [1, 4, 16, 1023, 4096])  # 4096: the dequantize + cuBLAS path
@pytest.mark.parametrize("N,K", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wxa16_real_shapes(mode, M, N, K, dtype):
    t = quantized(N, K, mode)
    bits = 4 if mode == "w4a16" else 8
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    y = wxa16_gemm(x, t["qweight"], t["scales"], bias, bits)
    # fp32 accumulation on both sides; bf16 output rounding is 2^-9 relative, and for
    # M > 1 the bf16/fp16 tensor-core products are exact (integer weights), so 1e-2 / 2e-3.
    # From DEQUANT_MIN_M rows each weight is rounded once to the activation dtype (2^-9
    # relative in bf16, 2^-12 in fp16), errors that average out over K: the same bounds hold.
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel(y, wxa16_gemm_ref(x, t["qweight"], t["scales"], bias, bits)) < tol


# Split-K over several programs, uneven splits (86 K-tiles; steps of U tiles with a short
# last one), mma.sync and wgmma, group 64, N not a multiple of the tile, bf16: each against
# the reference, twice (the arrival counters must be back at zero, and the fixed-order
# reduction gives identical bits).
SKINNY_CASES = [  # (tile config, dtype)
    (dict(), torch.bfloat16),  # the default: mma.sync, operands converted in registers
    (dict(BN=64, BK=128, num_warps=4, num_stages=2, waves=8, U=4, A_REGS=False), torch.float16),  # wgmma
    (dict(BN=128, BK=64, num_warps=2, num_stages=3, waves=2, U=2), torch.float16),
]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("N,K,group", [(4096, 11008, 128), (1000, 4096, 64)])
@pytest.mark.parametrize("case", range(len(SKINNY_CASES)))
def test_skinny_split_k(bits, M, N, K, group, case):
    from kernels.skinny_gemm import skinny_config
    tiles, dtype = SKINNY_CASES[case]
    t = quantized(N, K, "w8a16" if bits == 8 else "w4a16", group)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    config = skinny_config(N, K, group, torch.cuda.get_device_properties(0).multi_processor_count, **tiles)
    y = wxa16_gemm(x, t["qweight"], t["scales"], bias, bits, config)
    ref = wxa16_gemm_ref(x, t["qweight"], t["scales"], bias, bits)
    assert rel(y, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    assert torch.equal(wxa16_gemm(x, t["qweight"], t["scales"], bias, bits, config), y)


@pytest.mark.parametrize("N,K", [(22016, 4096), (12288, 4096), (4096, 11008)])
def test_one_row_pipelined_loop(N, K):
    """One row against int8 weights (W8A16 at bs=1): programs of 16 tiles or more (the 7B
    gate_up and qkv, not down) run their loop pipelined through shared memory with their own
    carveout. The sums are the same in the same order, so the result must equal the
    unpipelined loop's bit for bit, eagerly and replayed in a graph after another GEMV (PDL)."""
    from kernels.quant_gemm import default_config
    t, t2 = quantized(N, K, "w8a16"), quantized(K, N, "w8a16")
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    bias = torch.randn(N, device="cuda", dtype=torch.float16)
    cfg = default_config(1, N, K, 128, 8, x.device)
    assert (cfg["LOOP_STAGES"] > 0) == (N != 4096)
    plain = dict(cfg, LOOP_STAGES=0, CARVEOUT=None)
    y = wxa16_gemm(x, t["qweight"], t["scales"], bias, 8)
    assert rel(y, wxa16_gemm_ref(x, t["qweight"], t["scales"], bias, 8)) < 2e-3
    assert torch.equal(y, wxa16_gemm(x, t["qweight"], t["scales"], bias, 8, plain))
    wxa16_gemm(y, t2["qweight"], t2["scales"], None, 8)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h = wxa16_gemm(x, t["qweight"], t["scales"], bias, 8)
        g = wxa16_gemm(h, t2["qweight"], t2["scales"], None, 8)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        h_ref = wxa16_gemm(x, t["qweight"], t["scales"], bias, 8, plain)
        assert torch.equal(h, h_ref)
        assert torch.equal(g, wxa16_gemm(h_ref, t2["qweight"], t2["scales"], None, 8))


@pytest.mark.parametrize("bits", [8, 4])
def test_skinny_in_cuda_graph(bits):
    """Decode replays a captured graph with new inputs: the split-K counters and partials
    allocated at capture must serve every replay."""
    t = quantized(4096, 4096, "w8a16" if bits == 8 else "w4a16")
    x = torch.randn(2, 4096, device="cuda", dtype=torch.float16)
    wxa16_gemm(x, t["qweight"], t["scales"], None, bits)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = wxa16_gemm(x, t["qweight"], t["scales"], None, bits)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel(y, wxa16_gemm_ref(x, t["qweight"], t["scales"], None, bits)) < 2e-3


def test_skinny_counters_survive_graphs_sharing_a_pool():
    """The engine's graphs share one memory pool: memory one graph frees during its capture
    serves the next capture, and the first graph's replays write there again. The split-K
    arrival counters persist across launches, so no capture may allocate them (counters
    allocated for the capture stream did: a mixed prefill graph's replay then overwrote them
    and the next decode step's bands were never reduced; test_gpu_shapes caught it). Graph B,
    captured after graph A in A's pool, must use the counters of the eager warm-up and still
    give the right result after A's replays."""
    from kernels import skinny_gemm

    w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16) * 0.02
    x = torch.randn(3, 4096, device="cuda", dtype=torch.float16)
    skinny_linear(x, w)  # compiles, and sizes the counters outside any capture
    torch.cuda.synchronize()
    before = {t.data_ptr() for t in skinny_gemm._LOCKS.values()}
    a, b = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(a):
        junk = [torch.full((4096,), 7, dtype=torch.int32, device="cuda") for _ in range(80)]
        stacked = torch.stack(junk)
        del junk
    with torch.cuda.graph(b, pool=a.pool()):
        y = skinny_linear(x, w)
    assert {t.data_ptr() for t in skinny_gemm._LOCKS.values()} == before
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        a.replay()
        b.replay()
        torch.cuda.synchronize()
        assert bool((stacked == 7).all())
        assert rel(y, F.linear(x.float(), w.float())) < 2e-3


@pytest.mark.parametrize("M", [1, 8, 16])
@pytest.mark.parametrize("N,K", [(12288, 4096), (4096, 11008), (128256, 2048), (768, 768)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_skinny_linear_real_shapes(M, N, K, dtype):
    """fp16/bf16 decode linears on the weight-streaming kernel, against an fp32 F.linear."""
    w = (torch.randn(N, K, device="cuda") * 0.02).to(dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    y = skinny_linear(x, w, bias)
    # the tensor cores multiply the fp16/bf16 operands exactly and sum in fp32, so the
    # output rounding bounds the error: 2^-9 relative for bf16, 2^-11 for fp16
    assert rel(y, F.linear(x.float(), w.float(), bias.float())) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("M", [1, 8, 16])
@pytest.mark.parametrize("N,K,kind", [(22016, 4096, "silu_and_mul"), (16384, 2048, "silu_and_mul"),
                                      (8192, 2048, "relu"), (3072, 768, "gelu_tanh")])
@pytest.mark.parametrize("weights", ["fp16", "bf16", "w8a16", "w4a16"])
def test_decode_gemv_activation_epilogue_real_shapes(M, N, K, kind, weights):
    """The decode MLP's up projection with its activation in the GEMV epilogue (7B, Llama-1B,
    OPT-1.3B and GPT-2 shapes) against the GEMV followed by the activation kernel."""
    dtype = torch.bfloat16 if weights == "bf16" else torch.float16
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    if weights in ("fp16", "bf16"):
        w = (torch.randn(N, K, device="cuda") * 0.02).to(dtype)
        y = skinny_linear(x, w, bias, act=kind)
        ref = bias_act(skinny_linear(x, w), bias, kind)
    else:
        t = quantized(N, K, weights)
        t["scales"] = t["scales"].t().contiguous().t()  # the layout QuantLinear keeps
        bits = 8 if weights == "w8a16" else 4
        y = wxa16_gemm(x, t["qweight"], t["scales"], bias, bits, act=kind)
        ref = bias_act(wxa16_gemm(x, t["qweight"], t["scales"], None, bits), bias, kind)
    # the same GEMV sums in the same order, and the epilogue rounds as the activation kernel does
    assert torch.equal(y, ref)


def _chain(x, res, layers):
    """A decode layer's kernels, as the engine launches them: norm, GEMV, activation, GEMV (fp16 and int8)."""
    for norm_w, w_up, q_down in layers:
        h, res = add_norm(x, res, norm_w, None, 1e-6, True)
        a = bias_act(skinny_linear(h, w_up), None, "silu_and_mul")
        x = wxa16_gemm(a, q_down["qweight"], q_down["scales"], None, 8)
    return x, res


def test_pdl_chain_in_cuda_graph():
    """Programmatic dependent launch lets each kernel start before the one before it ends.
    A graph of 12 such layers, replayed on new inputs, must give the same bits as the chain
    run eagerly with PDL off: a kernel that read its input before waiting would not."""
    if not pdl.supported(torch.device("cuda")):
        pytest.skip("PDL needs sm90+")
    H, I = 2048, 5632
    layers = [(torch.rand(H, device="cuda", dtype=torch.float16) + 0.5,
               (torch.randn(2 * I, H, device="cuda") * 0.02).half(), quantized(H, I, "w8a16")) for _ in range(12)]
    for q in (l[2] for l in layers):  # the layout QuantLinear keeps
        q["scales"] = q["scales"].t().contiguous().t()
    x = torch.randn(1, H, device="cuda", dtype=torch.float16)
    res = torch.randn(1, H, device="cuda", dtype=torch.float16)
    _chain(x, res, layers)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(x, res, layers)
    try:
        for _ in range(5):
            x.copy_(torch.randn_like(x))
            res.copy_(torch.randn_like(res))
            graph.replay()
            pdl.set_enabled(False)
            ref = _chain(x, res, layers)
            pdl.set_enabled(True)
            torch.cuda.synchronize()
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    finally:
        pdl.set_enabled(True)


@pytest.mark.parametrize("M", [1, 16, 4096])
@pytest.mark.parametrize("N,K", [(4096, 4096), (11008, 4096)])
def test_w8a8_real_shapes(M, N, K):
    t = quantized(N, K, "w8a8")
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    q, s, _ = add_norm_quant(x, None, torch.ones(K, device="cuda", dtype=torch.float16), None, 1e-6, True)
    y = w8a8_gemm(q, s, t["qweight"], t["scales"], None, torch.float16)
    assert rel(y, w8a8_gemm_ref(q, s, t["qweight"], t["scales"], None, torch.float16)) < 2e-3


def test_add_norm_quant_real_shape():
    x, r = (torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    q, s, h = add_norm_quant(x, r, w, None, 1e-6, True)
    q_ref, s_ref, h_ref = add_norm_quant_ref(x, r, w, None, 1e-6, True)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    assert (q.int() - q_ref.int()).abs().max() <= 1  # rsqrt.approx may move a rounding boundary


@pytest.mark.parametrize("mode", ["w8a16", "w4a16", "w8a8"])
def test_quant_linear_cuda_matches_cpu(mode):
    lin = Linear(4096, 1024, True, None, torch.float16)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
        lin.bias.normal_()
    ql = QuantLinear.from_linear(lin, mode, 128)
    x = torch.randn(7, 4096, dtype=torch.float16)
    y_cpu = ql(x)
    y_gpu = ql.cuda()(x.cuda()).cpu()
    assert rel(y_gpu, y_cpu) < 5e-3


def test_timing_printout():
    from triton.testing import do_bench
    rows = []
    for N, K in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        w16 = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
        t8, t4 = quantize_weight(w16, "w8a16", 128), quantize_weight(w16, "w4a16", 128)
        for M in (1, 16):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            fp16 = do_bench(lambda: F.linear(x, w16), return_mode="median")
            i8 = do_bench(lambda: wxa16_gemm(x, t8["qweight"], t8["scales"], None, 8), return_mode="median")
            i4 = do_bench(lambda: wxa16_gemm(x, t4["qweight"], t4["scales"], None, 4), return_mode="median")
            rows.append(f"M={M:<5} {N}x{K}: fp16 {fp16 * 1e3:7.1f} us  w8a16 {i8 * 1e3:7.1f} us ({fp16 / i8:.2f}x)"
                        f"  w4a16 {i4 * 1e3:7.1f} us ({fp16 / i4:.2f}x)")
    for N, K in [(4096, 4096), (11008, 4096)]:
        w16 = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
        t = quantize_weight(w16, "w8a8", 128)
        x = torch.randn(4096, K, device="cuda", dtype=torch.float16)
        xq, xs, _ = add_norm_quant(x, None, torch.ones(K, device="cuda", dtype=torch.float16), None, 1e-6, True)
        fp16 = do_bench(lambda: F.linear(x, w16), return_mode="median")
        i8 = do_bench(lambda: w8a8_gemm(xq, xs, t["qweight"], t["scales"], None, torch.float16), return_mode="median")
        rows.append(f"M=4096  {N}x{K}: fp16 {fp16 * 1e3:7.1f} us  w8a8 {i8 * 1e3:7.1f} us ({fp16 / i8:.2f}x)")
    print("\n" + "\n".join(rows))
