"""RESULTS.md's model sections (``benchmarks.run``: ours against HF, decode and serving) and their plot."""
from __future__ import annotations

import sys
from pathlib import Path

from .report_md import row


def _where(s: dict) -> str:
    """Where the serving time went: host work against waiting on the device."""
    if "host_wait_s" in s:
        return (f"{s['steps']} steps in {s['seconds']:.1f} s: the host waited on the GPU {s['host_wait_s']:.1f} s "
                f"and was busy (scheduling, packing, launching, detokenizing) {s['host_busy_s']:.1f} s.")
    return "Where the time went (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s.get("phase_seconds", {}).items()) + "."


def run_section(r: dict) -> list[str]:
    """One model's ``benchmarks.run`` result: decode against HF and the roofline, then the serving workload."""
    m, o = r["meta"], r["ours"]
    bs1 = o["decode"][0]
    lines = [f"## {r['model']} ({r['arch']}, {r['weight_bytes'] / 1e9:.2f} GB of weights)", "",
             f"{m['device']}, {m['date']}; torch {m['torch']}, transformers {m['transformers']}, "
             f"triton {m.get('triton', '-')}; copy bandwidth {m['copy_bandwidth_GBs']:.0f} GB/s. "
             f"Our kernels: {o['backend']}, CUDA graphs: {o['cuda_graphs']}; startup {o['startup_s']:.1f} s.", "",
             row(["", "bs=1 tok/s", "bs=1 ms/step", "% roofline", "bs=8", "bs=32", "bs=128", "TTFT 512 (ms)"]),
             row(["---"] * 8),
             row(["ours", f"{bs1['tok_s']:.0f}", f"{bs1['ms_per_step']:.2f}", f"{bs1['pct_roofline']:.0f}%"]
                 + [f"{d['tok_s']:.0f}" for d in o["decode"][1:]] + [f"{o['ttft_512_ms']:.1f}"])]
    for mode, h in r["hf"].items():
        d1, d32 = h["decode"]
        lines.append(row([f"HF {mode}", f"{d1['tok_s']:.0f}", f"{d1['ms_per_step']:.2f}",
                          f"{100 * d1['tok_s'] / r['roofline_tok_s']:.0f}%", "", f"{d32['tok_s']:.0f}", "",
                          f"(warm-up {d1['warmup_s']:.1f} s)"]))
    s = o["serving"]
    wait = (f" At bs=1 the host waited on the GPU {bs1['host_wait_ms_per_step']:.2f} ms of each "
            f"{bs1['ms_per_step']:.2f} ms step (near 0: host-bound)." if "host_wait_ms_per_step" in bs1 else "")
    if "runs_ms_per_step" in bs1:
        wait += (" bs=1 is the best of " + ", ".join(f"{x:.3f}" for x in bs1["runs_ms_per_step"])
                 + f" ms/step (runs of 127 steps; per step p50 {bs1['step_p50_ms']:.3f}, "
                   f"p99 {bs1['step_p99_ms']:.3f} ms).")
    batched = [d for d in o["decode"][1:] if "runs_ms_per_step" in d]
    if batched:
        wait += " bs=" + "; bs=".join(f"{d['batch']}: " + ", ".join(f"{x:.3f}" for x in d["runs_ms_per_step"])
                                     for d in batched) + " ms/step, each batch size's best run shown."
    if "replay_ms" in bs1:
        wait += (f" A bare replay of the bs=1 decode graph (the GPU's share, no host work or sampling "
                 f"between steps): {bs1['replay_ms']:.3f} ms, {bs1['replay_pct_roofline']:.0f}% of the roofline.")
    if o.get("decode_sampled"):
        d = o["decode_sampled"][0]
        wait += (f" Sampled (temperature {d['temperature']}, top-p {d['top_p']}, top-k {d['top_k']}), each "
                 f"batch size's best of 3: " + "; ".join(f"bs={d['batch']} {d['ms_per_step']:.3f} ms/step, "
                                                       f"{d['tok_s']:.0f} tok/s" for d in o["decode_sampled"]) + ".")
    lines += ["", f"Roofline at bs=1: {r['roofline_tok_s']:.0f} tok/s.{wait}", "",
              f"Serving workload ({s['requests']} requests, prompts U[32,1024], outputs U[16,512], all at once): "
              f"ours {s['output_tok_s']:.0f} output tok/s; TTFT mean/p50/p99 {s['ttft_ms']['mean']:.0f}/"
              f"{s['ttft_ms']['p50']:.0f}/{s['ttft_ms']['p99']:.0f} ms; inter-token mean/p50/p99 "
              f"{s['itl_ms']['mean']:.1f}/{s['itl_ms']['p50']:.1f}/{s['itl_ms']['p99']:.1f} ms; "
              f"{s['preemptions']} preemptions" + (f" with a KV cache of {o['kv_cache_tokens']} tokens"
                                                    if "kv_cache_tokens" in o else "") + ". " + _where(s), ""]
    if r.get("hf_reused_from"):
        lines.append(f"- HF figures below are from the {r['hf_reused_from']} run on the same device and "
                     f"workload (HF unchanged; only ours was rerun).")
    for mode, h in r["hf"].items():
        hs = h["serving"]
        note = (f" (extrapolated from {hs['batches_run']} of {hs['batches_total']} batches)"
                if hs["extrapolated"] else "")
        lines.append(f"- HF {mode}, static batches of 32: {hs['output_tok_s']:.0f} output tok/s{note}; "
                     f"ours is {r['serving_speedup'][mode]:.1f}x.")
    lines.append("")
    return lines


def plot(runs, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # say so: a silent skip left the plot a day stale once
        print(f"matplotlib is not installed (pip install -e '.[bench]'): {path} was not redrawn", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(4 * max(1, len(runs)), 3.5), squeeze=False)
    for ax, r in zip(axes[0], runs):
        ours = r["ours"]["decode"]
        ax.plot([d["batch"] for d in ours], [d["tok_s"] for d in ours], "o-", label="ours")
        for mode, h in r["hf"].items():
            ax.plot([d["batch"] for d in h["decode"]], [d["tok_s"] for d in h["decode"]], "s--", label=f"HF {mode}")
        ax.axhline(r["roofline_tok_s"], color="gray", ls=":", label="bs=1 roofline")
        ax.set(xscale="log", yscale="log", title=r["model"], xlabel="batch size", ylabel="decode tok/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
