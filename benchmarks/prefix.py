"""Automatic prefix caching on a GPU: `python -m benchmarks.prefix --model llama-1b --out DIR`.

Two measurements, each with the cache on and off (``EngineConfig.enable_prefix_caching``):
- TTFT of a 2,048-token prompt whose first 1,984 tokens another request already computed
  (a long system prompt or conversation), median of 5 prompts with different tails;
- a serving run: 200 requests sharing a 1,024-token system prompt, each with its own
  32-256 tokens after it and 64 output tokens, all submitted at once.
Writes ``prefix-MODEL.json`` (``benchmarks.report`` puts it in RESULTS.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mii.config import SamplingParams

from . import ours
from .models import build

SHARED, TAIL = 1984, 64


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, min(vocab, 30000)) for _ in range(n)]


def ttft_shared(eng, repeats: int = 5) -> float:
    rng = random.Random(0)
    prefix = _tokens(rng, SHARED, eng.spec.vocab)
    eng.generate([prefix + _tokens(rng, TAIL, eng.spec.vocab)], SamplingParams(max_new_tokens=1))  # computes it
    times = []
    for _ in range(repeats):
        eng.add_request(prefix + _tokens(rng, TAIL, eng.spec.vocab), SamplingParams(max_new_tokens=1, temperature=0))
        t0 = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def shared_system_serving(eng, n: int = 200) -> dict:
    rng = random.Random(1)
    system = _tokens(rng, 1024, eng.spec.vocab)
    prompts = [system + _tokens(rng, rng.randint(32, 256), eng.spec.vocab) for _ in range(n)]
    return ours.serve(eng, [(len(p), 64) for p in prompts], prompts)


def run(model: str, root: Path) -> dict:
    path, hf = build(model, root)
    del hf
    torch.cuda.empty_cache()
    out = {"model": model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "shared_tokens": SHARED, "tail_tokens": TAIL}
    for caching in (False, True):
        eng, _ = ours.make_engine(path, enable_prefix_caching=caching)
        ours.ttft(eng, 512, repeats=2)  # warm-up
        key = "on" if caching else "off"
        out[key] = {"ttft_shared_ms": ttft_shared(eng), "serving": shared_system_serving(eng)}
        out[key]["hit_tokens"] = eng.stats["prefix_cache_hit_tokens"]
        out[key]["query_tokens"] = eng.stats["prefix_cache_query_tokens"]
        print(json.dumps({key: out[key]}), flush=True)
        eng.shutdown()
        del eng
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=["llama-1b"])
    ap.add_argument("--out", type=Path, default=Path("out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.model:
            (args.out / f"prefix-{m}.json").write_text(json.dumps(run(m, Path(tmp)), indent=1))


if __name__ == "__main__":
    main()
