"""Regenerate benchmarks/RESULTS.md (and the plot) from benchmarks/results/*.json.

This module assembles the document: the model runs first, then each other kind of result file
in a fixed order, then an index of the hand-written notes. The sections themselves are written in
``report_runs`` (model runs and the plot), ``report_kernels``, ``report_tp`` and ``report_engine``.
"""
from __future__ import annotations

import json
from pathlib import Path

from .report_engine import host_section, prefix_section, score_section, startup_section
from .report_reference import reference_section
from .report_kernels import (bound_section, decode_attn_section, gemv_section, prefill_profile_section, quant_section,
                             step_profile_section, w8a8_section)
from .report_runs import plot, run_section
from .report_targets import targets_section
from .report_tp import tp_section

HERE = Path(__file__).parent


def _load(p: Path) -> dict:
    return json.loads(p.read_text())


def write_report(results: Path = HERE / "results", out: Path = HERE / "RESULTS.md") -> None:
    results = Path(results)
    runs = [_load(p) for p in sorted(results.glob("*.json"))
            if not p.name.startswith(("quant-", "tp-", "profile-", "gemv-", "w8a8-", "attn-", "pdl-", "decode-attn",
                                      "host-", "prefix-", "score-", "bound-", "startup-", "reference-"))]
    lines = ["# Benchmark results", "",
             "Regenerate with `python -m benchmarks.run` on a GPU machine (or `python -m benchmarks.report`"
             " to redraw from the JSON in `benchmarks/results/`). Random-init fp16 weights, greedy, "
             "prompt 128 / 128 new tokens unless stated. Roofline = copy bandwidth / (weight bytes + "
             "KV bytes read per step at the mean context).", "",
             "![decode tok/s against batch size: ours, HF eager, HF compiled, bs=1 roofline](results.png)", ""]
    profiles = [_load(p) for p in sorted(results.glob("profile-*.json")) if not p.name.startswith("profile-prefill")]
    quant, tp = results / "quant-llama-7b.json", results / "tp-llama-7b.json"
    refs = [_load(p) for p in sorted(results.glob("reference-*.json"))]
    lines += targets_section({r["model"]: r for r in runs}, _load(quant) if quant.is_file() else None,
                             _load(tp) if tp.is_file() else None, profiles, refs)
    for r in runs:
        lines += run_section(r)
    for p in sorted(results.glob("quant-*.json")):
        lines += quant_section(_load(p))
    for r in refs:
        lines += reference_section(r)
    for p in sorted(results.glob("gemv-*.json")):
        lines += gemv_section(_load(p), p.stem[5:])
    for p in sorted(results.glob("decode-attn-*.json")):
        lines += decode_attn_section(_load(p), p.stem[12:])
    for p in sorted(results.glob("w8a8-*.json")):
        lines += w8a8_section(_load(p), p.stem[5:])
    for p in sorted(results.glob("tp-*.json")):
        lines += tp_section(_load(p))
    for p in sorted(results.glob("prefix-*.json")):
        lines += prefix_section(_load(p))
    for p in sorted(results.glob("score-*.json")):
        lines += score_section(_load(p))
    for p in sorted(results.glob("bound-*.json")):
        lines += bound_section(_load(p))
    for p in sorted(results.glob("startup-*.json")):
        lines += startup_section(_load(p))
    for p in sorted(results.glob("profile-prefill-*.json")):
        lines += prefill_profile_section(_load(p))
    for f in profiles:
        lines += step_profile_section(f)
    host = results / "host-cpu.json"
    if host.is_file():
        lines += host_section(_load(host))
    notes = results / "notes.md"  # hand-written context: experiments not kept, figures no result file holds
    if notes.is_file():
        # Indexed, not appended: appended, they made this file some 2,900 lines, most of it history.
        heads = [h[3:] for h in notes.read_text().splitlines() if h.startswith("## ")]
        lines += ["## Session notes", "", f"Each session's notes on its runs, newest first, are in "
                  f"[`{results.name}/notes.md`]({results.name}/notes.md): what was tried and not kept, and "
                  "figures that no result file holds.", ""] + [f"- {h}" for h in heads]
    Path(out).write_text("\n".join(lines) + "\n")
    plot(runs, Path(out).with_name("results.png"))


if __name__ == "__main__":
    write_report()
