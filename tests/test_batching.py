"""Continuous batching must not change results: staggered arrivals, chunked prefill,
and preemption under a tiny KV budget all give each prompt its solo greedy tokens."""
import pytest

from mii.config import EngineConfig, SamplingParams
from mii.engine.engine import LLMEngine

PROMPTS = [
    "Hello, my name is", "DeepSpeed is", "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Seattle", "Continuous batching mixes prefill and decode steps in one forward pass. It", "I like",
    "Washington is a", "a", "The lazy dog", "Hello, my name is Ada and I like tensors. Hello, my name is",
    "fox", "DeepSpeed is a deep learning optimization library. DeepSpeed is",
]
GREEDY = dict(temperature=0, ignore_eos=True)


def make(path, **kw):
    return LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="fp32", show_progress=False, **kw))


def run_staggered(eng: LLMEngine, max_new: list[int]) -> dict[int, list[int]]:
    """Submit the prompts a few at a time between steps; collect each one's tokens."""
    pending = list(enumerate(PROMPTS))
    ids: dict[str, int] = {}
    tokens: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    step = 0
    while pending or eng.has_unfinished():
        if pending and step % 3 == 0:
            for _ in range(min(2, len(pending))):
                i, p = pending.pop(0)
                ids[eng.add_request(p, SamplingParams(max_new_tokens=max_new[i], **GREEDY))] = i
        for out in eng.step():
            tokens[ids[out.request_id]] += out.token_ids
        step += 1
    return tokens


@pytest.fixture(scope="module")
def solo(tiny_model_dir):
    path = tiny_model_dir("LlamaForCausalLM")
    eng = make(path)
    max_new = [8 + 3 * i for i in range(len(PROMPTS))]
    alone = {i: eng.generate([p], SamplingParams(max_new_tokens=max_new[i], **GREEDY))[0].token_ids
             for i, p in enumerate(PROMPTS)}
    return path, max_new, alone


def test_staggered_batching_matches_solo_runs(solo):
    path, max_new, alone = solo
    eng = make(path, max_num_batched_tokens=24)  # small budget: prompts also get chunked
    got = run_staggered(eng, max_new)
    assert got == alone
    assert eng.stats["kv_blocks_free"] == eng.stats["kv_blocks_total"]


def test_preemption_under_tiny_kv_budget_matches_solo_runs(solo):
    path, max_new, alone = solo
    # 16 blocks of 4 tokens hold one 57-token sequence plus little else: running ones must evict others.
    eng = make(path, num_kv_blocks=16, block_size=4, max_model_len=64)
    got = run_staggered(eng, max_new)
    assert eng.scheduler.num_preemptions > 0, "the budget was meant to force preemption"
    assert got == alone
    assert eng.stats["kv_blocks_free"] == 16


@pytest.mark.parametrize("overlap", [True, False])
def test_abort_frees_blocks_and_reports_abort(solo, overlap):
    path, _, _ = solo
    eng = make(path, async_scheduling=overlap)
    total = eng.stats["kv_blocks_total"]
    rid = eng.add_request(PROMPTS[2], SamplingParams(max_new_tokens=50, **GREEDY))
    keep = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=5, **GREEDY))
    eng.step()
    eng.step()
    assert eng.stats["kv_blocks_free"] < total
    out = eng.abort(rid)
    # two steps sampled two tokens; with overlap the second is still in flight (and dropped)
    assert out.finished and out.finish_reason == "abort" and out.generated_tokens == (1 if overlap else 2)
    while eng.has_unfinished():
        eng.step()
    assert eng.stats["kv_blocks_free"] == total
    assert eng.abort(keep) is None  # already finished: nothing to abort


def _mixed_params(texts: dict[int, str]) -> list[SamplingParams]:
    """Greedy with length limits, stop strings that hit mid-generation, seeded sampling
    with logprobs, a minimum length and EOS allowed: every way a request can end."""
    out = []
    for i in range(len(PROMPTS)):
        kind = i % 4
        if kind == 0:
            out.append(SamplingParams(max_new_tokens=6 + i, **GREEDY))
        elif kind == 1:  # a stop string taken from the middle of its own greedy text
            t = texts[i]
            out.append(SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True,
                                      stop=[t[len(t) // 2:len(t) // 2 + 3]]))
        elif kind == 2:
            out.append(SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, seed=i, logprobs=2))
        else:
            out.append(SamplingParams(max_new_tokens=10, min_new_tokens=4, temperature=0.7, seed=100 + i))
    return out


def test_overlapped_steps_match_synchronous_steps(solo):
    """Async scheduling (step N+1 launched before step N is collected, its input tokens
    taken on the device) changes nothing a request sees, under preemption too, and the
    length limit costs no extra forward tokens."""
    path, _, _ = solo
    ref_eng = make(path)
    texts = {i: ref_eng.generate([p], SamplingParams(max_new_tokens=30, **GREEDY))[0].generated_text
             for i, p in enumerate(PROMPTS)}
    params = _mixed_params(texts)
    results, fed = {}, {}
    for overlap in (False, True):
        eng = make(path, async_scheduling=overlap, block_size=4, num_kv_blocks=24, max_num_batched_tokens=32)
        launch = eng.runner.launch
        fed[overlap] = 0

        def counting(batch, launch=launch, overlap=overlap):
            fed[overlap] += sum(b.num_tokens for b in batch)
            return launch(batch)
        eng.runner.launch = counting
        results[overlap] = [(c.token_ids, c.generated_text, c.finish_reason,
                             [(lp.token_id, round(lp.logprob, 4)) for lp in c.logprobs])
                            for c in eng.generate(PROMPTS, params)]
        assert eng.scheduler.num_preemptions > 0, "the KV budget was meant to force preemption"
        assert eng.stats["kv_blocks_free"] == eng.stats["kv_blocks_total"]
    assert results[True] == results[False]
    assert any(r[2] == "stop" for r in results[True]), "some stop string should have hit"
    # only sequences ending early (stop strings) may cost one extra token each
    stops = sum(r[2] == "stop" for r in results[True])
    assert fed[False] <= fed[True] <= fed[False] + stops * 2 + eng.scheduler.num_preemptions * 64
