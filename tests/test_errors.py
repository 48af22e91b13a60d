"""Bad input gets a clear ValueError naming the offending value."""
import json
import shutil

import pytest

import mii
from mii.config import EngineConfig, SamplingParams
from mii.engine.engine import LLMEngine


def test_unknown_architecture_is_named_with_the_supported_list(tiny_model_dir, tmp_path):
    src = tiny_model_dir("LlamaForCausalLM")
    dst = tmp_path / "weird"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FancyNewForCausalLM") as e:
        LLMEngine(EngineConfig(model=str(dst), device="cpu", show_progress=False))
    assert "LlamaForCausalLM" in str(e.value) and "BloomForCausalLM" in str(e.value)


def test_prompt_over_max_model_len(tiny_model_dir):
    pipe = mii.pipeline(str(tiny_model_dir("GPT2LMHeadModel")), device="cpu", max_model_len=16, show_progress=False)
    with pytest.raises(ValueError, match="max_model_len=16"):
        pipe(["Hello " * 40])
    assert pipe(["Hello"], max_new_tokens=100, temperature=0, ignore_eos=True)[0].finish_reason == "length"
    with pytest.raises(ValueError, match="learned positions"):
        mii.pipeline(str(tiny_model_dir("GPT2LMHeadModel")), device="cpu", max_model_len=10_000)


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-0.1), "temperature"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(min_new_tokens=5, max_new_tokens=2), "min_new_tokens"),
    (dict(stop=[""]), "stop"), (dict(logprobs=50), "logprobs"), (dict(seed=-3), "seed"),
    (dict(bogus=1), "bogus"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={5: 101.0}), "logit_bias"),
])
def test_invalid_sampling_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_kwargs(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(dtype="fp8"), "dtype"), (dict(block_size=0), "block_size"), (dict(kv_cache_fraction=1.5), "kv_cache_fraction"),
    (dict(quantize="int3"), "quantize"), (dict(quant_group_size=100), "quant_group_size"),
    (dict(device="tpu:0"), "device"), (dict(max_model_len=-1), "max_model_len"),
])
def test_invalid_engine_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)


def test_missing_model_names_what_was_tried(tmp_path):
    with pytest.raises(ValueError, match="no-such-org/no-such-model.*hub"):
        mii.pipeline("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        mii.pipeline(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="token ids"):
        LLMEngine.encode.__get__(type("E", (), {"tokenizer": None, "spec": type("S", (), {"vocab": 10})})())([3, 99])


def test_kv_budget_too_small_for_max_model_len(tiny_model_dir):
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        mii.pipeline(str(tiny_model_dir("LlamaForCausalLM")), device="cpu", num_kv_blocks=2, block_size=4,
                     max_model_len=64, show_progress=False)
