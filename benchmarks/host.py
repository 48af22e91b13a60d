"""Host work per engine step, on the CPU: what bounds small models at large batches.

Two measurements, both on this machine's CPU, compared as ratios within one run:

1. **Phases of a step.** A tiny random Llama runs through the real engine (decode at
   bs=128 with 128-token prompts, then a serving mix of 400 requests), with the step's
   phases timed: scheduling, packing inputs, the forward pass, sampling, advancing and
   applying tokens (detokenizing, stop checks, outputs). Host work is everything but the
   forward pass and sampling, which the GPU runs in a real deployment. The code is the
   same as on a GPU; the GPU path adds its own launches and copies.
2. **A cost model of admission** (``--schedule``). The real ``Scheduler`` drives the 7B
   serving workload (1,000 requests, prompts U[32, 1024], outputs U[16, 512]) against the
   KV cache the H100 run had (119,920 tokens), with and without the admission headroom.
   A step's cost is modeled on the H100 as the larger of the weight read (13.2 GB at
   3.0 TB/s) and the tokens' compute (2 x 6.6 GFLOP at 600 TFLOP/s), plus its decodes' K/V
   reads (0.5 MB a token at 3.0 TB/s). It counts preemptions and prompt tokens computed
   again; the seconds are a model's, for comparing rules, not a measurement.

    python -m benchmarks.host [--schedule] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from mii.config import EngineConfig, SamplingParams
from mii.engine.block_manager import BlockManager
from mii.engine.engine import LLMEngine
from mii.engine.scheduler import Scheduler
from mii.engine.sequence import Sequence

from .ours import serving_workload

PHASES = (("scheduler", "schedule"), ("runner", "pack"), ("runner", "forward"), ("sampler", "sample"),
          ("engine", "_advance"), ("engine", "_apply"))


def _timed(eng: LLMEngine) -> collections.Counter:
    """Time the step's phases by wrapping them on this engine's objects."""
    spent: collections.Counter = collections.Counter()
    owners = {"scheduler": eng.scheduler, "runner": eng.runner, "sampler": eng.runner.sampler, "engine": eng}
    for owner, name in PHASES:
        obj = owners[owner]
        fn = getattr(obj, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent[_name] += time.perf_counter() - t0
        setattr(obj, name, wrapped)
    return spent


def _run(eng: LLMEngine, spent: collections.Counter, requests: list[tuple[int, int]]) -> dict:
    rng = random.Random(1)
    for plen, olen in requests:
        eng.add_request([rng.randrange(3, eng.spec.vocab) for _ in range(plen)],
                        SamplingParams(max_new_tokens=olen, temperature=0, ignore_eos=True))
    spent.clear()
    steps, t0 = 0, time.perf_counter()
    while eng.has_unfinished():
        eng.step()
        steps += 1
    wall = time.perf_counter() - t0
    ms = {k: 1e3 * v / steps for k, v in spent.items()}
    return {"steps": steps, "host_ms_per_step": 1e3 * (wall - spent["forward"] - spent["sample"]) / steps,
            "phase_ms_per_step": dict(sorted(ms.items(), key=lambda kv: -kv[1]))}


def phases() -> dict:
    from tests.tiny_models import make_tiny_model
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model("LlamaForCausalLM", Path(tmp) / "llama")
        eng = LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="fp32", show_progress=False))
        spent = _timed(eng)
        _run(eng, spent, [(128, 8)] * 128)  # warm-up
        decode = _run(eng, spent, [(128, 64)] * 128)
        rng = random.Random(0)
        serving = _run(eng, spent, [(rng.randint(16, 200), rng.randint(16, 50)) for _ in range(400)])
    return {"decode_bs128": decode, "serving_400": serving}


class _NoHeadroom(Scheduler):
    """Admission as it was before the headroom: the cache filled to its last block."""

    def _headroom(self, seq: Sequence) -> int:
        return 0


def admission_model(kv_tokens: int = 119_920, block_size: int = 16) -> dict:
    cost = dict(weights_s=13.2e9 / 3.0e12, token_s=2 * 6.6e9 / 600e12, kv_token_s=0.5e6 / 3.0e12)
    out = {"kv_tokens": kv_tokens, "cost_model": cost}
    for name, cls in (("headroom", Scheduler), ("full_cache", _NoHeadroom)):
        sched = cls(BlockManager(kv_tokens // block_size, block_size), max_num_seqs=256, max_num_batched_tokens=2048)
        work = serving_workload(1000)
        for i, (plen, olen) in enumerate(work):
            sched.add(Sequence(f"r{i}", [1] * plen, plen, SamplingParams(max_new_tokens=olen, ignore_eos=True)))
        steps = prefilled = 0
        seconds = 0.0
        while sched.has_work():
            batch = sched.schedule()
            steps += 1
            tokens = sum(item.num_tokens for item in batch)
            kv = sum(item.seq.num_computed + 1 for item in batch if item.num_tokens == 1)
            seconds += max(cost["weights_s"], tokens * cost["token_s"]) + kv * cost["kv_token_s"]
            for item in batch:
                s = item.seq
                samples = item.samples  # before the sequence moves past this step's tokens
                prefilled += max(0, min(item.num_tokens, s.num_prompt - s.num_computed))
                s.num_computed += item.num_tokens
                if samples:
                    s.token_ids.append(1)
                    if s.num_generated >= s.params.max_new_tokens:
                        sched.finish(s, "length")
        out[name] = {"steps": steps, "preemptions": sched.num_preemptions, "prompt_tokens_computed": prefilled,
                     "prompt_tokens": sum(p for p, _ in work), "model_seconds": seconds}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedule", action="store_true", help="also run the admission cost model")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    res = {"meta": {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d")}}
    res.update(phases())
    if args.schedule:
        res["admission"] = admission_model()
    (args.out / "host-cpu.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
