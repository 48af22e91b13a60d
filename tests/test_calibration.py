"""Offline calibration (``mii quantize``): SmoothQuant's folds are exact in fp, GPTQ beats
round-to-nearest where the inputs are correlated, and calibrated checkpoints are ordinary
quantized checkpoints (they reload exactly and tensor-slice). Quality on the real default
model is asserted in test_quant_engine.py."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from mii.config import EngineConfig, SamplingParams
from mii.engine.engine import LLMEngine
from mii.model.calibrate import Calibrator, calibration_ids
from mii.model.gptq import gptq_quantize
from mii.model.loader import load_model
from mii.model.parallel import set_tensor_parallel
from mii.model.quant import dequantize_weight, quantize_weight
from mii.model.quant_linear import QuantLinear
from mii.model.smooth import activation_max, smooth_model
from mii.policies import policy_for
from mii.policies.base import DEFAULT_QUANTIZABLE, resolve
from mii.quantize import _quantize, quantize_checkpoint
from tests.tiny_models import ARCHITECTURES

CALIB = 256  # tokens: the tiny models need few, and this keeps each test about a second


def fp_model(path):
    config = AutoConfig.from_pretrained(path)
    spec = resolve(policy_for(config)[1], config)
    return load_model(str(path), spec, torch.float32, torch.device("cpu"), show_progress=False)


def calibrator(model, path, seq_len=128):
    return Calibrator(model, calibration_ids(AutoTokenizer.from_pretrained(path), max_tokens=CALIB), seq_len)


# Every architecture has a norm-fed linear (qkv), so every one is checked.
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_smoothing_is_an_exact_identity_in_fp(arch, tiny_model_dir):
    """Folding 1/s into the norms, v rows and up rows leaves the fp function unchanged:
    logits agree to fp32 rounding (measured <= 4e-7 of their scale; we allow 1e-5). The scales
    here are 5-9, far from 1: leaving out one fold moves the logits by 0.7-140%."""
    path = tiny_model_dir(arch)
    model = fp_model(path)
    cal = calibrator(model, path)
    ref = cal.logits()
    ln1_before = model.layers[0].ln1.weight.clone()
    changed = smooth_model(model, activation_max(model, cal), alpha=0.5)
    got = cal.logits()
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert not torch.allclose(model.layers[0].ln1.weight, ln1_before, rtol=0.05)  # it did smooth
    block, spec = model.layers[1], model.spec
    through_act = spec.policy.gated_mlp or spec.activation == "relu"  # down's input is up's rows, scaled
    expected = {"ln1", "attn.qkv", "attn.o"}
    expected |= {"mlp.up"} if block.shared_norm else {"ln2", "mlp.up"}
    expected |= {"mlp.down"} if through_act else set()  # GELU is not homogeneous: down stays as it is
    assert {n.removeprefix("layers.1.") for n in changed if n.startswith("layers.1.")} == expected


def correlated_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """Real-ish activations: a few strong shared directions, outlier channels, some noise."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, dim, generator=torch.Generator().manual_seed(0))  # shared by every draw
    scale = torch.ones(dim)
    scale[:4] = 8.0  # outlier channels, as in LLM residual streams
    return (torch.randn(n, 16, generator=g) @ mix + 0.3 * torch.randn(n, dim, generator=g)) * scale


@pytest.mark.parametrize("mode,group", [("w4a16", 32), ("w4a16", 64), ("w8a16", 64), ("w8a8", 128)])
def test_gptq_output_error_is_lower_than_round_to_nearest(mode, group):
    torch.manual_seed(1)
    w = torch.randn(96, 256)
    x = correlated_inputs(1024, 256, seed=2)
    held_out = correlated_inputs(512, 256, seed=3)  # not what GPTQ saw
    tensors = gptq_quantize(w, 2 * x.t() @ x / len(x), mode, group)
    rtn = quantize_weight(w, mode, group)
    # exactly quantize_weight's format: names, shapes, dtypes, and the int4 grid -7..7
    assert {k: (t.shape, t.dtype) for k, t in tensors.items()} == {k: (t.shape, t.dtype) for k, t in rtn.items()}
    if mode == "w4a16":
        from kernels.quant_gemm import unpack_int4
        assert unpack_int4(tensors["qweight"]).min() >= -7
    for inputs in (x, held_out):
        y = inputs @ w.t()
        err = {name: ((inputs @ dequantize_weight(t, mode).t() - y).norm() / y.norm()).item()
               for name, t in (("gptq", tensors), ("rtn", rtn))}
        # measured: GPTQ's output error is ~0.17x round-to-nearest's on these inputs, held-out ones too
        assert err["gptq"] < 0.5 * err["rtn"], err


@pytest.mark.parametrize("arch,mode", [("LlamaForCausalLM", "w4a16"), ("GPTJForCausalLM", "w8a8"),
                                       ("OPTForCausalLM", "w8a8"), ("Qwen2ForCausalLM", "w8a16")])
def test_calibrated_checkpoint_reloads_to_identical_outputs(arch, mode, tiny_model_dir, tmp_path):
    """The checkpoint holds what calibration made: the integers GPTQ chose, and for SmoothQuant
    the rescaled norms too (saved in fp32), so the reloaded model equals the in-memory one."""
    src = tiny_model_dir(arch)
    out = quantize_checkpoint(src, tmp_path / "q", mode, group_size=32, show_progress=False,
                              calibrate=True, calib_tokens=CALIB)
    saved = json.loads((out / "config.json").read_text())["mii_quantization"]
    assert saved["method"] == ("smoothquant" if mode == "w8a8" else "gptq")
    assert saved["calibration"]["text"] == "calib_text.txt" and 0 < saved["calibration"]["tokens"] <= CALIB

    tok = AutoTokenizer.from_pretrained(src)
    in_memory, _, _ = _quantize(fp_model(src), tok, mode, 32, DEFAULT_QUANTIZABLE, True, CALIB, False)
    reloaded = LLMEngine(EngineConfig(model=str(out), device="cpu", dtype="fp32", show_progress=False))
    model = reloaded.runner.model
    assert isinstance(model.layers[0].mlp.down, QuantLinear)
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. Seattle is a city")
    ref = Calibrator(in_memory, prompt).logits()
    assert torch.equal(Calibrator(model, prompt).logits(), ref)
    out_ids = reloaded.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    assert out_ids[0].generated_tokens == 8


def test_calibrated_checkpoint_loads_under_tensor_parallel(tiny_model_dir, tmp_path):
    """A calibrated checkpoint is an ordinary quantized one: each rank slices the whole fused
    tensors as the fp layers slice theirs. Groups of 32 lie inside one rank's inputs, so TP=2
    holds the same integers as TP=1 and differs only by the all-reduce's sum order."""
    src = tiny_model_dir("LlamaForCausalLM")
    out = quantize_checkpoint(src, tmp_path / "q", "w4a16", group_size=32, show_progress=False,
                              calib_tokens=CALIB)
    prompts = ["Hello, my name is", "DeepSpeed is a deep learning", "The lazy dog"]
    greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    kw = dict(model=str(out), device="cpu", dtype="fp32", show_progress=False)
    one = [o.token_ids for o in LLMEngine(EngineConfig(**kw)).generate(prompts, greedy)]
    eng = LLMEngine(EngineConfig(tensor_parallel=2, **kw))
    try:
        assert eng.runner.model.layers[0].attn.o.qweight.shape[1] == 64 // 2 // 2  # half the inputs, packed
        two = [o.token_ids for o in eng.generate(prompts, greedy)]
    finally:
        eng.shutdown()
    assert two == one


def test_groups_that_straddle_ranks_are_a_clear_error(tiny_model_dir, tmp_path):
    src = tiny_model_dir("LlamaForCausalLM")  # o has 64 inputs: 32 per rank at TP=2
    out = quantize_checkpoint(src, tmp_path / "q", "w8a16", group_size=64, show_progress=False)
    config = AutoConfig.from_pretrained(out)
    spec = resolve(policy_for(config)[1], config)
    set_tensor_parallel(0, 2)  # rank 0's view; building and loading need no collective
    try:
        with pytest.raises(ValueError, match="groups of 64 inputs do not fit a rank's 32 inputs"):
            load_model(str(out), spec, torch.float32, torch.device("cpu"), show_progress=False)
    finally:
        set_tensor_parallel(0, 1)
