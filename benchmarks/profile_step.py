"""Where a bs=1 decode step's time goes, on one shape: the whole engine step against a
bare replay of its CUDA graph (the GPU's share), and the GPU kernels of one step
grouped by kind, from torch.profiler. With ``--prefill N``, the kernels of an N-token
prompt's prefill instead, per quantization mode (``--quantize``).

    python -m benchmarks.profile_step --model llama-1b --out DIR
    python -m benchmarks.profile_step --model llama-7b --prefill 4096 --quantize fp16 w8a8 --out DIR
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from kernels import pdl

from . import ours
from .models import build, weight_bytes
from .quant import weight_bytes_on_device
from .run import copy_bandwidth


def _kind(name: str) -> str:
    n = name.lower()
    for key, kind in (("reduce_add_norm", "all-reduce+norm"), ("gemv", "gemm"), ("skinny", "gemm"), ("w8a8", "gemm"),
                      ("one_shot", "all-reduce"), ("_gather_kernel", "all-gather"), ("nccl", "all-reduce"), ("quant", "act quant"), ("dequant", "dequantize"), ("gemm", "gemm"),
                      ("sm90", "gemm"), ("cutlass", "gemm"), ("matmul", "gemm"),
                      ("_decode_kernel", "attention"), ("_prefill_kernel", "attention"),
                      ("rotary", "rotary+kv write"), ("norm", "norm"), ("act", "activation"), ("argmax", "sampling"),
                      ("reduce", "sampling"), ("copy", "copies"), ("fill", "copies"), ("index", "copies")):
        if key in n:
            return kind
    return "other"


def profile(name: str, root: Path, mode: str = "fp16") -> dict:
    path, model = build(name, root)
    wb = weight_bytes(model)
    del model
    torch.cuda.empty_cache()
    eng, _ = ours.make_engine(path, quantize=None if mode == "fp16" else mode)
    if mode != "fp16":  # the bytes the quantized step streams
        wb = weight_bytes_on_device(eng, streamed=True)
    ours.decode(eng, 1, new_tokens=16)
    step = ours.decode(eng, 1)
    g = eng.runner.graphs
    replay_ms = ours.replay_ms(eng, 1)  # its step stays in the graph's buffers, at a 192-token context
    # kernels of one eager forward: the same kernels the graph holds, timed on the device
    ids, ctx = g.input_ids[:1], g._decode_ctx(1)
    with torch.inference_mode():
        eng.runner.model(ids, ctx, eng.runner.ops)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eng.runner.model(ids, ctx, eng.runner.ops)
            torch.cuda.synchronize()
    by_kind = _by_kind(prof)
    kernels_ms = sum(v["us"] for v in by_kind.values()) / 1e3
    bw = copy_bandwidth()
    return {"model": name if mode == "fp16" else f"{name} {mode}", "device": torch.cuda.get_device_name(),
            "pdl": pdl.use(torch.device("cuda")), "weight_bytes": wb,
            "roofline_ms": 1e3 * wb / bw, "engine_step_ms": step["ms_per_step"], "graph_replay_ms": replay_ms,
            "kernel_sum_ms": kernels_ms, "kernels": by_kind}


def _by_kind(prof) -> dict:
    by_kind: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us > 0 and ev.count:
            k = by_kind[_kind(ev.key)]
            k[0] += ev.count
            k[1] += us
    return {k: {"count": v[0], "us": round(v[1], 1)} for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][1])}


def profile_prefill(name: str, root: Path, n: int, modes: list[str]) -> dict:
    """Kernels of one n-token prefill (chunked as the engine chunks it), per mode."""
    path, model = build(name, root)
    del model
    torch.cuda.empty_cache()
    out = {"model": name, "device": torch.cuda.get_device_name(), "prompt_tokens": n, "modes": {}}
    for mode in modes:
        eng, _ = ours.make_engine(path, quantize=None if mode == "fp16" else mode)
        ms = ours.ttft(eng, prompt_len=n, repeats=3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ours.ttft(eng, prompt_len=n, repeats=1)
        kinds = _by_kind(prof)
        out["modes"][mode] = {"ttft_ms": ms, "kernel_sum_ms": sum(v["us"] for v in kinds.values()) / 1e3,
                              "kernels": kinds}
        eng.shutdown()
        del eng
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--prefill", type=int, default=0, help="profile an N-token prefill instead of decode")
    ap.add_argument("--quantize", nargs="+", default=["fp16"], help="modes for --prefill; decode takes the first")
    ap.add_argument("--no-pdl", action="store_true", help="launch without programmatic dependent launch, so "
                    "each kernel's profiled time excludes waiting for the one before")
    args = ap.parse_args()
    pdl.set_enabled(not args.no_pdl)
    with tempfile.TemporaryDirectory() as tmp:
        if args.prefill:
            res = profile_prefill(args.model, Path(tmp), args.prefill, args.quantize)
            fname = f"profile-prefill-{args.model}.json"
        else:
            mode = args.quantize[0]
            res = profile(args.model, Path(tmp), mode)
            fname = f"profile-{args.model}{'' if mode == 'fp16' else '-' + mode}.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / fname).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
