"""Our engine's measurements: decode at several batch sizes, TTFT, the serving workload."""
from __future__ import annotations

import random
import statistics
import time

import torch

from mii.config import EngineConfig, SamplingParams
from mii.engine.engine import LLMEngine


def make_engine(path, **kw) -> tuple[LLMEngine, float]:
    t0 = time.perf_counter()
    eng = LLMEngine(EngineConfig(model=str(path), dtype="fp16", show_progress=False, **kw))
    torch.cuda.synchronize()
    return eng, time.perf_counter() - t0


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, min(vocab, 30000)) for _ in range(n)]


def _timed_steps(eng: LLMEngine) -> list[tuple[float, bool, list]]:
    """Run to completion; per step: (seconds, decode-only?, outputs)."""
    steps = []
    while eng.has_unfinished():
        t0 = time.perf_counter()
        batch = eng.scheduler.schedule()
        tokens, lps = eng.runner.run(batch)  # returns host lists: the step is synchronous
        outs = eng.postprocess(batch, tokens, lps)
        steps.append((time.perf_counter() - t0, all(b.num_tokens == 1 for b in batch), outs))
    return steps


def decode(eng: LLMEngine, batch: int, prompt_len: int = 128, new_tokens: int = 128) -> dict:
    rng = random.Random(batch)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    for _ in range(batch):
        eng.add_request(_prompt(rng, prompt_len, eng.spec.vocab), params)
    steps = _timed_steps(eng)
    dec = [s for s in steps if s[1] and len(s[2]) == batch]
    t = sum(s[0] for s in dec)
    return {"batch": batch, "ms_per_step": 1e3 * t / len(dec), "tok_s": batch * len(dec) / t,
            "decode_steps": len(dec)}


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


def serve(eng: LLMEngine, workload: list[tuple[int, int]]) -> dict:
    rng = random.Random(1)
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    gaps: list[float] = []
    for plen, olen in workload:
        eng.add_request(_prompt(rng, plen, eng.spec.vocab),
                        SamplingParams(max_new_tokens=olen, temperature=0, ignore_eos=True))
    produced = 0
    phases = dict.fromkeys(("schedule", "prepare", "forward_launch", "sample_and_wait", "postprocess"), 0.0)
    runner = eng.runner
    while eng.has_unfinished():
        # eng.step(), unrolled to time its phases without adding syncs: the forward is
        # queued asynchronously and the sampler's .tolist() waits for the GPU.
        t = [time.perf_counter()]
        batch = eng.scheduler.schedule()
        t.append(time.perf_counter())
        ids, ctx = runner.prepare(batch)
        t.append(time.perf_counter())
        logits = runner.forward(ids, ctx)
        t.append(time.perf_counter())
        seqs = [b.seq for b in batch if b.samples]
        tokens, lps = runner.sampler(logits, seqs) if seqs else ([], [])
        t.append(time.perf_counter())
        outs = eng.postprocess(batch, tokens, lps)
        t.append(time.perf_counter())
        for name, a, b in zip(phases, t, t[1:]):
            phases[name] += b - a
        now = t[-1]
        for o in outs:
            produced += len(o.token_ids)
            if o.request_id not in first:
                first[o.request_id] = now - t0
            else:
                gaps.append(now - last[o.request_id])
            last[o.request_id] = now
    total = time.perf_counter() - t0
    ttfts = sorted(first.values())
    gaps.sort()
    return {"requests": len(workload), "output_tokens": produced, "seconds": total,
            "output_tok_s": produced / total,
            "ttft_ms": {"mean": 1e3 * statistics.mean(ttfts), "p50": 1e3 * _pct(ttfts, 50), "p99": 1e3 * _pct(ttfts, 99)},
            "itl_ms": {"mean": 1e3 * statistics.mean(gaps), "p50": 1e3 * _pct(gaps, 50), "p99": 1e3 * _pct(gaps, 99)},
            "preemptions": eng.scheduler.num_preemptions,
            "phase_seconds": phases}


def _pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]
