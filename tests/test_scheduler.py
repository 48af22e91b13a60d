"""The scheduler's admission headroom, driven directly (no model): a new prompt is admitted
only where the running sequences keep room for their next block, and a workload that fills
the KV cache then preempts and recomputes a tenth or less of what filling the cache to the
last block does."""
import random

import pytest

from mii.config import SamplingParams
from mii.engine.block_manager import BlockManager
from mii.engine.scheduler import Scheduler
from mii.engine.sequence import Sequence


def seq(name: str, prompt: int, new: int) -> Sequence:
    return Sequence(name, [1] * prompt, prompt, SamplingParams(max_new_tokens=new, ignore_eos=True))


class NoHeadroom(Scheduler):
    """The admission rule before headroom: fill the cache to its last block."""

    def _headroom(self, seq: Sequence) -> int:
        return 0


def drive(sched: Scheduler) -> int:
    """Run every step to completion as the engine does (a sampled token per caught-up
    sequence); returns the prompt tokens computed, recomputation included."""
    prefilled = steps = 0
    while sched.has_work():
        batch = sched.schedule()
        assert batch, "a step with work waiting scheduled nothing"
        steps += 1
        assert steps < 100_000
        for item in batch:
            s = item.seq
            samples = item.samples  # before the sequence moves past this step's tokens
            if s.num_computed < s.num_prompt:
                prefilled += min(item.num_tokens, s.num_prompt - s.num_computed)
            s.num_computed += item.num_tokens
            assert len(s.block_table) * sched.blocks.block_size >= s.num_computed
            if samples:
                s.token_ids.append(1)
                if s.num_generated >= s.params.max_new_tokens:
                    sched.finish(s, "length")
    assert sched.blocks.num_free == sched.blocks.num_blocks
    return prefilled


def workload(n: int, seed: int = 0) -> list[Sequence]:
    rng = random.Random(seed)
    return [seq(f"r{i}", rng.randint(8, 128), rng.randint(4, 64)) for i in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_headroom_preempts_a_tenth_of_what_a_full_cache_does(seed):
    # 200 requests of up to 192 tokens against 1,600 tokens of KV: the cache is the limit.
    results = {}
    for cls in (Scheduler, NoHeadroom):
        sched = cls(BlockManager(100, 16), max_num_seqs=64, max_num_batched_tokens=256)
        reqs = workload(200, seed)
        for r in reqs:
            sched.add(r)
        prefilled = drive(sched)
        assert all(r.finished and r.num_generated == r.params.max_new_tokens for r in reqs)
        results[cls] = (sched.num_preemptions, prefilled, sum(r.num_prompt for r in reqs))
    (pre, prefilled, prompts), (pre_full, prefilled_full, _) = results[Scheduler], results[NoHeadroom]
    assert pre_full >= 40, "the workload was meant to thrash a full cache"
    # The headroom covers one block per sequence, not its whole future: a few preemptions remain.
    assert pre <= pre_full // 10 and prefilled - prompts <= (prefilled_full - prompts) // 10


def test_admission_keeps_one_block_per_running_decode():
    blocks = BlockManager(10, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    running = [seq(f"d{i}", 4, 8) for i in range(3)]
    for r in running:
        sched.add(r)

    def step(*waiting: Sequence) -> list[str]:
        sched.waiting.clear()
        sched.waiting.extend(waiting)
        names = [item.seq.request_id for item in sched.schedule()]
        for r in running:  # each catches up and samples a token
            r.num_computed = r.num_tokens
            r.token_ids.append(1)
        return names

    assert step(*running) == ["d0", "d1", "d2"]  # prefill: one full block each
    # The decodes take a second block each (4 of 10 left) and will want a third within
    # 4 tokens: 3 blocks stay free, so only a 1-block prompt may enter.
    assert step(seq("two", 8, 1)) == ["d0", "d1", "d2"] and blocks.num_free == 4
    assert step(seq("one", 4, 1)) == ["d0", "d1", "d2", "one"] and blocks.num_free == 3


def test_a_prompt_as_large_as_the_cache_still_runs_alone():
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=8, max_num_batched_tokens=64)
    whole = seq("whole", 31, 1)  # 32 tokens with its one new one: every block
    sched.add(whole)
    assert drive(sched) == 31 and whole.finished and sched.num_preemptions == 0
