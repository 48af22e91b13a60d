"""Each Triton kernel against its plain-torch reference, at small and ragged shapes:
norm, activation, rotary, sampling, argmax and step inputs here; the attention kernels in
tests/test_attention_kernels.py, which imports this module's setup (CUDA, DEV, pytestmark).

Without CUDA the kernels run in the Triton interpreter (numpy), hence the small shapes
and no bf16 (the interpreter computes bf16 wrongly). With CUDA the same cases run
compiled; tests/test_kernels_gpu.py covers real shapes.
"""
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before triton is imported; tests/conftest.py does the same for the whole run
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels.activation as act  # noqa: E402
import kernels.argmax as amax  # noqa: E402
import kernels.norm as norm  # noqa: E402
import kernels.rotary as rot  # noqa: E402
import kernels.sampling as samp  # noqa: E402
import kernels.step_inputs as step_in  # noqa: E402

if not CUDA:
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(norm._add_norm_kernel, InterpretedFunction):
        # triton's own @jit helpers (tl.sum...) are fixed at its import: reloading our modules cannot help.
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; tests/conftest.py sets it")

DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow in masked-off lanes


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, atol32: float = 1e-5) -> None:
    atol = {torch.float32: atol32, torch.float16: 2e-3}[dtype]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=1e-2 if dtype == torch.float16 else 1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("T,hidden", [(1, 64), (7, 80), (5, 300)])
def test_add_norm(dtype, rms, T, hidden):
    x, r = (torch.randn(T, hidden, dtype=dtype, device=DEV) for _ in range(2))
    w, b = torch.randn(hidden, dtype=dtype, device=DEV), torch.randn(hidden, dtype=dtype, device=DEV)
    for residual in (None, r):
        for bias in (None, b):
            y, h = norm.add_norm(x, residual, w, bias, 1e-5, rms)
            y_ref, h_ref = norm.add_norm_ref(x, residual, w, bias, 1e-5, rms)
            _close(h, h_ref, dtype)
            _close(y, y_ref, dtype, atol32=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "relu", "silu", "silu_and_mul", "gelu_tanh_and_mul"])
def test_bias_act(dtype, kind):
    for shape in [(1, 64), (3, 5, 2 * 96), (9, 2 * 1100)]:  # 2 * 1100: two column blocks, ragged
        x = torch.randn(shape, dtype=dtype, device=DEV) * 3
        bias = torch.randn(shape[-1], dtype=dtype, device=DEV)
        for b in (None, bias):
            _close(act.bias_act(x, b, kind), act.bias_act_ref(x, b, kind), dtype)
    with pytest.raises(ValueError, match="unknown activation"):
        act.bias_act(x, None, "swish")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("D,rotary_dim", [(32, 32), (80, 32), (64, 0), (16, 16)])
def test_rotary_cache(dtype, interleaved, D, rotary_dim):
    T, H, Hkv, num_blocks, block_size = 11, 6, 2, 9, 4
    qkv = torch.randn(T, (H + 2 * Hkv) * D, dtype=dtype, device=DEV)  # strided views, as the model passes
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
    positions = torch.randint(0, 100, (T,), device=DEV)
    cos_sin = torch.randn(128, rotary_dim, device=DEV) if rotary_dim else None
    slots = torch.randperm(num_blocks * block_size, device=DEV)[:T]
    slots[[2, 7]] = -1  # padding tokens: nothing written
    kc, vc = (torch.randn(num_blocks, block_size, Hkv, D, dtype=dtype, device=DEV) for _ in range(2))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = rot.rotary_cache(q, k, v, positions, cos_sin, rotary_dim, interleaved, kc, vc, slots)
    ref = rot.rotary_cache_ref(q, k, v, positions, cos_sin, rotary_dim, interleaved, kc_ref, vc_ref, slots)
    _close(out, ref, dtype)
    _close(kc, kc_ref, dtype)  # whole caches: untouched slots must stay as they were
    torch.testing.assert_close(vc, vc_ref, atol=0, rtol=0)
    if rotary_dim == 0:  # no rotation passes q through, as the reference does
        assert out is q


def _sampling_inputs(S, V, gen):
    logits = torch.randn(S, V, generator=gen) * 3
    temperature = torch.rand(S, generator=gen) + 0.3
    temperature[::4] = 0.0  # greedy rows
    top_k = torch.randint(0, 12, (S,), generator=gen)
    top_k[1], top_k[2] = V, V + 7  # at and past the vocabulary: off
    top_p = torch.rand(S, generator=gen).clamp(min=0.05)
    top_p[::3] = 1.0
    top_p[5] = 0.0  # keeps the best token alone
    logits[7] = logits[7].round()  # ties everywhere, the k-th largest among them
    top_k[7], temperature[7] = 6, 1.0
    logits[9], top_k[9] = 1.5, 5  # all tied: past the kernel's 2,048 candidates at V = 3000
    top_k[10], temperature[10] = 30, 0.7  # past the pieces (of 128 columns) at both vocabularies
    return logits, temperature, top_k, top_p


@pytest.mark.parametrize("V", [37, 3000])
def test_sample(V):
    gen = torch.Generator().manual_seed(V)
    logits, temperature, top_k, top_p = _sampling_inputs(12, V, gen)
    for trial in range(2):
        noise = torch.empty(12, V).exponential_(generator=gen)
        if trial:  # noise that cancels the probabilities: every kept token is about as likely
            p = (logits / temperature.clamp(min=1e-3)[:, None]).softmax(-1)
            noise = (p * (torch.rand(12, V, generator=gen) + 0.5)).clamp(min=1e-30)
        args = [t.to(DEV) for t in (logits, temperature, top_k, top_p, noise)]
        ref = samp.sample_ref(*args)
        assert samp.sample(*args).tolist() == ref.tolist()
    assert (ref[::4] == logits[::4].argmax(-1).to(DEV)).all()  # greedy rows


def test_sample_ref_filters():
    """The reference's filtering on a hand-checked row: probs .5 .25 .125 .0625 ..."""
    logits = torch.log(torch.tensor([[0.0625, 0.5, 0.125, 0.25, 0.0625]]))
    one = torch.ones(1)
    for k, p, kept in [(0, 1.0, {0, 1, 2, 3, 4}), (2, 1.0, {1, 3}), (0, 0.7, {1, 3}), (0, 0.75, {1, 3}),
                       (0, 0.76, {1, 2, 3}), (3, 0.9, {1, 2, 3}), (4, 1.0, {0, 1, 2, 3, 4}),
                       (0, 0.9, {0, 1, 2, 3, 4})]:  # .875 above both tied tokens: kept together
        seen = set()
        for i in range(5):  # a tiny noise on token i makes it win if it is kept
            noise = torch.ones(1, 5)
            noise[0, i] = 1e-6
            seen.add(int(samp.sample_ref(logits, one, torch.tensor([k]), torch.tensor([p]), noise)))
        assert seen == kept, (k, p)


@pytest.mark.parametrize("S,V,block", [(1, 1000, 64), (3, 5003, 128), (5, 40, 1024)])
def test_argmax_matches_torch(S, V, block):
    """Greedy argmax split into chunks: equal to torch.argmax, including ties (the leftmost
    wins, within and across chunks), rows that are -inf but for one entry, and fp16 rows."""
    g = torch.Generator().manual_seed(S * V)
    x = torch.randn(S, V, generator=g).round(decimals=1)  # many equal values
    x[0, [3, V // 2, V - 1]] = 50.0  # tied maxima in different chunks
    if S > 1:
        x[1] = float("-inf")
        x[1, V - 2] = -1e30
    for logits in (x.to(DEV), x.half().to(DEV)):
        assert torch.equal(amax.argmax(logits, block=block).cpu(), amax.argmax_ref(logits).cpu())
    assert amax.argmax(x[:, ::2].to(DEV), block=block).tolist() == x[:, ::2].argmax(-1).tolist()
    buf = torch.full((S + 2,), -7, device=DEV)  # a decode graph writes into the runner's token buffer
    amax.argmax(x.to(DEV), block=block, out=buf[:S])
    assert buf.tolist() == amax.argmax_ref(x).tolist() + [-7, -7]


def test_argmax_rejects_bad_input():
    with pytest.raises(ValueError, match=r"float logits \[rows, vocab\], got \(4,\)"):
        amax.argmax(torch.randn(4, device=DEV))


@pytest.mark.parametrize("mixed,T,B,W,F,S", [(False, 3, 3, 5, 2, 3), (False, 1, 1, 300, 1, 1), (True, 40, 3, 7, 1, 5),
                                             (True, 600, 2, 4, 0, 2), (True, 9, 2, 3, 1, 0)])
def test_fill_step_inputs_matches_torch(mixed, T, B, W, F, S):
    """One launch writes a packed step into a CUDA graph's buffers (with padding and the ids
    fed from the last step's tokens) exactly as the torch copies do; what it must not touch
    stays. The packing is the engine's own (StepInputs.of), so the layouts cannot drift."""
    from mii.engine.inputs import StepInputs

    g = torch.Generator().manual_seed(T + B + W)
    n_tok, n_seq, max_blocks = (T + 5, 6, 320) if not mixed else (T + 17, 8, 320)
    def noise(*shape, dtype=torch.long):  # stale values the step must overwrite or leave
        return torch.randint(0, 99, shape, generator=g, dtype=dtype)
    ref = dict(input_ids=noise(700), positions=noise(700), slots=noise(700),
               tables=noise(8, max_blocks, dtype=torch.int32), ctx_lens=noise(8, dtype=torch.int32),
               cu=noise(9, dtype=torch.int32))
    out = {k: v.clone().to(DEV) for k, v in ref.items()}
    def ints(n, lo, hi):
        return torch.randint(lo, hi, (n,), generator=g).tolist()
    cu = sorted(ints(B + 1, 0, T + 1))
    dst = torch.randperm(T, generator=g)[:F].tolist()
    data = StepInputs.of(ints(T, 0, 1000), ints(T, 0, 1000), ints(T, 0, 1000), ints(S, 0, T), dst, ints(F, 0, 4),
                         ints(B * W, 0, 50), cu, ints(B, 1, 90), W, pin=False).data
    last = torch.randint(0, 1000, (4,), generator=g)
    step_in.fill_step_inputs_ref(ref, data, last, n_tok, n_seq, mixed)
    step_in.fill_step_inputs(out, data.to(DEV), last.to(DEV), n_tok, n_seq, mixed)
    for k in ref:
        assert torch.equal(out[k].cpu(), ref[k]), k
