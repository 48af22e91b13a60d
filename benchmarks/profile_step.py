"""Where a bs=1 decode step's time goes, on one shape: the whole engine step against a
bare replay of its CUDA graph (the GPU's share), and the GPU kernels of one step
grouped by kind, from torch.profiler.

    python -m benchmarks.profile_step --model llama-1b --out DIR
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from . import ours
from .models import build, weight_bytes
from .run import copy_bandwidth


def _kind(name: str) -> str:
    n = name.lower()
    for key, kind in (("gemv", "gemm"), ("gemm", "gemm"), ("sm90", "gemm"), ("cutlass", "gemm"), ("matmul", "gemm"),
                      ("_decode_kernel", "attention"), ("_merge_kernel", "attention"), ("_prefill_kernel", "attention"),
                      ("rotary", "rotary+kv write"), ("norm", "norm"), ("act", "activation"), ("argmax", "sampling"),
                      ("reduce", "sampling"), ("copy", "copies"), ("fill", "copies"), ("index", "copies")):
        if key in n:
            return kind
    return "other"


def profile(name: str, root: Path) -> dict:
    path, model = build(name, root)
    wb = weight_bytes(model)
    del model
    torch.cuda.empty_cache()
    eng, _ = ours.make_engine(path)
    ours.decode(eng, 1, new_tokens=16)
    step = ours.decode(eng, 1)
    g = eng.runner.graphs
    key = ("decode", 1)
    g.ctx_lens[:1].fill_(192)  # a context like the decode benchmark's
    for _ in range(10):
        g.graphs[key].replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(100):
        g.graphs[key].replay()
    end.record()
    torch.cuda.synchronize()
    replay_ms = start.elapsed_time(end) / 100
    # kernels of one eager forward: the same kernels the graph holds, timed on the device
    ids, ctx = g.input_ids[:1], g._decode_ctx(1)
    with torch.inference_mode():
        eng.runner.model(ids, ctx, eng.runner.ops)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eng.runner.model(ids, ctx, eng.runner.ops)
            torch.cuda.synchronize()
    by_kind: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us > 0 and ev.count:
            k = by_kind[_kind(ev.key)]
            k[0] += ev.count
            k[1] += us
    kernels_ms = sum(v[1] for v in by_kind.values()) / 1e3
    bw = copy_bandwidth()
    return {"model": name, "device": torch.cuda.get_device_name(), "weight_bytes": wb,
            "roofline_ms": 1e3 * wb / bw, "engine_step_ms": step["ms_per_step"], "graph_replay_ms": replay_ms,
            "kernel_sum_ms": kernels_ms, "kernels": {k: {"count": v[0], "us": round(v[1], 1)}
                                                     for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][1])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = profile(args.model, Path(tmp))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"profile-{args.model}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
