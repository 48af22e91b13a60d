"""W8A8 kernels against their references (Triton's interpreter on CPU): the int8 x int8 GEMM
(MMA tiles, the decode weight-streaming kernel, the TMA prefill kernel) and the per-token
activation quantization, alone and fused into the residual-add norm."""
import pytest
import torch

# First: without CUDA it switches on Triton's interpreter before anything imports kernels.
from tests.quant_helpers import CONFIGS, DEV, DTYPES, rel  # noqa: I001

from kernels.quant_act import add_norm_quant, add_norm_quant_ref, quant_per_token, quant_per_token_ref
from kernels.skinny_gemm import skinny_config
from kernels.w8a8_gemm import decode_bk, w8a8_gemm, w8a8_gemm_ref
from kernels.w8a8_gemm import default_config as default_w8a8_config


@pytest.mark.parametrize("M,N,K", [(1, 40, 100), (3, 70, 64), (17, 33, 200)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_w8a8_gemm_matches_reference(M, N, K, dtype, with_bias):
    xq = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=DEV)
    wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEV)
    x_scale = torch.rand(M, device=DEV) * 0.02 + 0.005  # realistic: max|x| / 127
    w_scale = torch.rand(N, device=DEV) * 0.002 + 0.0005
    bias = torch.randn(N, dtype=dtype, device=DEV) if with_bias else None
    ref = w8a8_gemm_ref(xq, x_scale, wq, w_scale, bias, dtype)
    # K = 100, 200 are ragged for BK = 128 and 32; the int32 sums are exact, so only the
    # fp32 epilogue's rounding (and fp16 output) separates kernel and reference.
    for cfg in (None, dict(BM=16, BN=32, BK=32, GROUP_M=2, num_warps=4, num_stages=1)):
        assert rel(w8a8_gemm(xq, x_scale, wq, w_scale, bias, dtype, cfg), ref) < 1e-3


@pytest.mark.parametrize("M,N,K", [(1, 40, 96), (5, 70, 256), (16, 33, 576)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_w8a8_decode_skinny_matches_reference(M, N, K, dtype, with_bias):
    """Decode sizes take the weight-streaming kernel with int8 x: ragged N, K tiles of 32, 64
    and 128, K whole or split over 2-9 programs whose int32 partials are summed exactly."""
    xq = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=DEV)
    wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEV)
    x_scale = torch.rand(M, device=DEV) * 0.02 + 0.005
    w_scale = torch.rand(N, device=DEV) * 0.002 + 0.0005
    bias = torch.randn(N, dtype=dtype, device=DEV) if with_bias else None
    ref = w8a8_gemm_ref(xq, x_scale, wq, w_scale, bias, dtype)
    bk = decode_bk(K)
    assert bk == {96: 32, 256: 128, 576: 64}[K]
    configs = [None, skinny_config(N, K, bk, 4, BN=32, BK=bk, waves=16, min_tiles=1),
               dict(CONFIGS["skinny_steps"])]  # three K tiles a step, some last steps short
    assert default_w8a8_config(M, N, K)["kind"] == "skinny" and configs[1]["SPLIT_K"] > 1
    for cfg in configs:
        y = w8a8_gemm(xq, x_scale, wq, w_scale, bias, dtype, cfg)
        if DEV == "cpu":  # the same int32 sums and the same fp32 ops in the same order
            assert torch.equal(y, ref)
        else:  # the GPU may fuse the epilogue's multiply and bias add
            assert rel(y, ref) < 1e-3


@pytest.mark.parametrize("M,N,K", [(1, 40, 96), (37, 70, 64), (70, 33, 208)])
def test_w8a8_gemm_tma_matches_reference(M, N, K):
    """The TMA-descriptor kernel (prefill on Hopper): ragged M, N and K % BK != 0 rely on
    the descriptor's zero fill at the edges. TMA rows must be 16-byte aligned, so K % 16 == 0."""
    xq = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=DEV)
    wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEV)
    x_scale, w_scale = torch.rand(M, device=DEV) * 0.02, torch.rand(N, device=DEV) * 0.002
    bias = torch.randn(N, dtype=torch.float16, device=DEV)
    cfg = dict(BM=32, BN=32, BK=64, GROUP_M=2, num_warps=4, num_stages=2, TMA=True)
    y = w8a8_gemm(xq, x_scale, wq, w_scale, bias, torch.float16, cfg)
    assert rel(y, w8a8_gemm_ref(xq, x_scale, wq, w_scale, bias, torch.float16)) < 1e-3


@pytest.mark.parametrize("T,H", [(1, 64), (3, 100), (17, 96)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_norm_quant_matches_reference(T, H, dtype, rms, with_residual):
    x = torch.randn(T, H, dtype=dtype, device=DEV)
    residual = torch.randn(T, H, dtype=dtype, device=DEV) if with_residual else None
    weight = torch.randn(H, dtype=dtype, device=DEV)
    bias = None if rms else torch.randn(H, dtype=dtype, device=DEV)
    q, scale, h = add_norm_quant(x, residual, weight, bias, 1e-5, rms)
    q_ref, scale_ref, h_ref = add_norm_quant_ref(x, residual, weight, bias, 1e-5, rms)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (T,)
    assert torch.equal(h, h_ref)  # the residual sum is the same rounded add
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    # The norm's fp32 statistics may differ in the last bit (reduction order, rsqrt), which
    # can move a value across a rounding boundary: allow one step of the int8 grid.
    assert (q.int() - q_ref.int()).abs().max().item() <= 1
    assert (q.int() != q_ref.int()).float().mean().item() < 0.02


@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_per_token_matches_reference(dtype):
    y = torch.randn(5, 77, dtype=dtype, device=DEV) * 3
    y[2] = 0  # an all-zero row: scale stays finite and q is 0
    q, scale = quant_per_token(y)
    q_ref, scale_ref = quant_per_token_ref(y)
    assert torch.isfinite(scale).all() and not q[2].any()
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    assert (q.int() - q_ref.int()).abs().max().item() <= 1
    # round to nearest: |y - q * scale| <= scale / 2 per element (plus fp32 slack)
    assert ((q.float() * scale[:, None] - y.float()).abs() <= scale[:, None] * 0.5001 + 1e-7).all()
