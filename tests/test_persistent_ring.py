"""The Gluon ring version of the persistent GEMV chain (benchmarks/persistent_ring.py).

The interpreter does not run Gluon, so on CPU this checks the item records the kernel reads
everything from: walking the items in their global order with torch, using only the records'
fields as the kernel does, must give every GEMV of the chain. On a GPU the kernel itself runs
with every program resident."""
import pytest
import torch

from benchmarks.persistent_chain import layer_chain

gluon = pytest.importorskip("triton.experimental.gluon")  # triton >= 3.5


def _walk_records(chain) -> torch.Tensor:
    """The kernel's work with torch, item by item in order, from the records alone."""
    act, part, rec = chain.act.clone(), torch.zeros_like(chain.part), chain.rec.cpu().tolist()
    cnt = torch.zeros_like(chain.cnt)
    BN, BK = chain.BN, chain.BK
    for w_base, k, tiles, x_off, rdy, need, p_base, n, n_s, s, bc, y_off, rdy_out, *_ in rec:
        if rdy >= 0:
            assert cnt[rdy] == need, "an item ran before its input slice was final"
        ks = tiles * BK
        w = chain.w[w_base:w_base + (BN - 1) * k + ks].as_strided((BN, ks), (k, 1)).float()
        y = w @ act[x_off:x_off + ks].float()
        if n_s > 1:
            part[p_base + s * n:p_base + s * n + BN] = y
            cnt[bc] += 1
            if cnt[bc] < n_s:
                continue
            y = sum(part[p_base + t * n:p_base + t * n + BN] for t in range(n_s))
        act[y_off:y_off + BN] = y.half()
        if rdy_out >= 0:
            cnt[rdy_out] += 1
    return act


def test_records_walked_in_order_give_each_gemv():
    from benchmarks.persistent_ring import RingChain
    # K-slices of 32 and 64: split-K with 2-4 slices, the o-like GEMV reading part of the qkv-like output
    chain = RingChain([(96, 32, 32), (64, 64, 32), (128, 64, 64), (32, 128, 32)] * 2, "cpu", BN=16, BK=16)
    act = _walk_records(chain)
    x = act[:chain.shapes[0][1]].float()
    for g, (n, k, _) in enumerate(chain.shapes):
        y = (chain.weight(g).float() @ x[:k]).half()
        off = chain.act_offs[g]
        torch.testing.assert_close(act[off:off + n], y, rtol=2e-3, atol=2e-3)
        x = y.float()


def test_ring_needs_two_slots():
    from benchmarks.persistent_ring import RingChain
    with pytest.raises(ValueError, match="ring of 1"):
        RingChain([(32, 32, 32)], "cpu", ring=1, BN=16, BK=16)


@pytest.mark.gpu
@pytest.mark.parametrize("poll", [0, 1, 2])
@pytest.mark.parametrize("sem", [0, 1])  # 2, relaxed, is the fences' cost alone and may be wrong
def test_ring_on_gpu_every_program_resident(poll, sem):
    from benchmarks.persistent_ring import RingChain
    chain = RingChain(layer_chain("llama-1b")[:8], "cuda", poll=poll, sem=sem)
    chain.fill_gpu()
    k0 = chain.shapes[0][1]
    inputs = [torch.randn(k0, device="cuda").half() for _ in range(2)]
    outs = []
    for x0 in (inputs[0], inputs[1], inputs[0]):  # a new input each launch: a stale read shows
        chain.act[:k0] = x0
        chain.act[k0:] = 0
        chain.launch()
        torch.cuda.synchronize()
        assert chain.timed_out_waits() == 0
        # each GEMV against fp32 torch on the input the kernel itself read, so errors do not compound
        for g in range(len(chain.shapes)):
            ref = chain.weight(g).float() @ chain.x_of(g).float()
            torch.testing.assert_close(chain.y_of(g).float(), ref, rtol=2e-3, atol=2e-3)
        assert int(chain.cnt.abs().sum()) == 0  # ready for the next launch
        outs.append(chain.act.clone())
    assert torch.equal(outs[0], outs[2])  # partials summed in a fixed order: the same bits
