"""Decode-shape weight-only GEMMs against fp16 cuBLAS: `python -m benchmarks.gemv --out DIR [--sweep]`.

For each linear of the 7B Llama shape (qkv, o, gate_up, down) and M in {1, 4, 16} rows it
times fp16 ``F.linear`` (cuBLAS), W8A16 and W4A16 (``kernels/quant_gemm.py``) and W8A8 on
int8 x (``kernels/w8a8_gemm.py``), and reports
the bandwidth each reaches, (weight bytes + scale bytes) / time, against the measured
device-to-device copy bandwidth (bytes read + written). Writes ``gemv.json`` under --out.

Timing: each kernel runs back to back inside a CUDA graph (as decode does), cycling over
enough copies of the weight that none is still in L2 when it comes round again; the time
per call is the median over graph replays. ``--sweep`` also times a grid of tile configs
and K-splits per shape (``gemv-sweep.json``) and prints the fastest per shape.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from kernels import pdl, skinny_gemm
from kernels.quant_gemm import default_config, wxa16_gemm
from kernels.skinny_gemm import skinny_config, skinny_linear
from kernels.w8a8_gemm import decode_bk, w8a8_gemm
from kernels.w8a8_gemm import default_config as w8a8_config

from .models import SHAPES

MS = (1, 4, 16)


def linear_shapes(model: str = "llama-7b", lm_head: bool = False) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of the decoder's linears (q/k/v and gate/up fused, as we run them), and
    with ``lm_head`` the LM head's."""
    arch, kw = SHAPES[model]
    if arch.startswith("OPT"):
        h, inter = kw["hidden_size"], kw["ffn_dim"]
        shapes = {"qkv": (3 * h, h), "o": (h, h), "fc1": (inter, h), "fc2": (h, inter)}
    else:
        h, inter = kw["hidden_size"], kw["intermediate_size"]
        head = h // kw["num_attention_heads"]
        shapes = {"qkv": (h + 2 * kw["num_key_value_heads"] * head, h), "o": (h, h),
                  "gate_up": (2 * inter, h), "down": (h, inter)}
    if lm_head:
        shapes["lm_head"] = (kw["vocab_size"], h)
    return shapes


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20, CUDA events)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


def time_calls(fn, args: list[tuple], min_calls: int = 64, replays: int = 10) -> float:
    """Median seconds per ``fn(*a)``, run back to back in one CUDA graph over ``args`` in turn."""
    calls = [args[i % len(args)] for i in range(max(min_calls, len(args)))]
    for a in args:  # compile (and any autotuning) before capture
        fn(*a)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for a in calls:
            fn(*a)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times) / len(calls)


def copies_for(nbytes: int) -> int:
    """Weight copies to cycle over so each is evicted from L2 before its next use."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, -(-4 * l2 // nbytes))


def quantized(N: int, K: int, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (qweight, scales) in our storage format (the kernels' speed does not depend on values)."""
    if bits == 8:
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    else:
        q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
    s = torch.rand(N, K // group, device="cuda") * 0.01 + 1e-3
    return q, (s.t().contiguous().t() if SCALES_T else s)


SCALES_T = False  # --scales-t: scales laid out group-major ([K/group, N] in memory)


def weight_bytes(N: int, K: int, bits: int, group: int) -> int:
    if bits == 16:
        return 2 * N * K
    return N * K * bits // 8 + 4 * N * (K // group)


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


# (BN, BK, num_warps, num_stages, U, A_REGS) tried by --sweep, for both bit widths: mma.sync
# with the weight tile converted straight into its operand registers (1-2 warps), and
# wgmma with the converted tile staged in shared memory (4 warps). See skinny_config for
# what won on the H100.
SWEEP = [(64, 128, 2, 3, 1, True), (64, 128, 2, 4, 1, True), (128, 128, 2, 3, 1, True),
         (32, 128, 1, 3, 1, True), (64, 128, 4, 3, 1, False), (64, 64, 2, 4, 1, True), (32, 128, 2, 4, 1, True),
         (64, 128, 4, 4, 1, False), (64, 256, 4, 3, 1, False), (32, 128, 1, 6, 1, True), (16, 128, 1, 6, 1, True)]


def sweep(group: int, dtype: torch.dtype, bw: float, ms: tuple[int, ...] = (1, 16),
          shapes: dict[str, tuple[int, int]] | None = None, bits_list: tuple[int, ...] = (16, 8, 4)) -> list[dict]:
    """Time tile configs x K-splits for the M <= 16 kernel; one row per (linear, bits, M, config)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, (N, K) in (shapes or linear_shapes()).items():
        for bits in bits_list:
            if bits == 16:
                ws = [(torch.randn(N, K, device="cuda", dtype=dtype), None)
                      for _ in range(copies_for(weight_bytes(N, K, bits, group)))]
            else:
                ws = [quantized(N, K, bits, group) for _ in range(copies_for(weight_bytes(N, K, bits, group)))]
            for M in ms:
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                for bn, bk, warps, stages, u, regs in SWEEP:
                    seen = set()
                    for waves, min_tiles in ((2, 4), (4, 4), (8, 4), (16, 4), (8, 2), (16, 2), (16, 1)):
                        cfg = skinny_config(N, K, K if bits == 16 else group, sms, bn, bk, warps, stages, waves, u,
                                            regs, min_tiles=min_tiles)
                        if cfg["SPLIT_K"] in seen:
                            continue
                        seen.add(cfg["SPLIT_K"])
                        if bits == 16:
                            t = time_calls(lambda x, w: skinny_linear(x, w, None, cfg), [(x, w) for w, _ in ws],
                                           min_calls=32, replays=5)
                        else:
                            t = time_calls(lambda x, q, s: wxa16_gemm(x, q, s, None, bits, cfg),
                                           [(x, q, s) for q, s in ws], min_calls=32, replays=5)
                        b = weight_bytes(N, K, bits, group)
                        rows.append({"linear": name, "bits": bits, "M": M, "waves": waves, **cfg,
                                     "us": t * 1e6, "pct_copy_bw": 100 * b / t / bw})
            del ws
            torch.cuda.empty_cache()
    return rows


# (BN, BK, num_warps, num_stages, U) for int8 x int8: mma.sync on 1-2 warps, wgmma on 4.
W8A8_SWEEP = [(64, 128, 2, 3, 1), (32, 128, 1, 4, 1), (128, 128, 2, 3, 1), (64, 128, 4, 3, 1), (64, 128, 4, 4, 1),
              (128, 128, 4, 3, 1)]


def sweep_w8a8(bw: float, ms: tuple[int, ...], shapes: dict[str, tuple[int, int]]) -> list[dict]:
    """Tile configs x K-splits of the M <= 16 kernel on int8 x and int8 weights (bits "8x8")."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, (N, K) in shapes.items():
        ws = [(torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda"), torch.rand(N, device="cuda"))
              for _ in range(copies_for(N * K))]
        for M in ms:
            x8, xs = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda"), torch.rand(M, device="cuda")
            for bn, bk, warps, stages, u in W8A8_SWEEP:
                seen = set()
                for waves, min_tiles in ((2, 4), (4, 4), (8, 4)):
                    cfg = skinny_config(N, K, decode_bk(K), sms, bn, bk, warps, stages, waves, u, False,
                                        min_tiles=min_tiles)
                    if cfg["SPLIT_K"] in seen:
                        continue
                    seen.add(cfg["SPLIT_K"])
                    t = time_calls(lambda q, s: w8a8_gemm(x8, xs, q, s, None, torch.float16, cfg), ws,
                                   min_calls=32, replays=5)
                    rows.append({"linear": name, "bits": "8x8", "M": M, "waves": waves, **cfg,
                                 "us": t * 1e6, "pct_copy_bw": 100 * (N * K + 4 * N) / t / bw})
        del ws
        torch.cuda.empty_cache()
    return rows


def fastest(rows: list[dict]) -> dict[tuple, dict]:
    """The quickest sweep row per (linear, bits, M)."""
    best = {}
    for r in rows:
        key = (r["linear"], r["bits"], r["M"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    return best


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
    global SCALES_T
    SCALES_T = args.scales_t
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
