"""Issue 6's W8A16 target against an outside yardstick: `python -m benchmarks.compiled_ref --out DIR [--ours]`.

The yardstick is gpt-fast's recipe on the same GPU: a plain-torch Llama decoder compiled whole by
inductor (``benchmarks/compiled_llama.py``), with coordinate-descent tuning as gpt-fast sets it,
and its weight-only int8 linears. For the model shape (default llama-7b) at bs=1 it measures:

- the reference's decode step: one step, its token fed back and its position advanced, captured
  in a CUDA graph and replayed from a ``--ctx``-token cache. Modes: fp16; int8 with a scale per
  row (gpt-fast's); int8 with a scale per group of 128 (our format). Each is compared with its
  roofline (the bytes it streams over the copy bandwidth) and with fp16. The compiled step's
  logits are checked against the same model run eagerly.
- with ``--ours``: our engine's bare replay of its bs=1 decode graph at the same context
  (``benchmarks.ours.replay_ms``), fp16 and W8A16, in the same run.
- each layer linear alone at M = 1, back to back in a CUDA graph (``benchmarks/timing.py``):
  cuBLAS fp16, inductor's fp16 and int8 GEMVs, and ours for fp16 and W8A16.

Writes ``reference-MODEL.json`` under --out.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .compiled_llama import CompiledLlama, int8_linear, quantize_int8
from .linears import linear_shapes, quantized
from .models import SHAPES, build
from .timing import copies_for, copy_bandwidth, time_calls

MODES = {"fp16": (False, None), "int8_row": (True, None), "int8_g128": (True, 128)}


def _settings() -> None:
    import torch._dynamo
    import torch._inductor.config as inductor

    inductor.coordinate_descent_tuning = True  # what lets a one-row matmul become a fused GEMV
    torch._dynamo.config.cache_size_limit = 64  # one compile per linear shape and mode


def step_ms(model: CompiledLlama, ctx: int, steps: int, rounds: int = 5) -> dict:
    """The compiled step's time at bs=1 from a ``ctx``-token cache of random K/V (the time does
    not depend on the values), median over ``rounds`` of ``steps`` replays."""
    model.k_cache.normal_(0, 1)
    model.v_cache.normal_(0, 1)
    tok = torch.ones(1, 1, dtype=torch.long, device="cuda")
    pos = torch.tensor([ctx], device="cuda")
    t0 = time.perf_counter()
    fwd = torch.compile(model.forward, fullgraph=True, dynamic=False)
    with torch.no_grad():
        check = (fwd(tok, pos) - model(tok, pos)).abs().max().item()  # both write the same K/V at ctx
        print(f"  compiled in {time.perf_counter() - t0:.0f} s", flush=True)

        def one():
            tok.copy_(fwd(tok, pos).argmax(-1, keepdim=True))
            pos.add_(1)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                pos.fill_(ctx)
                one()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            one()
    times = []
    for _ in range(rounds):
        pos.fill_(ctx)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / steps)
    del graph
    return {"ms": statistics.median(times), "rounds_ms": times, "compile_s": compile_s,
            "compiled_vs_eager_max_abs_logit_diff": check, "streamed_bytes": model.streamed_bytes()}


def linear_rows(model: str, bw: float) -> list[dict]:
    """Each layer linear at M = 1: us and % of the copy bandwidth, per kernel."""
    from kernels.quant_gemm import wxa16_gemm
    from kernels.skinny_gemm import skinny_linear

    # One compiled function a kind: it specializes per shape and per scale layout.
    gemv16, int8 = torch.compile(F.linear, dynamic=False), torch.compile(int8_linear, dynamic=False)
    rows = []
    for name, (N, K) in linear_shapes(model).items():
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        w16 = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies_for(2 * N * K))]
        args = {"cublas": (F.linear, [(x, w) for w in w16]), "gemv16": (gemv16, [(x, w) for w in w16]),
                "ours_fp16": (skinny_linear, [(x, w) for w in w16])}
        for mode, group in (("int8_row", None), ("int8_g128", 128)):
            args[mode] = (int8, [(x, *quantize_int8(w, group)) for w in w16])
        ours8 = [quantized(N, K, 8, 128) for _ in range(copies_for(N * K))]
        args["ours_w8a16"] = (lambda x, q, s: wxa16_gemm(x, q, s, None, 8), [(x, q, s) for q, s in ours8])
        row = {"linear": name, "N": N, "K": K}
        for kind, (fn, calls) in args.items():
            a = calls[0]
            nbytes = sum(t.numel() * t.element_size() for t in a[1:])  # the weight and its scales
            us = time_calls(fn, calls) * 1e6
            row[kind] = {"us": us, "bytes": nbytes, "pct_copy_bw": 100 * nbytes / (us * 1e-6) / bw}
        rows.append(row)
        print(name, {k: round(v["us"], 2) for k, v in row.items() if isinstance(v, dict)}, flush=True)
        del w16, args, ours8
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="llama-7b", choices=[n for n, (a, _) in SHAPES.items() if a.startswith("Llama")])
    ap.add_argument("--ctx", type=int, default=192, help="context of the timed steps (our benchmarks' mean)")
    ap.add_argument("--steps", type=int, default=32, help="replays per timing round")
    ap.add_argument("--modes", default=",".join(MODES), help="reference modes to time")
    ap.add_argument("--ours", action="store_true", help="also time our engine's fp16 and W8A16 replays")
    ap.add_argument("--no-linears", action="store_true", help="skip the per-linear table")
    args = ap.parse_args()
    _settings()
    import transformers
    import triton

    bw = copy_bandwidth()
    res = {"model": args.model, "ctx": args.ctx, "max_len": args.ctx + args.steps + 1,
           "meta": {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                    "torch": torch.__version__, "triton": triton.__version__,
                    "transformers": transformers.__version__, "copy_bw_gb_s": bw / 1e9}, "steps": {}}
    root = Path(tempfile.mkdtemp(prefix="mii-ref-"))
    path, hf = build(args.model, root)
    for mode in filter(None, args.modes.split(",")):
        int8, group = MODES[mode]
        ref = CompiledLlama(hf, res["max_len"], int8=int8, group=group)
        r = step_ms(ref, args.ctx, args.steps)
        r["pct_roofline"] = 100 * r["streamed_bytes"] / bw / (r["ms"] / 1e3)
        res["steps"][mode] = r
        print(mode, {k: v for k, v in r.items() if k != "rounds_ms"}, flush=True)
        del ref
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    for r in res["steps"].values():
        if "fp16" in res["steps"]:
            r["speedup_vs_fp16"] = res["steps"]["fp16"]["ms"] / r["ms"]
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    if not args.no_linears:
        res["linears"] = linear_rows(args.model, bw)
    if args.ours:
        from . import ours

        res["ours"] = {}
        for quant in (None, "w8a16"):
            eng, _ = ours.make_engine(path, quantize=quant)
            res["ours"][quant or "fp16"] = {"replay_ms": ours.replay_ms(eng, 1, args.ctx)}
            eng.shutdown()
            del eng
            gc.collect()
            torch.cuda.empty_cache()
        print("ours", res["ours"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"reference-{args.model}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
