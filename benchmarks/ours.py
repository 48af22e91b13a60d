"""Our engine's measurements: decode at several batch sizes, TTFT, the serving workload."""
from __future__ import annotations

import random
import statistics
import time

import torch

from mii.config import EngineConfig, SamplingParams
from mii.engine.engine import LLMEngine
from mii.engine.inputs import StepInputs


def seconds_per_call(fn, warmup: int, iters: int) -> float:
    """Wall time of one call of ``fn`` (device work included), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def make_engine(path, **kw) -> tuple[LLMEngine, float]:
    t0 = time.perf_counter()
    eng = LLMEngine(EngineConfig(model=str(path), dtype="fp16", show_progress=False, **kw))
    torch.cuda.synchronize()
    return eng, time.perf_counter() - t0


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, min(vocab, 30000)) for _ in range(n)]


class _WaitClock:
    """Times how long the host blocks on the device (the collect of a launched step):
    the rest of a step is host work, which async scheduling overlaps with the GPU."""

    def __init__(self, eng: LLMEngine):
        self.seconds = 0.0
        self._collect = eng.runner.collect
        eng.runner.collect = self

    def detach(self, eng: LLMEngine) -> None:
        eng.runner.collect = self._collect

    def __call__(self, launched):
        t0 = time.perf_counter()
        out = self._collect(launched)
        self.seconds += time.perf_counter() - t0
        return out


# What chat clients commonly send: the sampled figure's settings
SAMPLED = dict(temperature=0.8, top_p=0.95, top_k=50)


def decode(eng: LLMEngine, batch: int, prompt_len: int = 128, new_tokens: int = 128, sampled: bool = False) -> dict:
    """Steady-state decode: timed from the first token of every request to the end. Greedy,
    or with ``sampled`` at the SAMPLED settings."""
    rng = random.Random(batch)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, **(SAMPLED if sampled else {"temperature": 0}))
    for _ in range(batch):
        eng.add_request(_prompt(rng, prompt_len, eng.spec.vocab), params)
    started: set[str] = set()
    while len(started) < batch:  # prefill (possibly chunked) until every request has a token
        started.update(o.request_id for o in eng.step())
    torch.cuda.synchronize()
    steps = tokens = 0
    wait = _WaitClock(eng)
    t0 = last = time.perf_counter()
    gaps = []  # wall time between two steps' returns: one token per sequence each, once steady
    while eng.has_unfinished():
        tokens += sum(len(o.token_ids) for o in eng.step())
        steps += 1
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    t = time.perf_counter() - t0
    wait.detach(eng)
    per_seq = tokens / batch
    gaps = sorted(gaps[1:-1])  # the first and last steps hold async scheduling's fill and drain
    # host_wait near 0: the host (scheduler, packing, launch, detokenizer) is the bottleneck
    return {"batch": batch, "ms_per_step": 1e3 * t / per_seq, "tok_s": tokens / t, "decode_steps": steps,
            "host_wait_ms_per_step": 1e3 * wait.seconds / steps,
            "step_p50_ms": 1e3 * gaps[len(gaps) // 2], "step_p99_ms": 1e3 * gaps[int(0.99 * (len(gaps) - 1))]}


def best_decode(eng: LLMEngine, batch: int, runs: int = 3, sampled: bool = False) -> dict:
    """The fastest of ``runs`` decode runs (a host stall in one run moved the mean of 127
    steps by more than a kernel change did), with every run's mean step kept beside it."""
    results = [decode(eng, batch, sampled=sampled) for _ in range(runs)]
    best = min(results, key=lambda r: r["ms_per_step"])
    return {**best, "runs_ms_per_step": [r["ms_per_step"] for r in results]}


def replay_ms(eng: LLMEngine, batch: int, ctx: int = 192, iters: int = 100) -> float:
    """The GPU's share of a decode step: a bare replay of the batch's decode graph at a
    ``ctx``-token context, each sequence on blocks of its own (no host work, no sampling or
    input copies between replays). Writes K/V into the cache: run it between requests only."""
    graph = staged_decode(eng, batch, ctx)
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def staged_decode(eng: LLMEngine, batch: int, ctx: int = 192) -> torch.cuda.CUDAGraph:
    """The batch's decode graph with a step at a ``ctx``-token context staged in its inputs
    (see :func:`replay_ms`), ready to replay."""
    g, bs = eng.runner.graphs, eng.runner.block_size
    key = ("decode", min(n for n in g.sizes if n >= batch))
    w = -(-ctx // bs)
    tables = [(b * w + j) % eng.runner.num_blocks for b in range(batch) for j in range(w)]
    slots = [tables[b * w + (ctx - 1) // bs] * bs + (ctx - 1) % bs for b in range(batch)]
    step = StepInputs.of([0] * batch, [ctx - 1] * batch, slots, list(range(batch)), [], [], tables,
                         list(range(batch + 1)), [ctx] * batch, w, pin=False)
    g.stage[:step.data.numel()].copy_(step.data)  # what the graph's first kernel unpacks
    return g.graphs[key]


def ttft(eng: LLMEngine, prompt_len: int = 512, repeats: int = 5) -> float:
    rng = random.Random(0)
    times = []
    for _ in range(repeats):
        eng.add_request(_prompt(rng, prompt_len, eng.spec.vocab), SamplingParams(max_new_tokens=1, temperature=0))
        t0 = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def serving_workload(n: int = 1000, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt length, output length) pairs, uniform in [32, 1024] and [16, 512]."""
    rng = random.Random(seed)
    return [(rng.randint(32, 1024), rng.randint(16, 512)) for _ in range(n)]


def serve(eng: LLMEngine, workload: list[tuple[int, int]], prompts: list[list[int]] | None = None) -> dict:
    """Submit every request at once and run to the end. ``prompts``: the token ids of each
    request (else random ones of the workload's lengths)."""
    if prompts is None:  # drawn before the clock starts: a client brings its prompts
        rng = random.Random(1)
        prompts = [_prompt(rng, plen, eng.spec.vocab) for plen, _ in workload]
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    gaps: list[float] = []
    for prompt, (_, olen) in zip(prompts, workload):
        eng.add_request(prompt, SamplingParams(max_new_tokens=olen, temperature=0, ignore_eos=True))
    produced = 0
    wait = _WaitClock(eng)
    steps = 0
    while eng.has_unfinished():
        outs = eng.step()
        steps += 1
        now = time.perf_counter()
        for o in outs:
            produced += len(o.token_ids)
            if o.request_id not in first:
                first[o.request_id] = now - t0
            else:
                gaps.append(now - last[o.request_id])
            last[o.request_id] = now
    wait.detach(eng)
    total = time.perf_counter() - t0
    ttfts = sorted(first.values())
    gaps.sort()
    return {"requests": len(workload), "output_tokens": produced, "seconds": total,
            "output_tok_s": produced / total,
            "ttft_ms": {"mean": 1e3 * statistics.mean(ttfts), "p50": 1e3 * _pct(ttfts, 50), "p99": 1e3 * _pct(ttfts, 99)},
            "itl_ms": {"mean": 1e3 * statistics.mean(gaps), "p50": 1e3 * _pct(gaps, 50), "p99": 1e3 * _pct(gaps, 99)},
            "preemptions": eng.scheduler.num_preemptions,
            "steps": steps, "host_wait_s": wait.seconds, "host_busy_s": total - wait.seconds}


def _pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]
