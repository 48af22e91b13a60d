"""RESULTS.md's kernel and step sections: quantized decode, the GEMMs and decode attention on their own,
the bs=1 step with kernels dropped, and profiles of a prefill and of a decode step."""
from __future__ import annotations

from .report_md import row


def quant_section(q: dict) -> list[str]:
    """``benchmarks.run --quant-model``: bs=1 decode and prefill for each weight format."""
    m = q["meta"]
    lines = [f"## Quantization, {q['model']}", "", f"{m['device']}, {m['date']}; bs=1 decode, prompt 128. The roofline "
             "counts the bytes a step reads (weights but the embedding table, plus K/V at the mean context) "
             "where written as `step_bytes`, else every weight byte on the GPU.", "",
             row(["mode", "weights (GB)", "x fp16", "bs=1 tok/s", "speed-up", "% of its roofline",
                  "prefill 4096 (ms)", "prefill speed-up"]), row(["---"] * 8)]
    for mode, r in q["modes"].items():
        lines.append(row([mode, f"{r['weight_bytes'] / 1e9:.2f}", f"{r['weight_ratio']:.2f}",
                          f"{r['bs1_tok_s']:.0f}", f"{r['decode_speedup']:.2f}x", f"{r['pct_roofline']:.0f}%",
                          f"{r['prefill_4096_ms']:.0f}", f"{r['prefill_speedup']:.2f}x"]))
    replays = {mode: r for mode, r in q["modes"].items() if "bs1_replay_ms" in r}
    if replays:
        lines += ["", "A bare replay of each mode's bs=1 decode graph (the GPU's share of the step): "
                  + "; ".join(f"{mode} {r['bs1_replay_ms']:.3f} ms ({r['replay_speedup']:.2f}x fp16, "
                              f"{r['replay_pct_roofline']:.0f}% of its roofline)" for mode, r in replays.items())
                  + "."]
    lines.append("")
    return lines


def gemv_section(g: dict, name: str) -> list[str]:
    """``benchmarks.gemv``: weight-only GEMMs at decode batch sizes (``name``: the result file's tag)."""
    lines = [f"## Weight-only GEMMs at decode batch sizes, {g.get('model', 'llama-7b')} shapes ({name})", "",
             f"{g['device']}, {g['date']}; {g['dtype']} activations, group 128; GB/s of weight (+ scale) bytes "
             f"and % of the copy bandwidth ({g['copy_bw_gb_s']:.0f} GB/s); `python -m benchmarks.gemv`.", "",
             f"PDL on: {g.get('pdl', False)} (each call may start while the one before finishes, as in "
             "a decode step).", "",
             row(["linear", "M", "fp16 cuBLAS", "fp16 ours", "W8A16", "x fp16", "W4A16", "x fp16"]),
             row(["---"] * 8)]
    for r in g["groups"].get("128", []):
        cell = lambda m: f"{r[m]['gb_s']:.0f} ({r[m]['pct_copy_bw']:.0f}%)" if m in r else ""  # noqa: E731
        lines.append(row([f"{r['linear']} {r['N']}x{r['K']}", r["M"], cell("fp16"), cell("gemv16"),
                          cell("w8a16"), f"{r['w8a16']['speedup_vs_fp16']:.2f}x", cell("w4a16"),
                          f"{r['w4a16']['speedup_vs_fp16']:.2f}x"]))
    lines.append("")
    return lines


def decode_attn_section(a: dict, name: str) -> list[str]:
    """``benchmarks.decode_attn``: the fused decode attention kernel alone."""
    lines = [f"## Decode attention ({name})", "",
             f"{a['device']}, {a['date']}; `python -m benchmarks.decode_attn`: rotary, KV write and split-K "
             "attention in one launch, block table 4,096 tokens wide, K/V read from memory; us per call and "
             "% of the copy bandwidth its K/V bytes reach.", "",
             row(["shape", "batch", "context", "key tile", "us", "% copy bw"]), row(["---"] * 6)]
    lines += [row([r["shape"], r["batch"], r["ctx"], r["block_n"], f"{r['us']:.1f}", f"{r['pct_copy_bw']:.0f}%"])
              for r in a["rows"]] + [""]
    return lines


def w8a8_section(g: dict, name: str) -> list[str]:
    """``benchmarks.w8a8_sweep``: W8A8 GEMMs at prefill sizes."""
    m = g["meta"]
    lines = [f"## W8A8 GEMMs at prefill sizes, 7B shapes ({name})", "",
             f"{m['device']}, {m['date']}, triton {m['triton']}; `python -m benchmarks.w8a8_sweep`: "
             f"fp16 `F.linear` (cuBLAS) against `kernels/w8a8_gemm.py` at its default tiles.", "",
             row(["linear", "M", "fp16 TFLOP/s", "W8A8 TOP/s", "speed-up"]), row(["---"] * 5)]
    lines += [row([f"{r['linear']} {r['N']}x{r['K']}", r["M"], f"{r['fp16_tflops']:.0f}",
                   f"{r['w8a8_tops']:.0f}", f"{r['speedup']:.2f}x"]) for r in g["rows"]] + [""]
    return lines


def bound_section(f: dict) -> list[str]:
    """``benchmarks.chain_bound``: the bs=1 step with its norms and/or attention dropped."""
    lines = [f"## The bs=1 step without its norms or attention, {f['model']}", "",
             f"{f['device']}, {f['date']}, torch {f['torch']}; `python -m benchmarks.chain_bound`: bare graph "
             f"replay at a {f['context']}-token context, with kernels dropped from the chain (wrong outputs; only "
             "the time counts). Roofline = step bytes / copy bandwidth. Range over the repeats.", "",
             row(["mode", "dropped", "bs=1 ms", "% of roofline", "saved (ms)"]), row(["---"] * 5)]
    by = {}
    for r in f["rows"]:
        by.setdefault((r["mode"], r["dropped"]), []).append(r)
    for (mode, drop), rs in by.items():
        ms = [r["bs1_ms"] for r in rs]
        base = min(r["bs1_ms"] for r in by[(mode, "nothing")])
        lines.append(row([mode, drop, f"{min(ms):.3f}-{max(ms):.3f}", f"{100 * rs[0]['roofline_ms'] / min(ms):.1f}%",
                          f"{base - min(ms):.3f}"]))
    return lines + [""]


def prefill_profile_section(f: dict) -> list[str]:
    """``benchmarks.profile_step --prefill``: time to first token and the kernels of one prefill."""
    modes = list(f["modes"])
    kinds = list(dict.fromkeys(k for v in f["modes"].values() for k in v["kernels"]))
    lines = [f"## Where a {f['prompt_tokens']:,}-token prefill goes, {f['model']}", "",
             f"{f['device']}; `python -m benchmarks.profile_step --prefill {f['prompt_tokens']}`: time to first "
             "token and the kernels of one prefill (chunks of 2,048 tokens), in us.", "",
             row(["kernels"] + modes), row(["---"] * (1 + len(modes))),
             row(["time to first token (ms)"] + [f"{v['ttft_ms']:.1f}" for v in f["modes"].values()])]
    lines += [row([k] + [f["modes"][m]["kernels"].get(k, {}).get("us", "") for m in modes]) for k in kinds]
    lines.append("")
    return lines


def step_profile_section(f: dict) -> list[str]:
    """``benchmarks.profile_step``: where a bs=1 decode step's graph replay goes, by kernel kind and by
    linear, against the roofline."""
    span = f["traced_replay_ms"] * 1e3
    lines = [f"## Where a bs=1 decode step goes, {f['model']}", "",
             f"{f['device']}, {f['date']}, torch {f['torch']}, PDL {f['pdl']}; `python -m benchmarks.profile_step`: "
             f"engine step {f['engine_step_ms']:.3f} ms; a bare replay of its CUDA graph {f['graph_replay_ms']:.3f} ms; "
             f"the replay traced by torch.profiler {f['traced_replay_ms']:.3f} ms (the trace's own cost is the "
             f"difference); roofline (weights / copy bandwidth, {f['copy_bandwidth_GBs']:.0f} GB/s) "
             f"{f['roofline_ms']:.3f} ms. Each kernel counts for how far it moves the end of the step's chain "
             f"(under PDL a kernel overlaps its neighbours), median over {f['replays_traced']} traced replays.", "",
             row(["kernels", "count", "us in the step", "share"]), row(["---"] * 4)]
    lines += [row([k, v["count"], v["us"], f"{100 * v['us'] / span:.1f}%"]) for k, v in f["kernels"].items()]
    if f["linears"]:
        lines += ["", row(["linear (all layers)", "us in the step", "its bytes / copy bandwidth (us)",
                           "lost (us)"]), row(["---"] * 4)]
        lines += [row([n, v["us"], v["bytes_us"], f"{v['us'] - v['bytes_us']:.1f}"]) for n, v in f["linears"].items()]
    return lines + [""]
