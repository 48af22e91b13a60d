"""Prefill-shape W8A8 GEMMs against fp16 cuBLAS: `python -m benchmarks.w8a8_sweep --out DIR [--sweep]`.

For each linear of the 7B Llama shape and M in {2048, 4096} rows (a prefill chunk and a
whole 4k prompt), times fp16 ``F.linear`` and ``kernels.w8a8_gemm.w8a8_gemm`` at its
default config, and reports TFLOP/s (TOP/s for int8) and the speedup. ``--sweep`` also
times a grid of tile configs, with pointer loads and with TMA tensor descriptors, and
prints the fastest per shape. Writes ``w8a8.json`` (and ``w8a8-sweep.json``) under --out.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from kernels.w8a8_gemm import default_config, w8a8_gemm

from .linears import linear_shapes

MS = (2048, 4096)


def _time(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50)  # ms, median


def _grid():
    for bm, bn, bk, warps, stages, tma in itertools.product((128, 256), (128, 256), (64, 128), (4, 8), (3, 4, 5),
                                                             (False, True)):
        if (bm * bk + bn * bk) * stages > 200_000 or (bm == 256 and bn == 256 and warps == 4):
            continue  # over shared memory, or too many accumulators per thread
        yield dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages, TMA=tma)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    rows, sweep = [], []
    for (name, (N, K)), M in itertools.product(linear_shapes().items(), MS):
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        w = torch.randn(N, K, device=dev, dtype=torch.float16) * 0.02
        xq = torch.randint(-127, 128, (M, K), device=dev, dtype=torch.int8)
        wq = torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8)
        xs = torch.rand(M, device=dev) * 0.01
        ws = torch.rand(N, device=dev) * 0.01
        flop = 2 * M * N * K
        t16 = _time(lambda: F.linear(x, w))
        t8 = _time(lambda: w8a8_gemm(xq, xs, wq, ws, None, torch.float16))
        row = {"linear": name, "M": M, "N": N, "K": K, "fp16_ms": t16, "w8a8_ms": t8,
               "fp16_tflops": flop / t16 / 1e9, "w8a8_tops": flop / t8 / 1e9, "speedup": t16 / t8,
               "config": default_config(M, N, K)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.sweep:
            ref = w8a8_gemm(xq, xs, wq, ws, None, torch.float16)
            best = None
            for cfg in _grid():
                try:
                    y = w8a8_gemm(xq, xs, wq, ws, None, torch.float16, config=cfg)
                    if not torch.equal(y, ref):
                        print("MISMATCH", name, M, cfg, flush=True)
                        continue
                    t = _time(lambda: w8a8_gemm(xq, xs, wq, ws, None, torch.float16, config=cfg))
                except Exception as e:  # out of resources for this tile: skip it
                    print("skip", cfg, type(e).__name__, str(e)[:120], flush=True)
                    continue
                sweep.append({"linear": name, "M": M, **cfg, "ms": t, "tops": flop / t / 1e9})
                if best is None or t < best[0]:
                    best = (t, cfg)
            print("BEST", name, M, f"{best[0]:.3f} ms", f"{flop / best[0] / 1e9:.0f} TOP/s",
                  f"x{t16 / best[0]:.2f} over fp16", best[1], flush=True)
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__}
    (args.out / "w8a8.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.sweep:
        (args.out / "w8a8-sweep.json").write_text(json.dumps({"meta": meta, "rows": sweep}, indent=1))


if __name__ == "__main__":
    main()
