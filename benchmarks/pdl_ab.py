"""A/B of the decode step's kernel chain: fp16 linears on cuBLAS or on our weight-streaming
kernel, and programmatic dependent launch (``kernels/pdl.py``) on or off, per quantization mode.

    python -m benchmarks.pdl_ab --model llama-7b --quantize fp16 w8a16 --out DIR

For each variant it builds the engine (graphs are captured at start, so the switches must be
set before), and times a bare replay of the bs=1 and bs=8 decode graphs at a 192-token
context, the same measurement as ``benchmarks.profile_step``. Writes ``pdl-MODEL.json``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from kernels import pdl, skinny_gemm
from mii.model.layers import DecodeGemv

from . import ours
from .ours import replay_ms
from .models import build, weight_bytes
from .run import copy_bandwidth

VARIANTS = {"cublas": (False, False), "cublas+pdl": (False, True), "gemv": (True, False), "gemv+pdl": (True, True)}


def run(name: str, root: Path, modes: list[str], variants: list[str], prefetch: list[int],
        engine_batches: list[int], whole_mb: list[float] = (0.0,), release: list[int | None] = (None,),
        fold: list[int] = (1,)) -> dict:
    path, model = build(name, root)
    wb = weight_bytes(model)
    del model
    torch.cuda.empty_cache()
    out = {"model": name, "device": torch.cuda.get_device_name(), "weight_bytes": wb,
           "copy_bw_gb_s": copy_bandwidth() / 1e9, "pdl_supported": pdl.supported(torch.device("cuda")), "rows": []}
    defaults = skinny_gemm.SKINNY_PREFETCH, skinny_gemm.SKINNY_PREFETCH_WHOLE_BYTES, skinny_gemm.SKINNY_RELEASE
    cases = ((m, v, p, w, r, f) for m in modes for v in variants for p in prefetch for w in whole_mb for r in release
             for f in fold)
    for mode, v, p, w, r, f in cases:
        skinny_gemm.SKINNY_PREFETCH = p
        skinny_gemm.SKINNY_PREFETCH_WHOLE_BYTES = int(w * 2**20)
        skinny_gemm.SKINNY_RELEASE = r
        gemv, use_pdl = VARIANTS[v]
        DecodeGemv.enabled = gemv  # with quantize, only the fp16 LM head changes kernel
        pdl.set_enabled(use_pdl)
        eng, startup = ours.make_engine(path, quantize=None if mode == "fp16" else mode, fold_norms=bool(f))
        ours.decode(eng, 1, new_tokens=16)  # warm the engine path once
        row = {"mode": mode, "variant": v, "prefetch": p, "prefetch_whole_mb": w, "release": r, "fold": f,
               "folds": eng.runner.model.fold_norms, "startup_s": startup,
               "bs1_ms": replay_ms(eng, 1), "bs8_ms": replay_ms(eng, 8)}
        for b in engine_batches:  # the whole engine step, host included
            d = ours.decode(eng, b)
            row[f"engine_bs{b}"] = {k: d[k] for k in ("ms_per_step", "host_wait_ms_per_step")}
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
        eng.shutdown()
        del eng
        torch.cuda.empty_cache()
    DecodeGemv.enabled = True
    pdl.set_enabled(True)
    skinny_gemm.SKINNY_PREFETCH, skinny_gemm.SKINNY_PREFETCH_WHOLE_BYTES, skinny_gemm.SKINNY_RELEASE = defaults
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--quantize", nargs="+", default=["fp16", "w8a16"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--prefetch", type=int, nargs="+", default=[skinny_gemm.SKINNY_PREFETCH],
                    help="tiles per program the GEMV prefetches under PDL (one engine per value)")
    ap.add_argument("--prefetch-whole-mb", type=float, nargs="+", default=[0.0],
                    help="weights up to this many MiB are prefetched whole into L2 (one engine per value)")
    ap.add_argument("--release", type=int, nargs="+", default=[None],
                    help="GEMV programs release the next kernel this many steps before their stream ends "
                         "(0: after it; default: each tile kind's own; one engine per value)")
    ap.add_argument("--fold", type=int, nargs="+", default=[1],
                    help="1/0: EngineConfig.fold_norms, whether decode steps fold the norms into the linears ("
                         "one engine per value, in the order given, so 1 0 1 0 alternates)")
    ap.add_argument("--engine-batches", type=int, nargs="*", default=[],
                    help="also time the engine's decode at these batch sizes (host work included)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = run(args.model, Path(tmp), args.quantize, args.variants, args.prefetch, args.engine_batches,
                  args.prefetch_whole_mb, args.release, args.fold)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"pdl-{args.model}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
