"""Sampling controls against transformers' own generate and direct checks."""
import pytest
import torch
import transformers

from mii.config import EngineConfig, SamplingParams
from mii.engine.engine import LLMEngine


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    path = tiny_model_dir("LlamaForCausalLM")
    eng = LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="fp32", show_progress=False))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return eng, hf


def gen(eng, prompt, **kw):
    return eng.generate([prompt], SamplingParams(**kw))[0]


def hf_greedy(hf, eng, prompt, n, **kw):
    ids = torch.tensor([eng.tokenizer.encode(prompt)])
    out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
    return out[0, ids.shape[1]:].tolist()


def test_repetition_penalty_matches_transformers(setup):
    eng, hf = setup
    got = gen(eng, "Hello, my name is", max_new_tokens=20, min_new_tokens=20, temperature=0, repetition_penalty=1.5)
    assert got.token_ids == hf_greedy(hf, eng, "Hello, my name is", 20, repetition_penalty=1.5)


def test_seed_is_reproducible_whatever_the_batch(setup):
    eng, _ = setup
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = gen(eng, "DeepSpeed is", **kw).token_ids
    others = [SamplingParams(max_new_tokens=n, temperature=0.8, ignore_eos=True) for n in (5, 30, 9)]
    batch = eng.generate(["Hello", "DeepSpeed is", "The lazy dog", "fox"],
                         [others[0], SamplingParams(**kw), others[1], others[2]])
    assert batch[1].token_ids == alone
    assert gen(eng, "DeepSpeed is", **{**kw, "seed": 99}).token_ids != alone


def test_top_k_one_and_tiny_top_p_are_greedy(setup):
    eng, _ = setup
    greedy = gen(eng, "The quick brown", max_new_tokens=12, temperature=0, ignore_eos=True).token_ids
    assert gen(eng, "The quick brown", max_new_tokens=12, temperature=1.5, top_k=1, ignore_eos=True).token_ids == greedy
    assert gen(eng, "The quick brown", max_new_tokens=12, temperature=1.0, top_p=1e-6, ignore_eos=True).token_ids == greedy


def test_sampled_tokens_follow_the_top_k_distribution(setup):
    """Many seeded one-token samples stay inside HF's top-k set, at about HF's frequencies."""
    eng, hf = setup
    prompt = "Seattle is a"
    with torch.no_grad():
        logits = hf(torch.tensor([eng.tokenizer.encode(prompt)])).logits[0, -1]
    top = logits.topk(5)
    probs = dict(zip(top.indices.tolist(), (top.values / 0.7).softmax(-1).tolist()))
    n = 400
    outs = eng.generate([prompt] * n, [SamplingParams(max_new_tokens=1, temperature=0.7, top_k=5, seed=s)
                                       for s in range(n)])
    counts: dict[int, int] = {}
    for o in outs:
        counts[o.token_ids[0]] = counts.get(o.token_ids[0], 0) + 1
    assert set(counts) <= set(probs)
    for tok, p in probs.items():  # 4-sigma binomial band
        sigma = (n * p * (1 - p)) ** 0.5
        assert abs(counts.get(tok, 0) - n * p) <= 4 * sigma + 1, (tok, counts.get(tok, 0), n * p)


def test_stop_strings_are_trimmed_and_earliest_wins(setup):
    eng, _ = setup
    full = gen(eng, "Hello, my name is", max_new_tokens=30, temperature=0, ignore_eos=True).generated_text
    assert len(full) > 12
    a, b = full[8:11], full[4:6]
    out = gen(eng, "Hello, my name is", max_new_tokens=30, temperature=0, ignore_eos=True, stop=[a, b])
    assert out.finish_reason == "stop"
    assert out.generated_text == full[:full.find(b)]


def test_stream_deltas_never_leak_a_stop_string(setup):
    from mii.engine.stream import EngineLoop
    eng, _ = setup
    full = gen(eng, "The lazy dog", max_new_tokens=30, temperature=0, ignore_eos=True).generated_text
    stop = full[10:14]
    loop = EngineLoop(eng)
    try:
        pieces = [o.text for o in loop.submit("The lazy dog", SamplingParams(max_new_tokens=30, temperature=0,
                                                                               ignore_eos=True, stop=[stop]))]
    finally:
        loop.shutdown()
    assert "".join(pieces) == full[:full.find(stop)]
    assert all(stop not in "".join(pieces[:i + 1]) for i in range(len(pieces)))


def test_stop_token_ids_min_and_max_new_tokens(setup):
    eng, _ = setup
    greedy = gen(eng, "fox", max_new_tokens=10, temperature=0, ignore_eos=True)
    assert greedy.finish_reason == "length" and greedy.generated_tokens == 10
    first = greedy.token_ids[0]
    stopped = gen(eng, "fox", max_new_tokens=10, temperature=0, stop_token_ids=[first])
    assert stopped.finish_reason == "stop" and stopped.token_ids == [first]
    held = gen(eng, "fox", max_new_tokens=10, temperature=0, stop_token_ids=[first], min_new_tokens=3)
    assert held.generated_tokens >= 3 and held.token_ids[0] != first


def test_eos_stops_unless_ignored(setup):
    eng, _ = setup
    first = gen(eng, "fox", max_new_tokens=1, temperature=0, ignore_eos=True).token_ids[0]
    saved = set(eng.eos_token_ids)
    eng.eos_token_ids.clear()
    eng.eos_token_ids.add(first)  # make the greedy first token the model's end token
    try:
        assert gen(eng, "fox", max_new_tokens=10, temperature=0).token_ids == [first]
        ignored = gen(eng, "fox", max_new_tokens=10, temperature=0, ignore_eos=True)
        assert ignored.generated_tokens == 10 and ignored.finish_reason == "length"
        held = gen(eng, "fox", max_new_tokens=10, temperature=0, min_new_tokens=2)
        assert held.token_ids[0] != first and held.generated_tokens >= 2
    finally:
        eng.eos_token_ids.clear()
        eng.eos_token_ids.update(saved)


def test_logprobs_match_transformers(setup):
    eng, hf = setup
    out = gen(eng, "DeepSpeed is", max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    ids = eng.tokenizer.encode("DeepSpeed is") + out.token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    n = len(eng.tokenizer.encode("DeepSpeed is"))
    for i, lp in enumerate(out.logprobs):
        row = ref[n - 1 + i]
        assert lp.token_id == out.token_ids[i]
        assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()


class OpenAIPenalties(transformers.LogitsProcessor):
    """OpenAI's documented formula, as a transformers logits processor: each token's logit
    minus frequency * (times generated) minus presence * (generated at all); the prompt's
    tokens do not count."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids):
            counts = torch.bincount(ids[self.prompt_len:], minlength=scores.shape[-1]).to(scores.dtype)
            scores[row] -= self.frequency * counts + self.presence * (counts > 0).to(scores.dtype)
        return scores


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 0.7), (0.4, 0.9), (-0.5, 0.0)])
def test_presence_and_frequency_penalties_match_openai_formula(setup, presence, frequency):
    eng, hf = setup
    prompt = "Hello, my name is"
    ids = torch.tensor([eng.tokenizer.encode(prompt)])
    proc = transformers.LogitsProcessorList([OpenAIPenalties(ids.shape[1], presence, frequency)])
    want = hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, logits_processor=proc)
    got = gen(eng, prompt, max_new_tokens=24, min_new_tokens=24, temperature=0,
              presence_penalty=presence, frequency_penalty=frequency)
    assert got.token_ids == want[0, ids.shape[1]:].tolist()
    plain = gen(eng, prompt, max_new_tokens=24, min_new_tokens=24, temperature=0).token_ids
    assert got.token_ids != plain  # the penalties changed the greedy path of this random model


def test_logit_bias_matches_transformers_sequence_bias(setup):
    eng, hf = setup
    prompt = "The quick brown"
    plain = gen(eng, prompt, max_new_tokens=12, temperature=0, ignore_eos=True).token_ids
    # ban the plain path's first two tokens and lift one the model did not pick
    bias = {plain[0]: -100.0, plain[1]: -100.0, 7: 5.0}
    got = gen(eng, prompt, max_new_tokens=12, temperature=0, ignore_eos=True, logit_bias=bias).token_ids
    assert plain[0] not in got and plain[1] not in got
    ids = torch.tensor([eng.tokenizer.encode(prompt)])
    want = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                       sequence_bias=[[[t], b] for t, b in bias.items()])
    assert got == want[0, ids.shape[1]:].tolist()


def test_logit_bias_outside_the_vocabulary_is_refused(setup):
    eng, _ = setup
    vocab, before = eng.spec.vocab, dict(eng.seqs)
    with pytest.raises(ValueError, match=f"{vocab}"):
        eng.add_request("hi", SamplingParams(logit_bias={vocab: 1.0}))
    assert eng.seqs == before and not eng.has_unfinished()  # nothing half-registered
