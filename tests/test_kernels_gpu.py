"""The Triton kernels against their references at real shapes, in fp16 and bf16 (pytest -m gpu).

`python tests/test_kernels_gpu.py` also prints timings of the attention and sampling
kernels against the references.
"""
import pytest
import torch

from kernels.activation import bias_act, bias_act_ref
from kernels.attention import _prefill, decode_attention_ref, paged_attention, paged_attention_ref
from kernels import pdl
from kernels.decode_attention import _COUNTERS, decode_attention
from kernels.norm import add_norm, add_norm_ref
from kernels.rotary import rotary_cache, rotary_cache_ref
from kernels.sampling import sample, sample_ref
from kernels.skinny_gemm import skinny_linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DTYPES = [torch.float16, torch.bfloat16]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # about two units in the last place


def _close(out, ref, dtype, scale: float = 1.0):
    assert out.shape == ref.shape and out.dtype == ref.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype] * scale, rtol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("hidden", [4096, 5120])
def test_add_norm(dtype, rms, hidden):
    x, r = (torch.randn(4096, hidden, dtype=dtype, device="cuda") for _ in range(2))
    w, b = (torch.randn(hidden, dtype=dtype, device="cuda") for _ in range(2))
    y, h = add_norm(x, r, w, b, 1e-5, rms)
    y_ref, h_ref = add_norm_ref(x, r, w, b, 1e-5, rms)
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    _close(y, y_ref, dtype, scale=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,width", [("silu_and_mul", 2 * 11008), ("gelu_tanh_and_mul", 2 * 8192),
                                        ("gelu", 16384), ("gelu_tanh", 16384), ("relu", 16384), ("silu", 4096)])
def test_bias_act(dtype, kind, width):
    x = torch.randn(4096, width, dtype=dtype, device="cuda") * 3
    b = torch.randn(width, dtype=dtype, device="cuda")
    _close(bias_act(x, b, kind), bias_act_ref(x, b, kind), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D,rotary_dim,interleaved", [(32, 8, 128, 128, False), (16, 16, 256, 64, True),
                                                          (32, 32, 80, 32, False), (32, 8, 128, 0, False)])
def test_rotary_cache(dtype, H, Hkv, D, rotary_dim, interleaved):
    T, block_size, num_blocks = 4096, 16, 300
    qkv = torch.randn(T, (H + 2 * Hkv) * D, dtype=dtype, device="cuda")
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
    positions = torch.randint(0, 8192, (T,), device="cuda")
    cos_sin = torch.randn(8192, rotary_dim, device="cuda") if rotary_dim else None
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:T]
    slots[::7] = -1
    kc, vc = (torch.randn(num_blocks, block_size, Hkv, D, dtype=dtype, device="cuda") for _ in range(2))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = rotary_cache(q, k, v, positions, cos_sin, rotary_dim, interleaved, kc, vc, slots)
    ref = rotary_cache_ref(q, k, v, positions, cos_sin, rotary_dim, interleaved, kc_ref, vc_ref, slots)
    _close(out, ref, dtype)
    _close(kc, kc_ref, dtype)
    torch.testing.assert_close(vc, vc_ref, atol=0, rtol=0)


def _paged_inputs(q_lens, ctx_lens, H, Hkv, D, dtype, block_size=16, alibi=False):
    B = len(q_lens)
    width = max(-(-c // block_size) for c in ctx_lens) + 1
    num_blocks = B * width + 7
    kc, vc = (torch.randn(num_blocks, block_size, Hkv, D, dtype=dtype, device="cuda") for _ in range(2))
    tables = torch.randperm(num_blocks, device="cuda")[:B * width].view(B, width).int()
    q = torch.randn(sum(q_lens), H, D, dtype=dtype, device="cuda") * 2
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")
    slopes = torch.rand(H, device="cuda") * 0.1 if alibi else None
    return q, kc, vc, tables, cu, ctx, slopes


def _check_attn(out, ref, dtype):
    assert torch.isfinite(out).all()
    rel = (out.float() - ref.float()).norm() / ref.float().norm()
    assert rel < {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], rel
    _close(out, ref, dtype, scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 80, 96, 128])
def test_decode_attention(dtype, D):
    """Decode batch 64, contexts up to 4096, GQA 32/8."""
    ctx_lens = torch.randint(1, 4097, (64,)).tolist()
    ctx_lens[0] = 4096
    q, kc, vc, tables, cu, ctx, _ = _paged_inputs([1] * 64, ctx_lens, 32, 8, D, dtype)
    args = (q, kc, vc, tables, cu, ctx, D ** -0.5)
    _check_attn(paged_attention(*args), paged_attention_ref(*args), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alibi,window", [(False, None), (True, None), (False, 1000)])
def test_mixed_attention(dtype, alibi, window):
    """Prefill chunks (fresh and chunked) beside decodes, GQA 32/8, head dim 128."""
    q_lens, ctx_lens = [512, 1, 1, 1000, 1, 37, 2048], [1024, 4096, 77, 1000, 2000, 300, 2048]
    q, kc, vc, tables, cu, ctx, slopes = _paged_inputs(q_lens, ctx_lens, 32, 8, 128, dtype, alibi=alibi)
    args = (q, kc, vc, tables, cu, ctx, 128 ** -0.5, slopes, window)
    _check_attn(paged_attention(*args), paged_attention_ref(*args), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_alibi_window(dtype):
    ctx_lens = torch.randint(1, 3000, (32,)).tolist()
    q, kc, vc, tables, cu, ctx, slopes = _paged_inputs([1] * 32, ctx_lens, 16, 16, 128, dtype, alibi=True)
    for window in (None, 700):
        args = (q, kc, vc, tables, cu, ctx, 0.09, slopes, window)
        _check_attn(paged_attention(*args), paged_attention_ref(*args), dtype)


def _rope(rotary_dim: int, n: int = 8192) -> torch.Tensor | None:
    if not rotary_dim:
        return None
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, device="cuda").float() / rotary_dim)
    freqs = torch.outer(torch.arange(n, device="cuda").float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _decode_step(ctx_lens, pad, H, Hkv, D, dtype, block_size=16):
    """A pure decode step: q, k, v as views of one qkv projection, and the slot of each
    sequence's newest position, -1 for the padding rows, whose newest slots hold NaN."""
    B = len(ctx_lens)
    _, kc, vc, tables, _, ctx, _ = _paged_inputs([1] * B, ctx_lens, H, Hkv, D, dtype, block_size)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, dtype=dtype, device="cuda") * 2
    q, k, v = (t.view(B, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
    last = ctx.long() - 1
    slots = tables.long().gather(1, (last // block_size)[:, None])[:, 0] * block_size + last % block_size
    for cache in (kc, vc):
        cache.view(-1, Hkv, D)[slots[pad]] = float("nan")
    slots[pad] = -1
    return qkv, (q, k, v, last), kc, vc, slots, tables, ctx


def _check_decode_step(out, ref, kc, kc_ref, vc, vc_ref, slots, dtype):
    live = slots >= 0
    assert torch.isfinite(out).all()  # padding rows too: nothing read from their NaN slots
    _check_attn(out[live], ref[live], dtype)
    torch.testing.assert_close(kc, kc_ref, atol=TOL[dtype], rtol=TOL[dtype], equal_nan=True)
    torch.testing.assert_close(vc, vc_ref, atol=0, rtol=0, equal_nan=True)
    assert not _COUNTERS.get(out.device, torch.zeros(1)).any()  # each launch leaves the merge counters at zero


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 5, 64])  # 33, 7 and 1 context slices for 8 KV heads on an H100
@pytest.mark.parametrize("H,Hkv,D,rotary_dim,interleaved,alibi,window", [
    (32, 8, 128, 128, False, False, None),  # Llama 3
    (32, 8, 64, 64, False, False, None),  # Llama 3.2 1B: 256-key tiles at B=1 (decode_tile)
    (32, 32, 64, 64, False, False, None),  # OPT-1.3B: 256-key tiles on 4 warps at B=1
    (32, 32, 128, 128, False, False, 1000),  # MHA with a sliding window
    (16, 16, 256, 64, True, False, None),  # GPT-J
    (32, 32, 80, 32, False, False, None),  # NeoX: partial rotary
    (32, 32, 128, 0, False, True, None),  # BLOOM: ALiBi, only the KV write is fused
])
def test_fused_decode_attention(dtype, B, H, Hkv, D, rotary_dim, interleaved, alibi, window):
    """Rotary, KV write and attention in one kernel, contexts up to 4096, some padding rows."""
    ctx_lens = torch.randint(1, 4097, (B,)).tolist()
    ctx_lens[0] = 4096
    pad = [i for i in (1, 17) if i < B]
    _, (q, k, v, positions), kc, vc, slots, tables, ctx = _decode_step(ctx_lens, pad, H, Hkv, D, dtype)
    slopes = torch.rand(H, device="cuda") * 0.1 if alibi else None
    kc_ref, vc_ref = kc.clone(), vc.clone()
    args = (q, k, v, positions, _rope(rotary_dim), rotary_dim, interleaved)
    out = decode_attention(*args, kc, vc, slots, tables, ctx, D ** -0.5, slopes, window)
    ref = decode_attention_ref(*args, kc_ref, vc_ref, slots, tables, ctx, D ** -0.5, slopes, window)
    _check_decode_step(out, ref, kc, kc_ref, vc, vc_ref, slots, dtype)


def test_fused_decode_attention_graph():
    """Captured once, replayed on new contexts: the counters are clean for every replay."""
    dtype, B, H, Hkv, D = torch.float16, 3, 32, 8, 128
    qkv, (q, k, v, positions), kc, vc, slots, tables, ctx = _decode_step([4096] * B, [], H, Hkv, D, dtype)
    rope = _rope(D)
    fn = lambda: decode_attention(q, k, v, positions, rope, D, False, kc, vc, slots, tables, ctx, 0.09)  # noqa: E731
    fn()  # compiles, and sizes the counters outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    for _ in range(3):
        ctx.copy_(torch.randint(1, 4097, (B,), device="cuda", dtype=torch.int32))
        positions.copy_(ctx.long() - 1)
        slots.copy_(tables.long().gather(1, (positions // 16)[:, None])[:, 0] * 16 + positions % 16)
        qkv.normal_()
        kc_ref, vc_ref = kc.clone(), vc.clone()
        g.replay()
        ref = decode_attention_ref(q, k, v, positions, rope, D, False, kc_ref, vc_ref, slots, tables, ctx, 0.09)
        _check_decode_step(out, ref, kc, kc_ref, vc, vc_ref, slots, dtype)


@pytest.mark.parametrize("B", [1, 4])  # 256-key tiles, all K/V loads before the wait; 64-key tiles
def test_attention_released_first_in_cuda_graph(B):
    """The qkv GEMV releases decode attention at its first step (``release_first``), so
    attention's programs sit through the whole weight stream with their early loads issued.
    Eight layers of qkv -> attention -> o in one graph under PDL, replayed on new inputs,
    must give the bits of the chain run eagerly with PDL off: a read before a wait would not."""
    if not pdl.supported(torch.device("cuda")):
        pytest.skip("PDL needs sm90+")
    dtype, H, Hkv, D = torch.float16, 32, 8, 64  # Llama-3.2-1B's heads
    _, (_, _, _, positions), kc, _, slots, tables, ctx = _decode_step([192] * B, [], H, Hkv, D, dtype)
    layers = [((torch.randn((H + 2 * Hkv) * D, H * D, device="cuda") * 0.02).to(dtype),
               (torch.randn(H * D, H * D, device="cuda") * 0.02).to(dtype),
               torch.randn_like(kc), torch.randn_like(kc)) for _ in range(8)]
    rope = _rope(D)
    x = torch.randn(B, H * D, dtype=dtype, device="cuda")

    def chain():
        h = x
        for w_qkv, w_o, k_cache, v_cache in layers:
            q, k, v = (t.view(B, -1, D) for t in skinny_linear(h, w_qkv, release_first=True).split(
                [H * D, Hkv * D, Hkv * D], dim=-1))
            o = decode_attention(q, k, v, positions, rope, D, False, k_cache, v_cache, slots, tables, ctx, D ** -0.5)
            h = skinny_linear(o.view(B, H * D), w_o)
        return h

    chain()  # compiles, and sizes the counters outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = chain()
    try:
        for _ in range(3):
            x.normal_()
            g.replay()
            pdl.set_enabled(False)
            ref = chain()
            pdl.set_enabled(True)
            torch.cuda.synchronize()
            assert torch.isfinite(ref).all() and torch.equal(out, ref)
    finally:
        pdl.set_enabled(True)


def test_sample():
    S, V = 64, 128256
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(S, V, device="cuda", generator=gen) * 4
    temperature = torch.rand(S, device="cuda", generator=gen) + 0.3
    temperature[::5] = 0.0
    top_k = torch.randint(0, 100, (S,), device="cuda", generator=gen)
    top_k[::3] = 0
    top_p = torch.rand(S, device="cuda", generator=gen).clamp(min=0.1)
    top_p[::2] = 1.0
    noise = torch.empty(S, V, device="cuda").exponential_(generator=gen)
    args = (logits, temperature, top_k, top_p, noise)
    assert sample(*args).tolist() == sample_ref(*args).tolist()


def _bench():
    """Median times (triton.testing.do_bench) of the kernels against the references."""
    from triton.testing import do_bench

    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = []  # (name, ms, bytes moved or None, relative error or None)

    def rel(out, ref):
        return ((out.float() - ref.float()).norm() / ref.float().norm()).item()

    for B, ctx_len in ((64, 4096), (4, 32768)):
        q, kc, vc, tables, cu, ctx, _ = _paged_inputs([1] * B, [ctx_len] * B, 32, 8, 128, torch.float16)
        args = (q, kc, vc, tables, cu, ctx, 128 ** -0.5)
        kv_bytes = 2 * B * ctx_len * 8 * 128 * 2
        err = rel(paged_attention(*args), paged_attention_ref(*args))
        name = f"decode B{B} ctx{ctx_len} 32/8 d128"
        rows.append((name + " ref", do_bench(lambda: paged_attention_ref(*args), return_mode="median"), kv_bytes, None))
        rows.append((name + " triton", do_bench(lambda: paged_attention(*args), return_mode="median"), kv_bytes, err))
    for B, ctx_len, Hkv in ((1, 192, 32), (1, 4096, 8), (64, 4096, 8)):  # decode: fused vs two launches
        _, (q, k, v, pos), kc, vc, slots, tables, ctx = _decode_step([ctx_len] * B, [], 32, Hkv, 128, torch.float16)
        args = (q, k, v, pos, _rope(128), 128, False)
        name = f"decode B{B} ctx{ctx_len} 32/{Hkv} d128 rope"
        ref = decode_attention_ref(*args, kc, vc, slots, tables, ctx, 128 ** -0.5)
        err = rel(decode_attention(*args, kc, vc, slots, tables, ctx, 128 ** -0.5), ref)
        kv_bytes = 2 * B * ctx_len * Hkv * 128 * 2
        cu, scale = torch.arange(B + 1, dtype=torch.int32, device="cuda"), 128 ** -0.5
        two = lambda: paged_attention(rotary_cache(*args, kc, vc, slots), kc, vc, tables, cu, ctx, scale)  # noqa: E731
        one = lambda: decode_attention(*args, kc, vc, slots, tables, ctx, scale)  # noqa: E731
        rows.append((name + " rotary_cache+attn", do_bench(two, return_mode="median"), kv_bytes, None))
        rows.append((name + " fused", do_bench(one, return_mode="median"), kv_bytes, err))
    q, kc, vc, tables, cu, ctx, _ = _paged_inputs([4096], [4096], 32, 8, 128, torch.float16)
    args = (q, kc, vc, tables, cu, ctx, 128 ** -0.5)
    ref = paged_attention_ref(*args)
    rows.append(("prefill 4096 32/8 d128 ref", do_bench(lambda: paged_attention_ref(*args), return_mode="median"), None, None))
    out = torch.empty_like(q)
    for bm, bn, nw, st in ((64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 2)):
        f = lambda: _prefill(*args, None, None, out, block_m=bm, block_n=bn, num_warps=nw, num_stages=st)  # noqa: E731
        f()
        rows.append((f"prefill bm={bm} bn={bn} w={nw} s={st}", do_bench(f, return_mode="median"), None, rel(out, ref)))
    qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, q[:, :8], q[:, :8]))
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)  # noqa: E731
    rows.append(("prefill torch SDPA (contiguous K/V)", do_bench(sdpa, return_mode="median"), None, None))
    S, V = 64, 128256
    logits, noise = torch.randn(S, V, device="cuda") * 4, torch.empty(S, V, device="cuda").exponential_()
    full = lambda v: torch.full((S,), v, device="cuda")  # noqa: E731
    for name, k, p in (("topk50 topp.9", 50, 0.9), ("topp.9", 0, 0.9), ("temperature only", 0, 1.0)):
        sargs = (logits, full(0.8), full(k).long(), full(p), noise)
        ok = float(sample(*sargs).tolist() == sample_ref(*sargs).tolist())
        rows.append((f"sample S64 V128k {name} ref", do_bench(lambda: sample_ref(*sargs), return_mode="median"), None, None))
        rows.append((f"sample S64 V128k {name} triton", do_bench(lambda: sample(*sargs), return_mode="median"), None, 1 - ok))
    for name, ms, nbytes, err in rows:
        bw = f"{nbytes / ms / 1e9:6.2f} TB/s" if nbytes else " " * 11
        print(f"{name:44s} {ms * 1e3:9.1f} us  {bw}  {'' if err is None else f'err {err:.1e}'}")


if __name__ == "__main__":
    _bench()


@pytest.mark.parametrize("S,V", [(1, 128256), (8, 32000), (256, 50272), (3, 7)])
def test_argmax_real_shapes(S, V):
    """Greedy decoding's split argmax against torch.argmax on real vocabularies, with ties."""
    from kernels.argmax import argmax
    x = torch.randn(S, V, device="cuda").round(decimals=2)
    x[0, [V // 3, V - 1]] = 100.0
    assert torch.equal(argmax(x), x.argmax(-1))
