"""Weight-only (W8A16 / W4A16) GEMMs against their references (Triton's interpreter on CPU):
int4 packing, ``wxa16_gemm`` at decode and prefill sizes and under forced split-K and tile
configs, and the dequantized weight that large prefills hand to cuBLAS. The decode GEMV
shared with the other weight kinds is in test_skinny_gemm.py."""
import pytest
import torch

# First: without CUDA it switches on Triton's interpreter before anything imports kernels.
from tests.quant_helpers import CONFIGS, DEV, DTYPES, random_qweight, rel  # noqa: I001

from kernels.quant_gemm import pack_int4, unpack_int4, wxa16_gemm, wxa16_gemm_ref


def test_int4_pack_roundtrip():
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


# M: batch-1 decode and a small decode batch (the M <= 16 split-K kernel), ragged prefill
# (GEMM tiles). N: never a block multiple.
GEMM_CASES = [(1, 40, 128, 32), (3, 40, 128, 64), (16, 70, 256, 64), (17, 70, 256, 64)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M,N,K,group", GEMM_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_major", [False, True])
def test_wxa16_gemm_matches_reference(bits, M, N, K, group, dtype, group_major):
    qweight, scales = random_qweight(N, K, bits, group, group_major)
    x = torch.randn(M, K, dtype=dtype, device=DEV)
    bias = torch.randn(N, dtype=dtype, device=DEV)
    ref = wxa16_gemm_ref(x, qweight, scales, bias, bits)
    y = wxa16_gemm(x, qweight, scales, bias, bits)
    assert y.dtype == dtype and y.shape == (M, N)
    # Both sum exact integer x float products in fp32; only summation order and the
    # final rounding differ: fp16 output rounding is 2^-11 relative.
    assert rel(y, ref) < 2e-3


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("M", [1, 5])
def test_wxa16_split_k_and_tiles(bits, name, M):
    cfg = CONFIGS[name]
    N, K, group = 50, 224, 32  # 7 K-tiles over 3 or 7 splits (uneven, one each), or 3 steps of 3 (one short)
    qweight, scales = random_qweight(N, K, bits, group)
    x = torch.randn(M, K, device=DEV)
    bias = torch.randn(N, device=DEV)
    ref = wxa16_gemm_ref(x, qweight, scales, bias, bits)
    assert rel(wxa16_gemm(x, qweight, scales, bias, bits, config=cfg), ref) < 1e-5
    # the arrival counters are back at zero: a second call sums the same partials again
    assert rel(wxa16_gemm(x, qweight, scales, bias, bits, config=cfg), ref) < 1e-5


def test_wxa16_skinny_rejects_too_many_rows():
    qweight, scales = random_qweight(40, 64, 8, 32)
    with pytest.raises(ValueError, match="at most BM=16 rows, got M=17"):
        wxa16_gemm(torch.randn(17, 64, device=DEV), qweight, scales, None, 8, config=CONFIGS["skinny_split3"])


def test_wxa16_keeps_leading_dims():
    qweight, scales = random_qweight(24, 64, 8, 32)
    x = torch.randn(2, 3, 64, device=DEV)
    assert rel(wxa16_gemm(x, qweight, scales, None, 8), wxa16_gemm_ref(x, qweight, scales, None, 8)) < 1e-5


@pytest.mark.parametrize("mode,bits", [("w8a16", 8), ("w4a16", 4)])
def test_dequantize_for_cublas_prefill_matches_reference(mode, bits):
    """The weight that large-M steps hand to cuBLAS is the reference dequantization."""
    from kernels.quant_gemm import dequantize, dequantize_ref
    from mii.model.quant import quantize_weight
    t = quantize_weight(torch.randn(96, 256) * 0.02, mode, 64)
    ref = dequantize_ref(t["qweight"], t["scales"], bits)
    assert torch.equal(dequantize(t["qweight"], t["scales"], bits, torch.float32), ref)
    half = dequantize(t["qweight"], t["scales"], bits, torch.float16)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), ref, rtol=2 ** -10, atol=0)
