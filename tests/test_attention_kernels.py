"""The paged-attention kernels against their references: the prefill and split-K decode
kernels behind paged_attention, and decode_attention (rotary and the KV write fused in).

Small and ragged shapes, as in tests/test_kernels.py, whose setup (the interpreter switch,
the device and the warning filter) this module shares; tests/test_kernels_gpu.py covers
real shapes.
"""
import pytest
import torch

# Before the kernels: without CUDA it switches on Triton's interpreter first. pytestmark
# (its warning filter) applies to this module's tests too.
from tests.test_kernels import CUDA, DEV, pytestmark  # noqa: F401

import kernels.attention as attn
import kernels.decode_attention as dec


def _paged_inputs(q_lens, ctx_lens, H, Hkv, D, block_size, dtype, alibi=False):
    """Random q and caches; block tables are random permutations, wider than needed."""
    B = len(q_lens)
    width = max(-(-c // block_size) for c in ctx_lens) + 2
    num_blocks = B * width + 3
    kc, vc = (torch.randn(num_blocks, block_size, Hkv, D, dtype=dtype, device=DEV) for _ in range(2))
    tables = torch.randperm(num_blocks, device=DEV)[:B * width].view(B, width).int()
    q = torch.randn(sum(q_lens), H, D, dtype=dtype, device=DEV) * 2  # peakier softmax than randn
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)
    slopes = torch.rand(H, device=DEV) * 0.5 if alibi else None
    return q, kc, vc, tables, cu, ctx, slopes


ATTN_TOL = {torch.float32: 1e-2 if CUDA else 1e-4, torch.float16: 3e-3}  # CUDA: tf32 dots


def _check_attn(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=ATTN_TOL[dtype], rtol=ATTN_TOL[dtype])


# (q_lens, context_lens): decode only; a fresh prefill; chunked prefill (q_len < context)
# mixed with decodes; contexts off block boundaries throughout.
CASES = {
    "decode": ([1, 1, 1, 1], [1, 9, 37, 70]),
    "prefill": ([19], [19]),
    "mixed": ([1, 13, 1, 30, 2], [25, 13, 6, 71, 40]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("H,Hkv,D,dtype", [(4, 4, 32, torch.float32), (4, 2, 80, torch.float16),
                                           (8, 2, 16, torch.float16)])
@pytest.mark.parametrize("alibi,window", [(False, None), (True, None), (False, 6), (True, 20)])
def test_paged_attention(case, H, Hkv, D, dtype, alibi, window):
    q_lens, ctx_lens = CASES[case]
    q, kc, vc, tables, cu, ctx, slopes = _paged_inputs(q_lens, ctx_lens, H, Hkv, D, 8, dtype, alibi)
    args = (q, kc, vc, tables, cu, ctx, D ** -0.5, slopes, window)
    _check_attn(attn.paged_attention(*args), attn.paged_attention_ref(*args), dtype)


@pytest.mark.parametrize("D", [64, 96, 128])
def test_paged_attention_head_dims(D):
    """Real head sizes, with a strided q (a view into fused qkv) and block size 16."""
    for q_lens, ctx_lens in CASES.values():
        q, kc, vc, tables, cu, ctx, _ = _paged_inputs(q_lens, ctx_lens, 4, 2, D, 16, torch.float16)
        q = torch.cat([q, torch.randn_like(q)], dim=1)[:, :4]
        args = (q, kc, vc, tables, cu, ctx, 0.1)
        _check_attn(attn.paged_attention(*args), attn.paged_attention_ref(*args), torch.float16)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 50])
def test_decode_splits(num_splits):
    """The split-K path at any number of slices, including slices past every context's end."""
    q, kc, vc, tables, cu, ctx, slopes = _paged_inputs([1] * 3, [130, 3, 64], 8, 2, 32, 8, torch.float32, True)
    out = torch.full_like(q, float("nan"))
    attn._decode(q, kc, vc, tables, cu, ctx, 0.2, slopes, 50, out, num_splits=num_splits, block_n=16)
    _check_attn(out, attn.paged_attention_ref(q, kc, vc, tables, cu, ctx, 0.2, slopes, 50), torch.float32)


@pytest.mark.parametrize("alibi,window", [(False, None), (True, None), (True, 9)])
def test_prefill_tiles(alibi, window):
    """Small tiles: several per sequence, sequences starting mid-tile, unmasked tiles below the diagonal."""
    q, kc, vc, tables, cu, ctx, slopes = _paged_inputs([5, 1, 23, 16, 2, 40], [5, 40, 30, 16, 9, 45],
                                                       2, 1, 16, 4, torch.float32, alibi)
    out = torch.full_like(q, float("nan"))
    attn._prefill(q, kc, vc, tables, cu, ctx, 0.3, slopes, window, out, block_m=16, block_n=16)
    _check_attn(out, attn.paged_attention_ref(q, kc, vc, tables, cu, ctx, 0.3, slopes, window), torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_mixed_dispatch(num_splits):
    """In a mixed batch the split-K kernel writes exactly the decode rows, the flash kernel the rest."""
    q_lens, ctx_lens = [1, 13, 1, 30, 2], [25, 13, 6, 71, 40]
    q, kc, vc, tables, cu, ctx, slopes = _paged_inputs(q_lens, ctx_lens, 4, 2, 32, 8, torch.float32, True)
    args = (q, kc, vc, tables, cu, ctx, 0.2, slopes, None)
    ref = attn.paged_attention_ref(*args)
    decode_rows = cu[:-1][torch.tensor(q_lens) == 1].long()
    is_decode = torch.zeros(q.shape[0], dtype=torch.bool, device=DEV)
    is_decode[decode_rows] = True
    out = torch.full_like(q, float("nan"))
    attn._decode(*args, out, num_splits=num_splits, block_n=16, mixed=True)
    assert out[~is_decode].isnan().all()
    _check_attn(out[is_decode], ref[is_decode], torch.float32)
    out = torch.full_like(q, float("nan"))
    attn._prefill(*args, out, skip_decodes=True)
    assert out[is_decode].isnan().all()
    _check_attn(out[~is_decode], ref[~is_decode], torch.float32)


def _decode_inputs(ctx_lens, pad, H, Hkv, D, rotary_dim, dtype, block_size=8):
    """A pure decode step: q, k, v as views of one qkv projection, and the slot of each
    sequence's newest position, -1 for the padding rows. Those rows' newest slots hold NaN:
    a kernel that read the newest key back from the cache would produce NaN there."""
    B = len(ctx_lens)
    _, kc, vc, tables, _, ctx, _ = _paged_inputs([1] * B, ctx_lens, H, Hkv, D, block_size, dtype)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, dtype=dtype, device=DEV) * 2
    q, k, v = (t.view(B, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
    positions = torch.randint(0, 100, (B,), device=DEV)  # rotation follows positions, not context lengths
    cos_sin = torch.randn(128, rotary_dim, device=DEV) if rotary_dim else None
    last = ctx.long() - 1
    slots = tables.long().gather(1, (last // block_size)[:, None])[:, 0] * block_size + last % block_size
    pad = list(pad)
    for cache in (kc, vc):
        cache.view(-1, Hkv, D)[slots[pad]] = float("nan")
    slots[pad] = -1
    return q, k, v, (positions, cos_sin, rotary_dim), kc, vc, slots, tables, ctx


# (context lengths, padding rows): batch sizes 1, 3 and 6, contexts off block boundaries and of 1
DECODE_STEPS = [([37], []), ([9, 1, 70], [1]), ([25, 1, 6, 71, 40, 16], [1, 4])]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("H,Hkv,D,rotary_dim,interleaved,dtype", [
    (4, 4, 32, 32, False, torch.float32),  # Llama: full NeoX-style rotary
    (8, 2, 16, 16, True, torch.float16),  # GPT-J style pairs, GQA 4
    (4, 2, 80, 32, False, torch.float16),  # NeoX: partial rotary
    (6, 3, 32, 16, True, torch.float32),  # GPT-J: partial rotary, GQA 2
    (4, 2, 32, 0, False, torch.float16),  # learned positions or ALiBi: only the KV write is fused
])
@pytest.mark.parametrize("alibi,window", [(False, None), (True, None), (False, 6), (True, 20)])
def test_decode_attention(num_splits, H, Hkv, D, rotary_dim, interleaved, dtype, alibi, window):
    """Rotary, KV write and attention in one kernel against rotary_cache_ref + paged_attention_ref."""
    for ctx_lens, pad in DECODE_STEPS:
        q, k, v, rope, kc, vc, slots, tables, ctx = _decode_inputs(ctx_lens, pad, H, Hkv, D, rotary_dim, dtype)
        slopes = torch.rand(H, device=DEV) * 0.5 if alibi else None
        kc_ref, vc_ref = kc.clone(), vc.clone()
        out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEV)
        dec._decode(q, kc, vc, tables, None, ctx, D ** -0.5, slopes, window, out, num_splits=num_splits,
                    block_n=16, new_kv=(k, v, *rope, interleaved, slots))
        ref = attn.decode_attention_ref(q, k, v, *rope, interleaved, kc_ref, vc_ref, slots, tables, ctx,
                                        D ** -0.5, slopes, window)
        live = slots >= 0
        assert torch.isfinite(out).all()  # padding rows too: nothing read from their NaN slots
        _check_attn(out[live], ref[live], dtype)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]  # the rotation's rounding, as in test_rotary_cache
        torch.testing.assert_close(kc, kc_ref, atol=tol, rtol=tol, equal_nan=True)  # whole caches
        torch.testing.assert_close(vc, vc_ref, atol=0, rtol=0, equal_nan=True)
        assert not dec._COUNTERS.get(q.device, torch.zeros(1)).any()  # each launch leaves them at zero


def test_decode_tile_rule():
    """decode_tile's tiles: 256 keys where each (sequence, KV head) has many slices (fewer for
    MHA), else 64; never larger tiles for mixed steps or heads over 64."""
    assert dec.decode_tile(33, 64, 4, True) == (256, 8)  # Llama-1B at bs=1
    assert dec.decode_tile(9, 64, 4, True) == (64, 4)  # and at bs=4
    assert dec.decode_tile(9, 64, 1, True) == (256, 4)  # OPT-1.3B at bs=1
    assert dec.decode_tile(22, 64, 1, True) == (256, 8)  # GPT-2 at bs=1
    assert dec.decode_tile(5, 64, 1, True) == (64, 4)
    assert dec.decode_tile(9, 128, 1, True) == dec.decode_tile(33, 128, 4, True) == (64, 4)  # the 7B, Llama-3-8B
    assert dec.decode_tile(33, 64, 4, False) == dec.decode_tile(9, 64, 1, False) == (64, 4)


@pytest.mark.parametrize("H,Hkv,splits,block_n,warps", [
    (8, 2, 3, 256, 8),  # GQA, few pairs
    (4, 4, 3, 256, 4),  # MHA, several slices
])
def test_decode_attention_large_tiles(H, Hkv, splits, block_n, warps):
    """decode_tile's larger tiles, with contexts over several slices, one ending mid-tile, and one short."""
    q, k, v, rope, kc, vc, slots, tables, ctx = _decode_inputs([600, 5, 300], [], H, Hkv, 32, 32, torch.float16)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEV)
    dec._decode(q, kc, vc, tables, None, ctx, 0.2, None, None, out, num_splits=splits, block_n=block_n,
                num_warps=warps, new_kv=(k, v, *rope, False, slots))
    ref = attn.decode_attention_ref(q, k, v, *rope, False, kc_ref, vc_ref, slots, tables, ctx, 0.2)
    _check_attn(out, ref, torch.float16)
    torch.testing.assert_close(vc, vc_ref, atol=0, rtol=0)
    assert not dec._COUNTERS[q.device].any()


def test_decode_attention_op():
    """The public op: default split count, its checks, and that a call leaves the merge counters at zero."""
    q, k, v, rope, kc, vc, slots, tables, ctx = _decode_inputs([130, 3, 64], [], 8, 2, 32, 32, torch.float32)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    args = (q, k, v, *rope, False)
    out = dec.decode_attention(*args, kc, vc, slots, tables, ctx, 0.2)
    _check_attn(out, attn.decode_attention_ref(*args, kc_ref, vc_ref, slots, tables, ctx, 0.2), torch.float32)
    assert dec._COUNTERS[q.device].numel() >= 3 * 2 and not dec._COUNTERS[q.device].any()
    with pytest.raises(ValueError, match="one token per sequence"):
        dec.decode_attention(*args, kc, vc, slots, tables[:2], ctx[:2], 0.2)
    with pytest.raises(ValueError, match="one token per sequence"):
        attn.decode_attention_ref(*args, kc, vc, slots, tables[:2], ctx[:2], 0.2)
