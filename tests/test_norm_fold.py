"""A residual-add norm folded into the decode GEMVs around it (kernels/norm.py), interpreted on
the CPU: the GEMV before the norm adds the residual and leaves band statistics; the GEMV after
it normalizes x as it loads it. Checked against the unfused chain of references."""
import copy
import importlib
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton or kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.norm import add_norm_ref  # noqa: E402
from kernels.quant_gemm import dequantize_ref, wxa16_gemm, wxa16_gemm_ref  # noqa: E402
from kernels.skinny_gemm import RowNorm, skinny_config, skinny_linear  # noqa: E402
from tests.quant_helpers import DEV, DTYPES, random_qweight, rel  # noqa: E402

EPS = 1e-5


def _gemv(x, w, bias, bits, **fold):
    """One decode GEMV: a float weight, or (qweight, scales) of ``bits``."""
    if bits == 16:
        return skinny_linear(x, w, bias, **fold)
    return wxa16_gemm(x, *w, bias, bits, **fold)


def _ref(x, w, bias, bits):
    return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype) if bits == 16 \
        else wxa16_gemm_ref(x, *w, bias, bits)


def _weight(n, k, bits, dtype):
    if bits == 16:
        return (torch.randn(n, k) * 0.05).to(dtype).to(DEV)
    return random_qweight(n, k, bits, 32, group_major=True)  # 32: the quantizer's smallest group


def _dense(w, bits):
    return w.float() if bits == 16 else dequantize_ref(w[0], w[1], bits)


def _tol(dtype):
    # fp16: roundings of the same sums; fp32 on a GPU: tl.dot runs TF32
    return 2e-3 if dtype == torch.float16 or torch.cuda.is_available() else 1e-5


# H = 160: three bands of the producer's 64 columns, the last one partial; the consumer's K
# tile is then 32. M: bs=1 decode and a small batch.
@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("M,H", [(1, 160), (5, 256)])
@pytest.mark.parametrize("bits,dtype", [(16, dt) for dt in DTYPES] + [(8, torch.float16), (4, torch.float16)])
def test_norm_folds_into_decode_gemvs(rms, bits, M, H, dtype):
    """The producer's h and statistics, and the consumer whose weight holds the norm's: its
    output against the bare norm n(h) (no weight, no bias) times that weight."""
    torch.manual_seed(H + M)
    K1, N2 = 128, 48
    x = torch.randn(M, K1, dtype=dtype, device=DEV)
    residual = torch.randn(M, H, dtype=dtype, device=DEV) + 0.5  # a mean away from 0: LayerNorm's centring counts
    w1, b1 = _weight(H, K1, bits, dtype), torch.randn(H, dtype=dtype, device=DEV) * 0.1
    w2, b2 = _weight(N2, H, bits, dtype), torch.randn(N2, dtype=dtype, device=DEV) * 0.1

    h, stats, band = _gemv(x, w1, b1, bits, residual=residual, rms=rms)
    h_ref = _ref(x, w1, b1, bits) + residual
    assert h.dtype == dtype and h.shape == (M, H)
    assert rel(h, h_ref) < _tol(dtype)
    assert stats.shape == (-(-H // band), 2, M)

    row_sums = None if rms else _dense(w2, bits).sum(1)
    y = _gemv(h, w2, b2, bits, norm=RowNorm(stats, band, EPS, rms, row_sums))
    ones = torch.ones(H, dtype=dtype, device=DEV)
    bare, _ = add_norm_ref(h, None, ones, None if rms else torch.zeros_like(ones), EPS, rms)
    assert rel(y, _ref(bare, w2, b2, bits)) < _tol(dtype)
    assert rel(y, _ref(h, w2, b2, bits)) > 0.1  # the norm was applied: h itself gives another y


def test_norm_fold_with_split_k_and_batch_of_16():
    """A forced split over K on both sides (the tail program adds the residual and scales), 16 rows."""
    torch.manual_seed(0)
    M, H, K1 = 16, 128, 256
    x = torch.randn(M, K1, device=DEV)
    residual = torch.randn(M, H, device=DEV)
    w1, w2 = torch.randn(H, K1, device=DEV) * 0.05, torch.randn(32, H, device=DEV) * 0.05
    cfg = skinny_config(H, K1, K1, 4, BN=32, BK=32, waves=16, min_tiles=1)
    assert cfg["SPLIT_K"] > 1
    h, stats, band = skinny_linear(x, w1, None, config=cfg, residual=residual, rms=False)
    assert band == 32 and rel(h, x @ w1.T + residual) < _tol(torch.float32)
    cfg2 = skinny_config(32, H, H, 4, BN=16, BK=32, waves=16, min_tiles=1)
    assert cfg2["SPLIT_K"] > 1
    y = skinny_linear(h, w2, None, config=cfg2, norm=RowNorm(stats, band, EPS, False, w2.sum(1)))
    assert rel(y, F.layer_norm(h, (H,), eps=EPS) @ w2.T) < _tol(torch.float32)


def test_norm_fold_rejects_what_it_cannot_run():
    x, w = torch.randn(1, 64, device=DEV), torch.randn(32, 64, device=DEV)
    with pytest.raises(ValueError, match="residual takes no activation"):
        skinny_linear(x, w, None, act="relu", residual=torch.randn(1, 32, device=DEV))
    h, stats, band = skinny_linear(x, w, None, residual=torch.randn(1, 32, device=DEV))
    with pytest.raises(ValueError, match="folded norm needs"):  # stats for 1 row, x of 2
        skinny_linear(torch.randn(2, 32, device=DEV), torch.randn(8, 32, device=DEV), None,
                      norm=RowNorm(stats, band, EPS, True))
    with pytest.raises(ValueError, match="row sums for a layer norm"):
        skinny_linear(h, torch.randn(8, 32, device=DEV), None, norm=RowNorm(stats, band, EPS, False))
    qweight, scales = random_qweight(32, 64, 8, 32)
    with pytest.raises(ValueError, match="decode kernel only"):
        wxa16_gemm(torch.randn(17, 64, device=DEV), qweight, scales, None, 8,
                   residual=torch.randn(17, 32, device=DEV))


# Untied heads: Llama's by default, and an OPT made so (its final LayerNorm then moves too).
FOLD_MODELS = [("LlamaForCausalLM", {}), ("OPTForCausalLM", {}), ("OPTForCausalLM", {"tie_word_embeddings": False}),
               ("GPT2LMHeadModel", {}), ("BloomForCausalLM", {}), ("Qwen2ForCausalLM", {})]


@pytest.mark.parametrize("arch,overrides", FOLD_MODELS)
def test_fold_norm_weights_keeps_the_function(arch, overrides, tmp_path):
    """The load-time transform alone, fp32 on the CPU (reference ops): the norms' weights and
    biases moved into the linears give the same logits, prefill and decode."""
    from mii.config import EngineConfig, SamplingParams
    from mii.engine.engine import LLMEngine
    from mii.model.fold import fold_norm_weights
    from tests.tiny_models import make_tiny_model

    path = make_tiny_model(arch, tmp_path / arch, **overrides)
    eng = LLMEngine(EngineConfig(model=str(path), device="cpu", show_progress=False))
    plain = eng.runner.model
    folded = copy.deepcopy(plain)  # its own KV cache, written by its own steps
    fold_norm_weights(folded)
    assert torch.equal(folded.layers[0].ln1.weight, torch.ones_like(folded.layers[0].ln1.weight))
    assert folded.head_folded == (folded.lm_head is not folded.embed) == (arch == "LlamaForCausalLM" or
                                                                         bool(overrides))
    eng.add_request(eng.tokenizer.encode("DeepSpeed is a library"),
                    SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
    for _ in range(3):  # the prompt, then decode steps
        batch = eng.scheduler.schedule()
        eng.runner.model = plain
        before = eng.runner.logits(batch)[0]
        eng.runner.model = folded
        after = eng.runner.logits(batch)[0]
        assert ((after - before).abs().max() / before.abs().max()).item() < 1e-5
        eng.postprocess(batch, [int(before.argmax())], [None])


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "OPTForCausalLM", "GPT2LMHeadModel"])
def test_folded_decode_steps_match_unfolded_and_transformers(arch, tiny_model_dir):
    """The model wiring: an fp16 tiny model on the Triton ops (interpreted on the CPU), whose
    steps of at most 16 tokens fold their norms, against an engine built with
    ``fold_norms=False`` (the norms' own kernels, the weights as loaded) on the same steps and
    against HF fp32. Unfolded on the CPU, the linears are torch's; on a GPU, the same decode kernel."""
    import transformers

    from mii.config import EngineConfig, SamplingParams
    from mii.engine.engine import LLMEngine
    from mii.model.ops import _TRITON, REFERENCE, Ops

    path = tiny_model_dir(arch)
    norms = []  # the norm kernels a step runs: folded, only the first block's input norm is left
    triton_ops = {n: getattr(importlib.import_module(m), f) for n, (m, f) in _TRITON.items()}
    add_norm = triton_ops["add_norm"]
    triton_ops["add_norm"] = lambda *a: norms.append(1) or add_norm(*a)
    engines = []
    for fold in (True, False):
        eng = LLMEngine(EngineConfig(model=str(path), device=DEV, dtype="fp16", show_progress=False,
                                     enable_cuda_graph=False, fold_norms=fold))
        eng.runner.ops = Ops(**triton_ops, backend="triton")
        assert eng.runner.model.fold_norms == fold and REFERENCE.backend == "torch"  # folded at load or not
        engines.append(eng)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEV).eval()
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    prompt = engines[0].tokenizer.encode("DeepSpeed is a library")
    seqs = [eng.seqs[eng.add_request(prompt, params)] for eng in engines]
    for _ in range(4):  # the prompt (under 16 tokens: folded too), then decode steps
        batches = [eng.scheduler.schedule() for eng in engines]
        folded = engines[0].runner.logits(batches[0])[0]
        assert len(norms) == 1 + (not engines[0].runner.model.head_folded)  # the first block's; a tied head's final
        norms.clear()
        plain = engines[1].runner.logits(batches[1])[0]
        assert len(norms) == 2 * 2 + 1  # two blocks' two norms and the final one
        norms.clear()
        with torch.no_grad():
            ref = hf(torch.tensor([seqs[0].token_ids], device=DEV)).logits[0, -1].float()
        scale = ref.abs().max()
        # fp16 roundings: of the folded weights, and of the statistics' order
        assert ((folded - plain).abs().max() / scale).item() < 5e-3
        assert ((folded - ref).abs().max() / scale).item() < 2e-2  # as the GPU parity test
        for eng, batch in zip(engines, batches):
            eng.postprocess(batch, [int(ref.argmax())], [None])
