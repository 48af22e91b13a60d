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
import statistics
import tempfile
import time
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


def profile(name: str, root: Path, mode: str = "fp16", replays: int = 5) -> dict:
    """A bs=1 decode step: the engine's, a bare replay of its graph, and where that replay's
    time goes, kernel by kernel (:func:`chain_shares`), from torch.profiler's trace of the
    replay itself: the kernels as the step runs them, under PDL and in the graph."""
    path, model = build(name, root)
    wb = weight_bytes(model)
    del model
    torch.cuda.empty_cache()
    eng, _ = ours.make_engine(path, quantize=None if mode == "fp16" else mode)
    if mode != "fp16":  # the bytes the quantized step streams
        wb = weight_bytes_on_device(eng, streamed=True)
    ours.decode(eng, 1, new_tokens=16)
    step = ours.decode(eng, 1)
    replay_ms = ours.replay_ms(eng, 1)  # its step stays in the graph's buffers, at a 192-token context
    runs = _traced_replays(ours.staged_decode(eng, 1), replays)
    bw = copy_bandwidth()
    shares = [chain_shares(r) for r in runs]
    med = [statistics.median(s) for s in zip(*shares)]  # each kernel's share, median over the replays
    return {"model": name if mode == "fp16" else f"{name} {mode}", "device": torch.cuda.get_device_name(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "pdl": pdl.use(torch.device("cuda")), "weight_bytes": wb, "copy_bandwidth_GBs": bw / 1e9,
            "roofline_ms": 1e3 * wb / bw, "engine_step_ms": step["ms_per_step"], "graph_replay_ms": replay_ms,
            "traced_replay_ms": statistics.median(sum(s) for s in shares) / 1e3, "replays_traced": replays,
            "kernels": _group((kname, 1, us) for (kname, _, _), us in zip(runs[0], med)),
            "linears": _linear_shares(eng.runner.model, runs[0], med, bw)}


def chain_shares(kernels: list[tuple[str, float, float]]) -> list[float]:
    """How far each kernel (name, start, end), in start order, moves the end of the chain: its end
    past the latest end before it, 0 for one that ends inside an earlier one. Under PDL a kernel
    starts before the one before it ends, so durations overlap and do not add up; these shares
    do, to the span from the first start to the last end."""
    out, last = [], None
    for _, start, end in kernels:
        last = start if last is None else last
        out.append(max(0.0, end - last))
        last = max(last, end)
    return out


def _traced_replays(graph, replays: int) -> list[list[tuple[str, float, float]]]:
    """The kernels of each of ``replays`` replays of a CUDA graph: (name, start, end) in us, in
    start order. One untraced replay leads, and a replay waits for the one before it."""
    graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
            torch.cuda.synchronize()
    evs = sorted(((e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e[1])
    n = len(evs) // replays
    if n == 0 or len(evs) != n * replays:
        raise RuntimeError(f"{len(evs)} kernels traced over {replays} replays of one graph")
    return [evs[i * n:(i + 1) * n] for i in range(replays)]


def _module_bytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def _linear_shares(model, kernels, shares, bw: float) -> dict:
    """The GEMV kernels' shares by linear (qkv, o, up, down, summed over the layers, and the
    LM head) against their bytes over the copy bandwidth: in order, when the step runs one
    GEMV per linear of sequential residual blocks, then the LM head; else {}."""
    gemv = [us for (kname, _, _), us in zip(kernels, shares) if _kind(kname) == "gemm"]
    layers = model.layers
    if layers[0].parallel or len(gemv) != 4 * len(layers) + 1:
        return {}
    per_layer = [(b.attn.qkv, b.attn.o, b.mlp.up, b.mlp.down) for b in layers]  # in the step's order
    out = {}
    for i, name in enumerate(("qkv", "o", "up", "down")):
        out[name] = {"us": round(sum(gemv[i:-1:4]), 1),
                     "bytes_us": round(1e6 * sum(_module_bytes(mods[i]) for mods in per_layer) / bw, 1)}
    out["lm_head"] = {"us": round(gemv[-1], 1), "bytes_us": round(1e6 * _module_bytes(model.lm_head) / bw, 1)}
    return out


def _by_kind(prof) -> dict:
    """A profile's device kernels, their counts and total us, by kind."""
    evs = ((ev.key, ev.count, getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0))
           for ev in prof.key_averages())
    return _group((name, n, us) for name, n, us in evs if us > 0 and n)


def _group(kernels) -> dict:
    """(kernel name, count, us) summed by kind, the largest first."""
    by_kind: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for name, n, us in kernels:
        k = by_kind[_kind(name)]
        k[0] += n
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
