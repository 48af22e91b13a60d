"""RESULTS.md's outside yardstick (``benchmarks.compiled_ref``): gpt-fast's recipe, a plain-torch
Llama compiled whole by inductor with weight-only int8 linears, against our engine on the same GPU."""
from __future__ import annotations

from .report_md import row

_STEP_NAMES = {"fp16": "fp16", "int8_row": "int8, a scale per row (gpt-fast's)",
               "int8_g128": "int8, a scale per group of 128 (our format)"}
_SHORT = {"int8_row": "per-row scales, gpt-fast's", "int8_g128": "scales per group of 128"}
_KERNELS = [("cublas", "fp16 cuBLAS"), ("gemv16", "fp16 inductor"), ("ours_fp16", "fp16 ours"),
            ("int8_row", "int8/row inductor"), ("int8_g128", "int8/g128 inductor"), ("ours_w8a16", "W8A16 ours")]


def reference_line(d: dict) -> str:
    """The Targets section's one line: how far the yardstick's int8 gets over its own fp16."""
    s, ours = d["steps"], d.get("ours", {})
    best = max((k for k in s if k != "fp16"), key=lambda k: s[k]["speedup_vs_fp16"])
    text = (f"- **An outside yardstick** (gpt-fast's recipe compiled by torch {d['meta']['torch']}, {d['meta']['device']}, "
            f"{d['meta']['date']}; its section below): its best int8 step ({_SHORT[best]}) is "
            f"{s[best]['speedup_vs_fp16']:.2f}x its fp16 step, at {s[best]['pct_roofline']:.0f}% of its roofline")
    if "fp16" in ours and "w8a16" in ours:
        text += (f"; ours on the same machine {ours['fp16']['replay_ms'] / ours['w8a16']['replay_ms']:.2f}x "
                 f"({ours['w8a16']['replay_ms']:.3f} against {ours['fp16']['replay_ms']:.3f} ms; its steps "
                 f"{s[best]['ms']:.3f} and {s['fp16']['ms']:.3f} ms)")
    return text + "."


def reference_section(d: dict) -> list[str]:
    """Both tables of one ``reference-MODEL.json``: the bs=1 steps, and each linear alone at M = 1."""
    m, s = d["meta"], d["steps"]
    lines = [f"## An outside yardstick: gpt-fast's recipe on the same GPU, {d['model']}", "",
             f"{m['device']}, {m['date']}, torch {m['torch']}, transformers {m['transformers']}; copy bandwidth "
             f"{m['copy_bw_gb_s']:.0f} GB/s; `python -m benchmarks.compiled_ref --out benchmarks/results --ours`. "
             "A plain-torch Llama decoder (`benchmarks/compiled_llama.py`; four linears a layer, static KV "
             "cache) compiled whole by inductor with coordinate-descent tuning, as gpt-fast sets it, with gpt-fast's "
             "weight-only int8 linear: `F.linear(x, W_int8.to(x.dtype))` times the scales. One bs=1 step, its token "
             f"fed back, in a CUDA graph replayed from a {d['ctx']}-token cache; its roofline counts the weights "
             "and the whole static cache it attends over. Ours: the bare replay of the engine's decode graph at "
             "the same context, by the same command.", "",
             row(["bs=1 decode step", "ms", "% of its roofline", "over its fp16", "compile (s)"]), row(["---"] * 5)]
    for k, r in s.items():
        lines.append(row([f"reference {_STEP_NAMES[k]}", f"{r['ms']:.3f}", f"{r['pct_roofline']:.0f}%",
                          f"{r['speedup_vs_fp16']:.2f}x", f"{r['compile_s']:.0f}"]))
    ours = d.get("ours", {})
    for k, name in (("fp16", "ours fp16"), ("w8a16", "ours W8A16, groups of 128")):
        if k in ours:
            lines.append(row([name, f"{ours[k]['replay_ms']:.3f}", "", "" if "fp16" not in ours else
                              f"{ours['fp16']['replay_ms'] / ours[k]['replay_ms']:.2f}x", ""]))
    if d.get("linears"):
        lines += ["", "Each layer linear alone at M = 1, back to back in a CUDA graph over weights that L2 does not "
                  "hold (us, and % of the copy bandwidth for the weight and scale bytes):", "",
                  row(["linear", "N x K"] + [name for _, name in _KERNELS]), row(["---"] * (2 + len(_KERNELS)))]
        for r in d["linears"]:
            lines.append(row([r["linear"], f"{r['N']} x {r['K']}"] +
                             [f"{r[k]['us']:.1f} ({r[k]['pct_copy_bw']:.0f}%)" for k, _ in _KERNELS]))
    if d.get("note"):
        lines += ["", d["note"]]
    return lines + [""]
