"""The persistent GEMV-chain experiment (benchmarks/persistent_chain.py) computes each GEMV right.

On CPU the interpreter runs one program, which takes every item in order (a wait there
would never end, so every dependency must already be met by the order alone); on a GPU
every program is resident and the waits are real."""
import pytest
import torch

from benchmarks.persistent_chain import Chain, layer_chain


def _assert_each_gemv(chain: Chain) -> None:
    # each GEMV against fp32 torch on the input the kernel itself read, so errors do not compound
    for g in range(len(chain.shapes)):
        ref = chain.weight(g).float() @ chain.x_of(g).float()
        torch.testing.assert_close(chain.y_of(g).float(), ref, rtol=2e-3, atol=2e-3)


def test_chain_matches_torch_and_leaves_counters_zero():
    # K-slices of 32 and 64: split-K with 2-4 slices, the o-like GEMV reading part of the qkv-like output
    chain = Chain([(96, 32, 32), (64, 64, 32), (128, 64, 64), (32, 128, 32)] * 2, "cpu", BN=16, BK=16,
                  num_warps=1, stages=2)
    chain.launch()
    _assert_each_gemv(chain)
    assert int(chain.cnt.abs().sum()) == 0  # ready for the next launch
    first = chain.act.clone()
    chain.act[chain.shapes[0][1]:] = 0
    chain.launch()
    assert torch.equal(chain.act, first)  # partials summed in a fixed order: the same bits


def test_chain_rejects_shapes_it_cannot_tile():
    with pytest.raises(ValueError, match="cannot read"):
        Chain([(32, 32, 32), (64, 64, 32)], "cpu", BN=16, BK=16)
    with pytest.raises(ValueError, match="does not tile"):
        Chain([(40, 32, 32)], "cpu", BN=16, BK=16)


@pytest.mark.gpu
def test_chain_on_gpu_every_program_resident():
    chain = Chain(layer_chain("llama-1b")[:8], "cuda")
    chain.fill_gpu()
    for _ in range(2):
        chain.launch()
        torch.cuda.synchronize()
        assert chain.timed_out_waits() == 0
        _assert_each_gemv(chain)
