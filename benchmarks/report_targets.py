"""RESULTS.md's first section: each speed target of the issues against the latest figure that
measures it, met or missed and by how much, and where the bs=1 step's time goes.

The figures come from the result files the other sections print in full; this one only
compares them with the targets, so that a missed target is stated once, with its margin."""
from __future__ import annotations

from .report_md import row
from .report_reference import reference_line


def _cmp(value: float, target: float, unit: str, higher: bool = True, fmt: str = "{:.1f}") -> str:
    met = value >= target if higher else value <= target
    if met:
        return "met"
    return f"missed by {fmt.format(abs(value - target))}{unit}"


def _decode_rows(runs: dict[str, dict]) -> list[list[str]]:
    out = []
    for name in ("llama-1b", "opt-1.3b", "llama-7b"):
        r = runs.get(name)
        if r is None:
            continue
        d = r["ours"]["decode"][0]
        need = d["ms_per_step"] * d["pct_roofline"] / 85
        out.append(["5", f"{name} fp16 bs=1 decode, % of the memory roofline", ">= 85%",
                    f"{d['pct_roofline']:.1f}% ({d['ms_per_step']:.3f} ms/step; replay {d['replay_ms']:.3f} ms, "
                    f"{d['replay_pct_roofline']:.1f}%); 85% is {need:.3f} ms",
                    _cmp(d["pct_roofline"], 85, " points"), r["meta"]["date"]])
    g = runs.get("gpt2-124m")
    if g is not None:
        tok = g["ours"]["decode"][0]["tok_s"]
        out.append(["5", "gpt2-124m bs=1 decode tok/s", ">= 1,500", f"{tok:.0f}",
                    _cmp(tok, 1500, " tok/s", fmt="{:.0f}"), g["meta"]["date"]])
    for mode, target in (("eager", 20), ("compiled", 3)):
        have = {n: r["serving_speedup"][mode] for n, r in runs.items() if mode in r.get("serving_speedup", {})}
        if have:
            out.append(["5", f"serving workload, output tok/s over HF {mode} static batches", f">= {target}x",
                        ", ".join(f"{n} {v:.1f}x" for n, v in have.items()), _cmp(min(have.values()), target, "x"),
                        max(r["meta"]["date"] for r in runs.values())])
    start = {n: (r["ours"]["startup_s"], r["hf"]["compiled"]["decode"][0]["warmup_s"]) for n, r in runs.items()
             if "compiled" in r.get("hf", {})}
    if start:
        out.append(["5", "startup (engine ready, graphs captured) against HF compile's warm-up", "below it",
                    ", ".join(f"{n} {s:.1f} s / {w:.1f} s" for n, (s, w) in start.items()),
                    "met" if all(s < w for s, w in start.values()) else "missed",
                    max(r["meta"]["date"] for r in runs.values())])
    return out


def _quant_rows(q: dict) -> list[list[str]]:
    m, date = q["modes"], q["meta"]["date"]
    out = []
    if "w8a16" in m:
        w = m["w8a16"]
        out += [["6", f"{q['model']} W8A16 bs=1 decode over fp16", ">= 1.8x",
                 f"{w['decode_speedup']:.2f}x ({w['bs1_ms_per_step']:.3f} against "
                 f"{m['fp16']['bs1_ms_per_step']:.3f} ms)",
                 _cmp(w["decode_speedup"], 1.8, "x", fmt="{:.2f}"), date],
                ["6", f"{q['model']} W8A16 bs=1 decode, % of its INT8-weight roofline", ">= 85%",
                 f"{w['pct_roofline']:.1f}%", _cmp(w["pct_roofline"], 85, " points"), date],
                ["6", "W8A16 weight memory over fp16", "<= 0.55x", f"{w['weight_ratio']:.2f}x",
                 _cmp(w["weight_ratio"], 0.55, "x", higher=False, fmt="{:.2f}"), date]]
    if "w4a16" in m:
        out.append(["6", "W4A16 weight memory over fp16", "<= 0.3x", f"{m['w4a16']['weight_ratio']:.2f}x",
                    _cmp(m["w4a16"]["weight_ratio"], 0.3, "x", higher=False, fmt="{:.2f}"), date])
    if "w8a8" in m:
        out.append(["6", "W8A8 prefill of 4,096 tokens over fp16", ">= 1.3x", f"{m['w8a8']['prefill_speedup']:.2f}x",
                    _cmp(m["w8a8"]["prefill_speedup"], 1.3, "x", fmt="{:.2f}"), date])
    return out


def _tp_rows(t: dict) -> list[list[str]]:
    return [["7", f"{t['model']} fp16 TP=2 bs=1 decode latency over TP=1 ({t['device']})", "<= 0.6x",
             f"{t['latency_ratio']:.3f}x" + (" (see the note in its section)" if t.get("note") else ""),
             _cmp(t["latency_ratio"], 0.6, "x", higher=False, fmt="{:.3f}"), t["date"]],
            ["7", "TP=2 outputs against TP=1 (greedy, fp16)", "identical",
             f"first token equal on {100 * t['one_token_agreement']:.0f}% of prompts, the first 8 on "
             f"{100 * t['first_token_agreement']:.0f}%; log-probabilities within {t['max_logprob_diff']:.3f}",
             "met" if t["identical_outputs"] else "missed (fp16 sums in another order)", t["date"]]]


def _where(p: dict) -> str:
    """One profile (``benchmarks.profile_step``): the GEMVs' share against their bytes, and the rest."""
    k, lin = p["kernels"], p["linears"]
    gemv, need = sum(v["us"] for v in lin.values()), sum(v["bytes_us"] for v in lin.values())
    rest = [(n, v["us"]) for n, v in k.items() if n != "gemm"]  # profile_step lists the kinds largest first
    lost = ", ".join(f"{n} {v['us'] - v['bytes_us']:.0f}" for n, v in lin.items())
    return (f"- **{p['model']}** ({p['device']}, {p['date']}): the traced replay spans {p['traced_replay_ms']:.3f} ms. "
            f"The GEMVs take {gemv / 1e3:.3f} ms of it, against {need / 1e3:.3f} ms of bytes at the copy bandwidth "
            f"(us lost per linear, all layers: {lost}); then " + ", ".join(f"{n} {us:.0f} us" for n, us in rest) + ".")


def w8a16_budget(p16: dict, p8: dict, speedup: float = 1.8) -> str:
    """What ``speedup`` over the fp16 step asks of the W8A16 one (two decode profiles of one
    model): the loss its GEMVs may have against their bytes if its norms cost nothing and its
    attention and other kernels took fp16's time, per GEMV, against what each loses now."""
    n = p16["kernels"]["gemm"]["count"] - 1  # the layers' GEMVs, less the LM head
    lin8 = p8["linears"]
    fixed = sum(v["bytes_us"] for k, v in lin8.items() if k != "lm_head") + lin8["lm_head"]["us"]
    fixed += sum(v["us"] for k, v in p16["kernels"].items() if k not in ("gemm", "norm"))
    allowed = 1e3 * p16["traced_replay_ms"] / speedup - fixed
    lost16 = sum(v["us"] - v["bytes_us"] for k, v in p16["linears"].items() if k != "lm_head")
    lost8 = sum(v["us"] - v["bytes_us"] for k, v in lin8.items() if k != "lm_head")
    return (f"- **What {speedup}x asks of W8A16** (the traced replays of {p16['model']} and {p8['model']} above): "
            f"a {p16['traced_replay_ms'] / speedup:.3f} ms step. With its norm kernels gone and its attention and other kernels as fast as fp16's, its {n} GEMVs "
            f"of the layers could lose {allowed:.0f} us against their bytes, {allowed / n:.1f} us each. They lose "
            f"{lost8 / n:.1f} us each now, and fp16's GEMVs, which stream twice the bytes in the same kernels, "
            f"{lost16 / n:.1f} us. 85% of the W8A16 roofline asks for about as much: a "
            f"{p8['roofline_ms'] / 0.85:.3f} ms step.")


def targets_section(runs: dict[str, dict], quant: dict | None, tp: dict | None, profiles: list[dict],
                    references: list[dict] = ()) -> list[str]:
    """The targets of issues 5, 6 and 7 against the figures in ``runs`` (``benchmarks.run`` files by
    model), ``quant`` (the 7B quantization file), ``tp`` (the 7B tensor-parallel file), the
    decode ``profiles`` that carry per-linear shares, and the outside yardsticks in ``references``
    (``benchmarks.compiled_ref``)."""
    rows = _decode_rows(runs) + (_quant_rows(quant) if quant else []) + (_tp_rows(tp) if tp else [])
    lines = ["## Targets", "",
             "The speed targets of the issues against the latest figures below (bs=1: the engine's step, "
             "prompt 128; the roofline counts weight and K/V bytes over the measured copy bandwidth).", "",
             row(["issue", "target", "goal", "now", "status", "measured"]), row(["---"] * 6)]
    lines += [row(r) for r in rows]
    where = [_where(p) for p in profiles if p.get("linears")]
    if where:
        lines += ["", "Where the bs=1 step goes (`python -m benchmarks.profile_step`: a traced replay of the decode "
                  "graph, each kernel counted for how far it moves the end of the chain; sections below):", ""]
        lines += where
    by = {p["model"]: p for p in profiles if p.get("linears")}
    if quant and f"{quant['model']} w8a16" in by and quant["model"] in by:
        lines.append(w8a16_budget(by[quant["model"]], by[f"{quant['model']} w8a16"]))
    lines += [reference_line(r) for r in references if "fp16" in r["steps"] and len(r["steps"]) > 1]
    return lines + [""]
