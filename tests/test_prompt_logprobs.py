"""Prompt logprobs (vLLM's prompt_logprobs; OpenAI's echo with logprobs) against transformers'
own log-softmax over the prompt, and unchanged by chunked prefill, preemption and the prefix cache."""
import pytest
import torch
import transformers

from mii.config import EngineConfig, SamplingParams
from mii.engine.engine import LLMEngine

PROMPTS = ["Hello, my name is", "The history of the city begins with a small settlement by the river, "
           "where fishermen traded salt and grain with the merchants who came down from the hills.", "Seattle"]


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    path = tiny_model_dir("LlamaForCausalLM")
    return path, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="fp32", show_progress=False, **kw))


def reference(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab] transformers' log-probabilities of each next prompt token's position."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def assert_scores_match(entries, ids: list[int], lp: torch.Tensor, k: int, tol: float = 1e-4) -> None:
    assert len(entries) == len(ids) and entries[0] is None  # nothing predicts the first token
    for j, e in enumerate(entries[1:], start=1):
        assert e.token_id == ids[j]
        assert abs(e.logprob - lp[j - 1, ids[j]].item()) < tol, (j, e.logprob, lp[j - 1, ids[j]].item())
        vals, top = lp[j - 1].topk(k)
        assert [t for t, _ in e.top] == top.tolist()
        if k:
            assert max(abs(v - w) for (_, v), w in zip(e.top, vals.tolist())) < tol


def test_prompt_logprobs_match_transformers(llama):
    path, hf = llama
    eng = engine(path)
    params = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=3, logprobs=1)
    outs = eng.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        ids = eng.tokenizer.encode(prompt)
        assert_scores_match(out.prompt_logprobs, ids, reference(hf, ids), 3)
        # scoring the prompt leaves generation as it was
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=3, min_new_tokens=3, do_sample=False)[0, len(ids):]
        assert out.token_ids == ref.tolist()
    # 0 alternatives: the prompt token's own logprob only; a request that does not ask gets none
    zero, plain = eng.generate(PROMPTS[:2], [SamplingParams(max_new_tokens=1, prompt_logprobs=0), SamplingParams()])
    ids = eng.tokenizer.encode(PROMPTS[0])
    assert_scores_match(zero.prompt_logprobs, ids, reference(hf, ids), 0)
    assert plain.prompt_logprobs is None


def test_chunked_prefill_preemption_and_prefix_cache_keep_the_scores(llama):
    """Prompts prefilled in 16-token chunks beside decoding requests, in a KV cache small
    enough to preempt, and a prompt whose prefix is cached (its blocks cannot stand in for
    logits, so it is computed): each prompt is scored once and exactly as alone."""
    path, hf = llama
    long = PROMPTS[1]
    eng = engine(path, num_kv_blocks=14, max_num_batched_tokens=16, max_num_seqs=4)
    scored = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True, prompt_logprobs=2)
    background = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    eng.generate([long], background)  # registers long's blocks in the prefix cache
    prompts = [long, PROMPTS[0] * 4, long + " And then?", PROMPTS[1][:70]]
    outs = eng.generate(prompts + ["Once upon a time"] * 2, [scored] * 4 + [background] * 2)
    assert eng.stats["num_preemptions"] > 0
    for prompt, out in zip(prompts, outs):
        ids = eng.tokenizer.encode(prompt)
        assert_scores_match(out.prompt_logprobs, ids, reference(hf, ids), 2)
    assert eng.stats["kv_blocks_free"] == eng.stats["kv_blocks_total"]


def test_a_step_scores_its_rows_in_chunks(llama, monkeypatch):
    """A step that scores more positions than PromptScores.chunk takes them to float32 a
    chunk at a time (the memory kept for it is fixed); the scores are the same."""
    from mii.engine.prompt_logprobs import PromptScores
    monkeypatch.setattr(PromptScores, "chunk", 8)
    path, hf = llama
    eng = engine(path, max_num_batched_tokens=256)
    rows, launch = [], eng.runner.launch

    def counted(batch):
        rows.append(sum(len(b.seq.prompt_rows(b.seq.num_computed, b.seq.num_computed + b.num_tokens)) for b in batch))
        return launch(batch)

    eng.runner.launch = counted
    prompts = [PROMPTS[1], PROMPTS[1] + " Then?"]
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=1))
    assert max(rows) > 8 * 4  # one step scored both prompts, in many chunks
    for prompt, out in zip(prompts, outs):
        ids = eng.tokenizer.encode(prompt)
        assert_scores_match(out.prompt_logprobs, ids, reference(hf, ids), 1)


@pytest.mark.parametrize("bad", [21, -1, 1.5, True])
def test_invalid_prompt_logprobs(bad):
    with pytest.raises(ValueError, match=f"prompt_logprobs must be an integer in \\[0, 20\\], got {bad!r}"):
        SamplingParams(prompt_logprobs=bad)
