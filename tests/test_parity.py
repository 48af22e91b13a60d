"""Logit parity with transformers' own forward for every supported architecture."""
import pytest
import torch
import transformers

from mii.config import EngineConfig, SamplingParams
from mii.engine.engine import LLMEngine
from tests.tiny_models import ARCHITECTURES

STEPS = 16


def engine_for(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="fp32", show_progress=False, **kw))


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the logit scale (max |ref|)."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_and_decode_logits_match_transformers(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    eng, hf = engine_for(path), hf_model(path)
    prompt = eng.tokenizer.encode("DeepSpeed is a deep learning library for")
    rid = eng.add_request(prompt, SamplingParams(max_new_tokens=STEPS + 1, temperature=0, ignore_eos=True))
    seq = eng.seqs[rid]
    for step in range(STEPS + 1):  # the prefill, then 16 decode steps
        batch = eng.scheduler.schedule()
        assert [b.num_tokens for b in batch] == [len(prompt) if step == 0 else 1]
        ours = eng.runner.logits(batch)[0]
        with torch.no_grad():
            ref = hf(torch.tensor([seq.token_ids])).logits[0, -1]
        assert rel_err(ours, ref) <= 1e-4, f"{arch} step {step}"
        eng.postprocess(batch, [int(ref.argmax())], [None])


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "BloomForCausalLM", "GPTNeoXForCausalLM"])
def test_chunked_prefill_mixed_with_decodes_matches(arch, tiny_model_dir):
    """A prompt prefilled in chunks while another sequence decodes gives the same logits."""
    path = tiny_model_dir(arch)
    # stepped by hand below (schedule, logits, postprocess): no step may be left in flight
    eng, hf = engine_for(path, max_num_batched_tokens=7, async_scheduling=False), hf_model(path)
    a = eng.tokenizer.encode("Hello, my name is")
    b = eng.tokenizer.encode("The quick brown fox jumps over the lazy dog. Seattle is a city in")
    ra = eng.add_request(a, SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))
    eng.step()  # a is running
    rb = eng.add_request(b, SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))
    seqs = {ra: eng.seqs[ra], rb: eng.seqs[rb]}
    chunks = 0
    while seqs[rb].num_generated == 0:
        batch = eng.scheduler.schedule()
        chunks += any(item.seq.request_id == rb and not item.samples for item in batch)
        logits = eng.runner.logits(batch)
        samplers = [item.seq for item in batch if item.samples]
        toks = []
        for row, s in enumerate(samplers):
            with torch.no_grad():
                ref = hf(torch.tensor([s.token_ids])).logits[0, -1]
            assert rel_err(logits[row], ref) <= 1e-4
            toks.append(int(ref.argmax()))
        eng.postprocess(batch, toks, [None] * len(toks))
    assert chunks >= 2, "the long prompt should have been split into several chunks"
    assert seqs[rb].num_generated == 1
