"""Engine startup, cold and warm, with and without compiling the Triton kernels in parallel.

Each start is a fresh process (a kernel compiled in memory would otherwise serve the next
engine), pointed at a Triton cache of its own: empty for a cold start, as on a new machine
or container, and left by the cold start for a warm one. Starts alternate between serial
compiles (``COMPILE_THREADS = 0``: each kernel as capture meets it) and the default, and
each one ends with a short greedy and sampled generate whose tokens must match.

    python -m benchmarks.startup --models gpt2-124m,llama-1b --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).parent


def child(path: str, threads: int) -> dict:
    """One start in this process: seconds to a ready engine, kernels compiled, tokens."""
    import torch
    from triton import knobs

    from mii.config import SamplingParams
    from mii.engine import model_runner
    from . import ours

    compiled: list[str] = []
    knobs.runtime.jit_post_compile_hook = lambda **kw: compiled.append(kw["fn"].name)
    model_runner.COMPILE_THREADS = threads
    eng, startup = ours.make_engine(path)
    at_start = len(compiled)
    outs = eng.generate([[5, 6, 7, 8, 9] * 6, [11, 12, 13] * 20],
                        [SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True),
                         SamplingParams(max_new_tokens=16, temperature=0.8, seed=1, ignore_eos=True)])
    torch.cuda.synchronize()
    return {"threads": threads, "startup_s": startup, "compiled": at_start, "compiled_later": len(compiled) - at_start,
            "tokens": [o.token_ids for o in outs]}


def start(path: Path, threads: int, cache: Path) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-m", "benchmarks.startup", "--child", str(path), str(threads)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"start with {threads} threads failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(name: str, root: Path, repeats: int) -> dict:
    import torch

    from mii.engine.model_runner import COMPILE_THREADS
    from .models import build

    path, model = build(name, root)
    del model
    torch.cuda.empty_cache()
    runs = []
    for r in range(repeats):
        caches = {t: root / f"triton-{name}-{t}-{r}" for t in (0, COMPILE_THREADS)}
        for kind in ("cold", "warm"):  # the warm start reuses the cache its cold start filled
            for t in (0, COMPILE_THREADS) if r % 2 == 0 else (COMPILE_THREADS, 0):
                runs.append({"kind": kind, **start(path, t, caches[t])})
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "tokens"}), flush=True)
    tokens = [r.pop("tokens") for r in runs]
    return {"model": name, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpus": os.cpu_count(),
            "threads": COMPILE_THREADS, "runs": runs, "same_tokens": all(t == tokens[0] for t in tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="gpt2-124m,llama-1b")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--child", nargs=2, metavar=("PATH", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    import triton
    with tempfile.TemporaryDirectory() as tmp:
        for name in filter(None, args.models.split(",")):
            res = bench(name, Path(tmp), args.repeats)
            res["triton"] = triton.__version__
            (Path(args.out) / f"startup-{name}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
