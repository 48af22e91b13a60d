"""Automatic prefix caching: the block manager's bookkeeping driven directly, then whole
engines with and without the cache against each other and against transformers."""
import pytest
import torch
import transformers

from mii.config import EngineConfig, SamplingParams
from mii.engine.block_manager import BlockManager
from mii.engine.engine import LLMEngine
from mii.engine.sequence import Sequence

P = SamplingParams(max_new_tokens=8, ignore_eos=True)


def computed(blocks: BlockManager, seq: Sequence) -> None:
    """As the engine does once a step has fed all of ``seq``'s known tokens."""
    blocks.grow(seq, len(seq.token_ids))
    seq.num_computed = len(seq.token_ids)
    blocks.register(seq)


def test_longest_cached_prefix_is_shared_by_reference():
    blocks = BlockManager(8, 4)
    a = Sequence("a", list(range(10)), 10, P)
    assert blocks.match_prefix(a) == 0
    computed(blocks, a)  # blocks [0..3], [4..7] full and registered; [8, 9] not
    b = Sequence("b", list(range(9)) + [99], 10, P)
    assert blocks.match_prefix(b) == 8 and b.block_table == a.block_table[:2]
    assert [blocks.refs[x] for x in a.block_table] == [2, 2, 1]
    # the block that holds a prompt's last token is computed, never taken: 8 tokens match 4
    c = Sequence("c", list(range(8)), 8, P)
    assert blocks.match_prefix(c) == 4
    # a different first block shares nothing, even with equal later blocks
    d = Sequence("d", [7, 1, 2, 3] + list(range(4, 10)), 10, P)
    assert blocks.match_prefix(d) == 0
    assert blocks.hit_tokens == 12 and blocks.query_tokens == 10 + 10 + 8 + 10


def test_released_blocks_stay_cached_until_evicted_oldest_first():
    blocks = BlockManager(3, 4)
    a = Sequence("a", list(range(9)), 9, P)
    computed(blocks, a)  # 3 blocks, the first 2 registered
    blocks.release(a)
    assert blocks.num_free == 3  # cached blocks count as free: they are evicted on demand
    again = Sequence("a2", list(range(9)), 9, P)
    assert blocks.match_prefix(again) == 8
    blocks.unmatch(again)
    assert blocks.num_free == 3 and blocks.hit_tokens == 0
    # 2 new blocks evict the unregistered one first, then the prefix's *last* block
    blocks.grow(Sequence("o", [50] * 8, 8, P), 8)
    shorter = Sequence("a3", list(range(9)), 9, P)
    assert blocks.match_prefix(shorter) == 4
    blocks.unmatch(shorter)
    blocks.grow(Sequence("o2", [60] * 4, 4, P), 4)
    assert blocks.match_prefix(Sequence("a4", list(range(9)), 9, P)) == 0 and not blocks.cached


def test_off_means_no_sharing():
    blocks = BlockManager(8, 4, prefix_caching=False)
    a = Sequence("a", list(range(10)), 10, P)
    computed(blocks, a)
    assert blocks.match_prefix(Sequence("b", list(range(10)), 10, P)) == 0 and not blocks.cached


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    path = tiny_model_dir("LlamaForCausalLM")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def engine(path, caching: bool, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="fp32", show_progress=False,
                                  enable_prefix_caching=caching, **kw))


SYSTEM = "You are a helpful assistant. Answer briefly and politely, and never make things up. " * 2


def test_shared_system_prompt_matches_uncached_engine_and_transformers(llama):
    path, hf = llama
    prompts = [SYSTEM + q for q in ("What is DeepSpeed?", "Where is Seattle?", "Who wrote Hamlet?")]
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    plain = engine(path, False).generate(prompts, params)
    eng = engine(path, True)
    first = eng.generate(prompts[:1], params)[0]  # computes the prefix and registers it
    hits = eng.stats["prefix_cache_hit_tokens"]
    rest = eng.generate(prompts[1:], params)  # both take it from the cache
    n_system = len(eng.tokenizer.encode(SYSTEM)) // 16 * 16
    assert eng.stats["prefix_cache_hit_tokens"] - hits >= 2 * (n_system - 16)
    for got, want in zip([first] + rest, plain):
        assert got.token_ids == want.token_ids
        for a, b in zip(got.logprobs, want.logprobs):
            assert abs(a.logprob - b.logprob) < 1e-4
    for prompt, got in zip(prompts, [first] + rest):  # and transformers agrees
        ids = torch.tensor([eng.tokenizer.encode(prompt)])
        ref = hf.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, ids.shape[1]:]
        assert got.token_ids == ref.tolist()


def test_multi_turn_reuses_generated_blocks(llama):
    """Turn 2's prompt is turn 1's prompt plus its answer: the answer's K/V, computed while
    decoding, are reused too."""
    path, _ = llama
    eng, plain = engine(path, True), engine(path, False)
    p = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    ids = eng.tokenizer.encode(SYSTEM)
    turn1 = eng.generate([ids], p)[0]
    turn2 = ids + turn1.token_ids + eng.tokenizer.encode(" Tell me more.")
    before = eng.stats["prefix_cache_hit_tokens"]
    got = eng.generate([turn2], p)[0]
    assert eng.stats["prefix_cache_hit_tokens"] - before >= (len(ids) + 40) // 16 * 16 - 16
    assert got.token_ids == plain.generate([turn2], p)[0].token_ids


def test_preemption_chunked_prefill_and_concurrency_keep_outputs(llama):
    """A cache too small for the batch (preemption, eviction), prompts prefilled in chunks,
    and requests sharing prefixes arriving while others still prefill: greedy outputs
    equal the engine without the cache, request by request."""
    path, _ = llama
    kw = dict(num_kv_blocks=24, max_num_batched_tokens=48, max_num_seqs=6)
    base = "The history of the city begins with a small settlement by the river. "
    prompts = [base * (1 + i % 3) + f"Chapter {i}." for i in range(10)]
    p = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    cached, plain = engine(path, True, **kw), engine(path, False, **kw)
    got = cached.generate(prompts, p)
    want = plain.generate(prompts, p)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert cached.stats["num_preemptions"] > 0 and cached.stats["prefix_cache_hit_tokens"] > 0
    assert cached.stats["kv_blocks_free"] == cached.stats["kv_blocks_total"]
