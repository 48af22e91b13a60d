"""The decode GEMV (``kernels/skinny_gemm.py``, the weight-streaming kernel) against its
references for every weight kind (fp16/fp32, int8, int4, and int8 x with int8 weights): its
tile and split-K choices, the one-row (BM = 1) path, and the activation fused into its
epilogue. Triton's interpreter on CPU."""
import pytest
import torch
import torch.nn.functional as F

# First: without CUDA it switches on Triton's interpreter before anything imports kernels.
from tests.quant_helpers import CONFIGS, DEV, DTYPES, random_qweight, rel  # noqa: I001

from kernels.activation import bias_act_ref
from kernels.quant_act import quant_per_token_ref
from kernels.quant_gemm import wxa16_gemm, wxa16_gemm_ref
from kernels.skinny_gemm import skinny_config, skinny_linear
from kernels.w8a8_gemm import w8a8_gemm, w8a8_gemm_ref
from mii.model.layers import Linear


@pytest.mark.parametrize("M,N,K", [(1, 40, 128), (5, 70, 256), (16, 33, 384), (2, 24, 576), (3, 16, 96)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [None, "skinny_split3", "skinny_steps"])
def test_skinny_linear_matches_linear(M, N, K, dtype, config):
    """The weight-streaming kernel on a float weight (fp16 decode linears) against F.linear.
    K = 576 (SmolLM2's hidden size) and 96 are no multiple of the default 128-wide K tile: the
    default config must take smaller tiles rather than drop K's tail."""
    w = (torch.randn(N, K) * 0.05).to(dtype).to(DEV)
    x = torch.randn(M, K, dtype=dtype, device=DEV)
    bias = torch.randn(N, dtype=dtype, device=DEV)
    ref = F.linear(x.float(), w.float(), bias.float())
    y = skinny_linear(x, w, bias, config=CONFIGS[config] if config else None)
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel(y, ref) < 2e-3  # fp32 sums of the same products; fp16 output rounding is 2^-11


def test_float_tiles_split_within_one_wave():
    """The fp16 decode tiles (FLOAT_TILES) split K only as far as one wave of programs holds
    and so that no program streams more than 8 tiles; the device's shared memory caps the
    pipeline's stages (a [64, 256] fp16 tile and a [16, 256] x tile: 40 KB a stage)."""
    from kernels.skinny_gemm import FLOAT_TILES
    H100 = dict(sms=132, smem=232448)
    qkv = skinny_config(3072, 2048, 2048, **H100, **FLOAT_TILES)  # Llama-1B: 48 bands of 8 tiles
    assert (qkv["SPLIT_K"], qkv["BK"], qkv["num_stages"]) == (1, 256, 4)
    assert skinny_config(2048, 8192, 8192, **H100, **FLOAT_TILES)["SPLIT_K"] == 4  # 32 bands of 32 tiles
    assert skinny_config(4096, 11008, 11008, **H100, **FLOAT_TILES)["SPLIT_K"] == 2  # 3 would start a 2nd wave
    assert skinny_config(2048, 8192, 8192, 108, **FLOAT_TILES, smem=166912)["num_stages"] == 3  # A100
    assert skinny_config(2048, 8192, 8192, 58, **FLOAT_TILES, smem=101376)["num_stages"] == 2  # L4
    assert skinny_config(2048, 576, 576, **H100, **FLOAT_TILES)["BK"] == 64  # K = 9 x 64: no ragged tail
    assert skinny_config(2048, 8192, 8192, **H100, **FLOAT_TILES, bits=32)["num_stages"] == 2  # fp32: 80 KB a stage


ROW = dict(kind="skinny", BM=1, BN=16, BK=32, U=1, A_REGS=True, num_warps=4, num_stages=1)


@pytest.mark.parametrize("bits", [16, 8, 4, "8x8"])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("BK,group", [(32, 32), (32, 64), (128, 32)])
@pytest.mark.parametrize("loop_stages", [0, 3])
def test_one_row_path_matches_reference(bits, split, BK, group, loop_stages):
    """BM = 1 (one row of x, summed on the CUDA cores rather than the MMA) for every weight
    kind, K whole or split, and a K tile inside one scale group or (128 over groups of 32)
    spanning four. Exact int32 sums for int8 x; otherwise fp32 sums of the same products.
    LOOP_STAGES: the loop as Triton pipelines it on a GPU (the interpreter runs it as is)."""
    torch.manual_seed(split + BK)
    N, K = 37, 256
    cfg = dict(ROW, BK=BK, SPLIT_K=split, LOOP_STAGES=loop_stages)
    x = torch.randn(1, K, dtype=torch.float16, device=DEV)
    bias = torch.randn(N, dtype=torch.float16, device=DEV)
    if bits == 16:
        w = (torch.randn(N, K) * 0.05).half().to(DEV)
        y, ref = skinny_linear(x, w, bias, config=cfg), F.linear(x.float(), w.float(), bias.float())
    elif bits == "8x8":
        xq, xs = quant_per_token_ref(x)
        wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEV)
        ws = torch.rand(N, device=DEV) * 0.002 + 0.0005
        y, ref = w8a8_gemm(xq, xs, wq, ws, bias, torch.float16, cfg), w8a8_gemm_ref(xq, xs, wq, ws, bias, torch.float16)
    else:
        qweight, scales = random_qweight(N, K, bits, group, group_major=True)
        y, ref = wxa16_gemm(x, qweight, scales, bias, bits, config=cfg), wxa16_gemm_ref(x, qweight, scales, bias, bits)
    assert y.shape == (1, N) and rel(y, ref) < 2e-3  # fp16 output rounding is 2^-11
    with pytest.raises(ValueError, match="at most BM=1 rows"):
        skinny_linear(torch.randn(2, K, device=DEV), torch.randn(N, K, device=DEV), None, config=cfg)


def test_one_row_config_for_int8_weights():
    """W8A16 takes the one-row path at M = 1 only, splitting K as far as one wave of its
    programs (4 an SM) holds; a tile may span groups smaller than it but must divide K."""
    from kernels.quant_gemm import default_config
    from kernels.skinny_gemm import ROW_TILES
    dev = torch.device("cpu")  # the interpreter counts 4 SMs
    assert default_config(1, 64, 512, 128, 8, dev)["BM"] == 1 and default_config(2, 64, 512, 128, 8, dev)["BM"] == 16
    assert default_config(1, 64, 512, 128, 4, dev)["BM"] == 16  # int4 stays on the MMA
    H100 = dict(sms=132, smem=232448)
    assert skinny_config(4096, 11008, 128, **H100, **ROW_TILES, bits=8)["SPLIT_K"] == 8  # 64 bands x 8 = 512 <= 528
    assert skinny_config(12288, 4096, 128, **H100, **ROW_TILES, bits=8)["SPLIT_K"] == 2
    assert skinny_config(4096, 4096, 32, **H100, **ROW_TILES, bits=8)["BK"] == 128  # four groups of 32
    assert skinny_config(4096, 11008, 64, **H100, **dict(ROW_TILES, BK=512), bits=8)["BK"] == 256  # 11008 = 43 x 256
    # Programs streaming 16 tiles or more pipeline their loop, release the next kernel 6 steps
    # early and ask for a quarter of the SM as shared memory; shorter streams do neither.
    for N, K, tiles in ((22016, 4096, 32), (12288, 4096, 16), (4096, 11008, 11), (4096, 4096, 4)):
        cfg = skinny_config(N, K, 128, **H100, **ROW_TILES, bits=8)
        assert -(-(K // cfg["BK"]) // cfg["SPLIT_K"]) == tiles
        long = tiles >= 16
        assert (cfg["LOOP_STAGES"], cfg["RELEASE"], cfg["CARVEOUT"]) == ((3, 6, 25) if long else (0, 2, None))
    assert skinny_config(22016, 4096, 128, **H100, bits=8)["LOOP_STAGES"] == 0  # MMA tiles: the launch's stages


@pytest.mark.parametrize("kind", ["silu_and_mul", "gelu_tanh_and_mul", "relu", "gelu"])
@pytest.mark.parametrize("bits", [16, 8, 4, "8x8"])
@pytest.mark.parametrize("M,config", [(1, "skinny_split3"), (1, None), (5, "skinny_split7"), (3, None), (17, None)])
def test_decode_gemv_fuses_activation(kind, bits, M, config):
    """act(x W^T + b) with the activation in the decode GEMV's epilogue, against the GEMM's
    torch reference rounded to fp16 and then the activation's torch reference. A gated kind
    takes W = [gate; up] (37 outputs: bands of gate/up row pairs end part-full). 17 rows is
    past the decode kernel: the weight-only path then runs the activation kernel after it,
    and W8A8 (bits "8x8": int8 x and weight) refuses the activation."""
    K, group = 128, 32
    gated = kind.endswith("_and_mul")
    N = 2 * 37 if gated else 37
    x = torch.randn(M, K, dtype=torch.float16, device=DEV)
    bias = torch.randn(N, dtype=torch.float16, device=DEV)
    cfg = CONFIGS[config] if config else None
    if bits == 16:
        if M > 16:
            return  # skinny_linear is the decode kernel only
        w = (torch.randn(N, K) * 0.05).half().to(DEV)
        y = skinny_linear(x, w, bias, config=cfg, act=kind)
        u = F.linear(x.float(), w.float()).half()
    elif bits == "8x8":
        xq, xs = quant_per_token_ref(x)
        wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEV)
        ws = torch.rand(N, device=DEV) * 0.002 + 0.0005
        if M > 16:
            with pytest.raises(ValueError, match="only in the decode kernel"):
                w8a8_gemm(xq, xs, wq, ws, bias, torch.float16, act=kind)
            return
        y = w8a8_gemm(xq, xs, wq, ws, bias, torch.float16, cfg, act=kind)
        u = w8a8_gemm_ref(xq, xs, wq, ws, None, torch.float16)
    else:
        qweight, scales = random_qweight(N, K, bits, group, group_major=True)
        y = wxa16_gemm(x, qweight, scales, bias, bits, config=cfg, act=kind)
        u = wxa16_gemm_ref(x, qweight, scales, None, bits)
    ref = bias_act_ref(u, bias, kind)
    assert y.shape == ref.shape == (M, N // 2 if gated else N)
    # the kernel adds the bias and applies the activation in fp16 as the activation kernel
    # does; only the GEMM's summation order differs, which can move its fp16 rounding by an ulp
    assert rel(y, ref) < 2e-3


def test_decode_gemv_activation_checks():
    w = torch.randn(9, 32, device=DEV)
    with pytest.raises(ValueError, match="odd 9"):
        skinny_linear(torch.randn(1, 32, device=DEV), w, act="silu_and_mul")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        skinny_linear(torch.randn(1, 32, device=DEV), w, act="swish")
    down = Linear(32, 8, False, "row", torch.float32)
    with pytest.raises(ValueError, match="row-parallel"):
        down(torch.randn(1, 32, device=DEV), act="relu")


def test_skinny_linear_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="does not fit weight"):
        skinny_linear(torch.randn(1, 64, device=DEV), torch.randn(8, 32, device=DEV))
