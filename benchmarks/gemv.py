"""Decode-shape weight-only GEMMs against fp16 cuBLAS: `python -m benchmarks.gemv --out DIR [--sweep]`.

For each linear of the 7B Llama shape (qkv, o, gate_up, down) and M in {1, 4, 16} rows it
times fp16 ``F.linear`` (cuBLAS), W8A16 and W4A16 (``kernels/quant_gemm.py``) and W8A8 on
int8 x (``kernels/w8a8_gemm.py``), and reports
the bandwidth each reaches, (weight bytes + scale bytes) / time, against the measured
device-to-device copy bandwidth (bytes read + written). Writes ``gemv.json`` under --out.

Timing: each kernel runs back to back inside a CUDA graph (as decode does), cycling over
enough copies of the weight that none is still in L2 when it comes round again; the time
per call is the median over graph replays (``benchmarks/timing.py``). ``--sweep`` also times a
grid of tile configs and K-splits per shape (``gemv-sweep.json``, ``benchmarks/gemv_sweep.py``)
and prints the fastest per shape.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from kernels import pdl, skinny_gemm
from kernels.quant_gemm import default_config, wxa16_gemm
from kernels.skinny_gemm import skinny_config, skinny_linear
from kernels.w8a8_gemm import default_config as w8a8_config
from kernels.w8a8_gemm import w8a8_gemm

from . import linears
from .gemv_sweep import fastest, sweep, sweep_w8a8
from .linears import linear_shapes, quantized, weight_bytes
from .models import SHAPES
from .timing import copies_for, copy_bandwidth, time_calls

MS = (1, 4, 16)

MODES = ("fp16", "gemv16", "w8a16", "w4a16", "w8a8")


def bench(group: int, dtype: torch.dtype, bw: float, ms: tuple[int, ...] = MS,
          shapes: dict[str, tuple[int, int]] | None = None) -> list[dict]:
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, (N, K) in (shapes or linear_shapes()).items():
        w16 = [torch.randn(N, K, device="cuda", dtype=dtype) * 0.02
               for _ in range(copies_for(weight_bytes(N, K, 16, group)))]
        wq = {bits: [quantized(N, K, bits, group) for _ in range(copies_for(weight_bytes(N, K, bits, group)))]
              for bits in (8, 4)}
        w8 = [(q, s[:, 0].contiguous()) for q, s in wq[8]]  # W8A8: one scale per row
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            row = {"linear": name, "N": N, "K": K, "M": M, "group": group}
            t = time_calls(F.linear, [(x, w) for w in w16])
            row["fp16"] = {"us": t * 1e6, "bytes": weight_bytes(N, K, 16, group)}
            t = time_calls(skinny_linear, [(x, w) for w in w16])
            row["gemv16"] = {"us": t * 1e6, "bytes": weight_bytes(N, K, 16, group),
                             "config": skinny_config(N, K, K, torch.cuda.get_device_properties(0).multi_processor_count,
                                                     **skinny_gemm.FLOAT_TILES)}
            for bits, mode in ((8, "w8a16"), (4, "w4a16")):
                t = time_calls(lambda x, q, s: wxa16_gemm(x, q, s, None, bits), [(x, q, s) for q, s in wq[bits]])
                row[mode] = {"us": t * 1e6, "bytes": weight_bytes(N, K, bits, group),
                             "config": default_config(M, N, K, group, bits, x.device)}
            x8, xs = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda"), torch.rand(M, device="cuda")
            t = time_calls(lambda q, s: w8a8_gemm(x8, xs, q, s, None, dtype), w8)
            row["w8a8"] = {"us": t * 1e6, "bytes": N * K + 4 * N, "config": w8a8_config(M, N, K, sms)}
            for mode in MODES:
                r = row[mode]
                r["gb_s"] = r["bytes"] / r["us"] / 1e3
                r["pct_copy_bw"] = 100 * r["bytes"] / (r["us"] * 1e-6) / bw
                r["speedup_vs_fp16"] = row["fp16"]["us"] / r["us"]
            rows.append(row)
        del w16, wq
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], bw: float) -> str:
    out = [f"copy bandwidth {bw / 1e9:.0f} GB/s; GB/s (% of copy) and speed-up over fp16",
           f"{'linear':8} {'N x K':>12} {'M':>3} | {'fp16 cuBLAS':>22} | {'fp16 ours':>30} | {'W8A16':>30} | "
           f"{'W4A16':>30} | {'W8A8':>30}"]
    for r in rows:
        cells = [f"{r[m]['us']:6.1f}us {r[m]['gb_s']:5.0f} ({r[m]['pct_copy_bw']:3.0f}%)"
                 + ("" if m == "fp16" else f" {r[m]['speedup_vs_fp16']:4.2f}x")
                 for m in MODES]
        out.append(f"{r['linear']:8} {r['N']:>5} x {r['K']:<5} {r['M']:>3} | " + " | ".join(cells))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # not benchmarks/results: benchmarks.report reads every JSON there as a model run
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--groups", default="128,64", help="comma-separated group sizes (the first also for --sweep)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--sweep", action="store_true", help="also time a grid of tile configs and K-splits")
    ap.add_argument("--sweep-bits", default="16,8,4",
                    help="weight widths for --sweep (16: fp16 weights; 8x8: W8A8, int8 x too)")
    ap.add_argument("--sweep-ms", default="1,16", help="rows of x for --sweep")
    ap.add_argument("--no-pdl", action="store_true", help="launch without programmatic dependent launch")
    ap.add_argument("--prefetch", type=int, default=None, help="tiles per program prefetched under PDL")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="rows of x to time")
    ap.add_argument("--scales-t", action="store_true", help="scales stored group-major")
    ap.add_argument("--model", default="llama-7b", choices=sorted(SHAPES), help="whose linears to time")
    ap.add_argument("--lm-head", action="store_true", help="also time the LM head's shape")
    args = ap.parse_args()
    linears.SCALES_T = args.scales_t
    if args.prefetch is not None:
        skinny_gemm.SKINNY_PREFETCH = args.prefetch
    pdl.set_enabled(not args.no_pdl)
    dtype = getattr(torch, args.dtype)
    groups = [int(g) for g in args.groups.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    meta = {"device": props.name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton.__version__, "dtype": args.dtype, "copy_bw_gb_s": bw / 1e9,
            "sms": props.multi_processor_count, "pdl": pdl.use(torch.device("cuda"))}
    shapes = linear_shapes(args.model, args.lm_head)
    meta["model"] = args.model
    if args.sweep:
        bits = args.sweep_bits.split(",")
        sweep_ms = tuple(int(m) for m in args.sweep_ms.split(","))
        rows = sweep(groups[0], dtype, bw, sweep_ms, shapes, bits_list=tuple(int(b) for b in bits if b != "8x8"))
        if "8x8" in bits:
            rows += sweep_w8a8(bw, sweep_ms, shapes)
        (args.out / "gemv-sweep.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        print("fastest config per (linear, bits, M):")
        for (name, bits, M), r in fastest(rows).items():
            print(f"  {name:8} w{bits} M={M:<2} {r['us']:6.1f}us {r['pct_copy_bw']:3.0f}% BN={r['BN']} BK={r['BK']} "
                  f"U={r['U']} A_REGS={r['A_REGS']} warps={r['num_warps']} stages={r['num_stages']} "
                  f"split={r['SPLIT_K']} (waves {r['waves']})")
    results = {**meta, "groups": {}}
    for g in groups:
        rows = bench(g, dtype, bw, tuple(int(m) for m in args.ms.split(",")), shapes)
        results["groups"][g] = rows
        print(f"\n{props.name}, {args.dtype}, group {g}\n" + table(rows, bw))
    (args.out / "gemv.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
