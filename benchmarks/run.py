"""One command for the GPU benchmark: `python -m benchmarks.run [--models a,b] [--out DIR]`.

For each model shape it measures our engine (startup, bs=1 decode against the memory
roofline, TTFT at 512, decode at bs 8/32/128, the 1,000-request serving workload) and
transformers (eager and static-cache compiled generate at bs 1/32, the serving workload
in static batches of 32), writes one JSON per model and regenerates RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import torch

from . import hf, ours
from .models import SHAPES, build, kv_bytes_per_step, weight_bytes

HERE = Path(__file__).parent


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second: the best of three timings,
    since one timing right after a large model build read 15% low (H100, 2026-11-23)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / min(ours.seconds_per_call(lambda: y.copy_(x), warmup=3, iters=20) for _ in range(3))


def reusable_hf(hf_from: Path | None, name: str, device: str, requests: int) -> dict | None:
    """HF's figures from an earlier run of the same shape, device and workload: HF did
    not change, so a rerun of ours alone need not spend device time on it again."""
    if hf_from is None or not (hf_from / f"{name}.json").is_file():
        return None
    old = json.loads((hf_from / f"{name}.json").read_text())
    if old.get("meta", {}).get("device") != device or old["ours"]["serving"]["requests"] != requests:
        return None
    # An earlier rerun of ours alone carries HF's date on: its own date is not HF's.
    return {"hf": old["hf"], "from": old.get("hf_reused_from") or old["meta"]["date"]}


def bench_model(name: str, root: Path, bw: float, hf_eager_batches: int, quick: bool,
                reuse: dict | None = None) -> dict:
    path, model = build(name, root)
    res: dict = {"model": name, "arch": SHAPES[name][0], "weight_bytes": weight_bytes(model)}
    # HF's copy waits on the host while ours runs: left on the GPU, it took memory that our KV
    # cache is sized from (13 GB for the 7B shape). Each system gets the whole GPU, as deployed.
    model.to("cpu")
    torch.cuda.empty_cache()
    eng, startup = ours.make_engine(path)
    res["ours"] = {"startup_s": startup, "backend": eng.runner.ops.backend,
                   "cuda_graphs": bool(getattr(eng.runner, "graphs", None))}
    ours.decode(eng, 1, new_tokens=16)  # warm caches and allocator
    bs1 = ours.best_decode(eng, 1)
    step_bytes = res["weight_bytes"] + kv_bytes_per_step(eng.spec, 128 + 64)
    res["roofline_tok_s"] = bw / step_bytes
    bs1["pct_roofline"] = 100 * bs1["tok_s"] / res["roofline_tok_s"]
    if res["ours"]["cuda_graphs"]:  # the GPU's share of the step, at the mean context
        bs1["replay_ms"] = ours.replay_ms(eng, 1, 128 + 64)
        bs1["replay_pct_roofline"] = 100 * 1e3 / bs1["replay_ms"] / res["roofline_tok_s"]
    res["ours"]["decode"] = [bs1] + [ours.best_decode(eng, b) for b in (8, 32, 128)]
    res["ours"]["decode_sampled"] = [{**ours.best_decode(eng, b, sampled=True), **ours.SAMPLED} for b in (1, 32)]
    res["ours"]["ttft_512_ms"] = ours.ttft(eng)
    workload = ours.serving_workload(200 if quick else 1000)
    res["ours"]["serving"] = ours.serve(eng, workload)
    res["ours"]["kv_cache_tokens"] = eng.runner.num_blocks * eng.config.block_size
    eng.shutdown()
    del eng
    torch.cuda.empty_cache()
    model.to("cuda")
    res["hf"] = {} if reuse is None else reuse["hf"]
    if reuse is not None:
        res["hf_reused_from"] = reuse["from"]
    for mode, static in (("eager", False), ("compiled", True)) if reuse is None else ():
        res["hf"][mode] = {"decode": [hf.decode(model, b, static) for b in (1, 32)]}
        res["hf"][mode]["serving"] = hf.serve_static_batches(
            model, workload, static, max_batches=hf_eager_batches if not static else (2 if quick else 4))
    ours_tps = res["ours"]["serving"]["output_tok_s"]
    res["serving_speedup"] = {m: ours_tps / res["hf"][m]["serving"]["output_tok_s"] for m in res["hf"]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--hf-eager-batches", type=int, default=1,
                    help="static batches of the serving workload run by HF eager (the rest extrapolated)")
    ap.add_argument("--quick", action="store_true", help="200 serving requests instead of 1,000")
    ap.add_argument("--quant-model", default=None, help="also measure quantization modes on this shape")
    ap.add_argument("--hf-from", type=Path, default=None,
                    help="take HF's figures from this results folder where device and workload match")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "copy_bandwidth_GBs": copy_bandwidth() / 1e9}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(meta))
    with tempfile.TemporaryDirectory() as tmp:
        if args.quant_model:
            from .quant import bench_quant
            path, model = build(args.quant_model, Path(tmp))
            del model
            torch.cuda.empty_cache()
            q = {"model": args.quant_model, "meta": meta,
                 "modes": bench_quant(path, meta["copy_bandwidth_GBs"] * 1e9)}
            (out / f"quant-{args.quant_model}.json").write_text(json.dumps(q, indent=1))
            print(json.dumps(q), flush=True)
        for name in filter(None, args.models.split(",")):
            reuse = reusable_hf(args.hf_from, name, meta["device"], 200 if args.quick else 1000)
            res = bench_model(name, Path(tmp), meta["copy_bandwidth_GBs"] * 1e9, args.hf_eager_batches, args.quick,
                              reuse)
            res["meta"] = meta
            (out / f"{name}.json").write_text(json.dumps(res, indent=1))
            print(json.dumps(res), flush=True)
    from .report import write_report
    write_report(out)


if __name__ == "__main__":
    main()
