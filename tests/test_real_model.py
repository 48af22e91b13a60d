"""The embedded default model (SmolLM2-135M-Instruct, real weights) against transformers."""
import pytest
import torch
import transformers

import mii

PROMPTS = ["Hello, my name is", "DeepSpeed is", "The capital of France is"]


@pytest.fixture(scope="module")
def pipe():
    p = mii.pipeline(device="cpu", dtype="fp32", show_progress=False)  # no model: the default one
    yield p
    p.destroy()


def test_greedy_matches_transformers_for_32_tokens(pipe, default_model_dir):
    assert pipe.engine.architecture == "LlamaForCausalLM"
    out = pipe(PROMPTS, max_new_tokens=32, min_new_tokens=32, temperature=0)  # HF min_new_tokens masks EOS, as ours does
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    tok = pipe.tokenizer
    for prompt, o in zip(PROMPTS, out):
        ids = torch.tensor([tok.encode(prompt)])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False)[0, ids.shape[1]:].tolist()
        assert o.token_ids == ref, prompt
        assert o.generated_tokens == 32 and o.prompt_tokens == ids.shape[1] and o.finish_reason == "length"
        assert o.generated_text == tok.decode(ref, skip_special_tokens=True)


def test_default_model_has_a_chat_template(pipe):
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    out = pipe([text], max_new_tokens=24, temperature=0)[0]
    assert out.generated_tokens >= 1 and out.finish_reason in ("stop", "length")
