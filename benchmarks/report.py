"""Regenerate benchmarks/RESULTS.md (and the plot) from benchmarks/results/*.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _where(s: dict) -> str:
    """Where the serving time went: host work against waiting on the device."""
    if "host_wait_s" in s:
        return (f"{s['steps']} steps in {s['seconds']:.1f} s: the host waited on the GPU {s['host_wait_s']:.1f} s "
                f"and was busy (scheduling, packing, launching, detokenizing) {s['host_busy_s']:.1f} s.")
    return "Where the time went (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s.get("phase_seconds", {}).items()) + "."


def _prefix_section(f: dict) -> list[str]:
    """``benchmarks.prefix``: the prefix cache on and off."""
    on, off = f["on"], f["off"]
    rows = [("TTFT, 2,048-token prompt, first %d tokens computed before (ms, median of 5)" % f["shared_tokens"],
             f"{off['ttft_shared_ms']:.1f}", f"{on['ttft_shared_ms']:.1f}")]
    for k, label in (("output_tok_s", "200 requests, shared 1,024-token system prompt: output tok/s"),):
        rows.append((label, f"{off['serving'][k]:.0f}", f"{on['serving'][k]:.0f}"))
    rows.append(("... mean / p99 TTFT (ms)", f"{off['serving']['ttft_ms']['mean']:.0f} / {off['serving']['ttft_ms']['p99']:.0f}",
                 f"{on['serving']['ttft_ms']['mean']:.0f} / {on['serving']['ttft_ms']['p99']:.0f}"))
    rows.append(("prompt tokens taken from the cache", "0",
                 f"{on['hit_tokens']:,} of {on['query_tokens']:,} ({100 * on['hit_tokens'] / max(1, on['query_tokens']):.0f}%)"))
    return [f"## Prefix caching, {f['model']}", "", f"{f['device']}, {f['date']}, torch {f['torch']}; "
            "`python -m benchmarks.prefix` (random-init fp16 weights, greedy).", "",
            _row(["measurement", "cache off", "cache on"]), _row(["---"] * 3)] + [_row(list(r)) for r in rows] + [""]


def _score_section(f: dict) -> list[str]:
    """``benchmarks.score``: prompt scoring (lm-eval's log-likelihood requests)."""
    lo, hi = f["prompt_lengths"]
    return [f"## Prompt scoring, {f['model']}", "",
            f"{f['device']}, {f['date']}, torch {f['torch']}; `python -m benchmarks.score`: {f['prompts']:,} prompts "
            f"of {lo}-{hi} random tokens ({f['prompt_tokens']:,} in all), every token scored with its top "
            "alternative (`prompt_logprobs=1`, lm-eval's `echo` + `logprobs=1`), all submitted at once.", "",
            _row(["run", "seconds", "prompt tok/s"]), _row(["---"] * 3),
            _row(["ours, scored", f"{f['scored']['seconds']:.2f}", f"{f['scored']['prompt_tok_s']:.0f}"]),
            _row(["ours, the same prompts unscored (prefill + 1 token)", f"{f['plain']['seconds']:.2f}",
                  f"{f['plain']['prompt_tok_s']:.0f}"]),
            _row([f"HF, batches of {f['hf']['batch']} by length, one forward + log-softmax each "
                  f"(warm-up {f['hf']['warmup_s']:.1f} s excluded)", f"{f['hf']['seconds']:.2f}",
                  f"{f['hf']['prompt_tok_s']:.0f}"]), "",
            f"Scores of the first 16 prompts against HF's (both fp16): largest difference "
            f"{f['max_abs_diff_vs_hf']:.3f} nats.", ""]


def _bound_section(f: dict) -> list[str]:
    """``benchmarks.chain_bound``: the bs=1 step with its norms and/or attention dropped."""
    lines = [f"## The bs=1 step without its norms or attention, {f['model']}", "",
             f"{f['device']}, {f['date']}, torch {f['torch']}; `python -m benchmarks.chain_bound`: bare graph "
             f"replay at a {f['context']}-token context, with kernels dropped from the chain (wrong outputs; only "
             "the time counts). Roofline = step bytes / copy bandwidth. Range over the repeats.", "",
             _row(["mode", "dropped", "bs=1 ms", "% of roofline", "saved (ms)"]), _row(["---"] * 5)]
    by = {}
    for r in f["rows"]:
        by.setdefault((r["mode"], r["dropped"]), []).append(r)
    for (mode, drop), rs in by.items():
        ms = [r["bs1_ms"] for r in rs]
        base = min(r["bs1_ms"] for r in by[(mode, "nothing")])
        lines.append(_row([mode, drop, f"{min(ms):.3f}-{max(ms):.3f}", f"{100 * rs[0]['roofline_ms'] / min(ms):.1f}%",
                           f"{base - min(ms):.3f}"]))
    return lines + [""]


def _startup_section(f: dict) -> list[str]:
    """``benchmarks.startup``: engine ready, cold and warm Triton cache, kernels compiled serially or not."""
    by: dict = {}
    for r in f["runs"]:
        by.setdefault((r["kind"], r["threads"]), []).append(r)
    lines = [f"## Startup, {f['model']}", "",
             f"{f['device']}, {f['date']}, torch {f['torch']}, triton {f['triton']}, {f['cpus']} CPU cores; "
             "`python -m benchmarks.startup`: seconds from `LLMEngine(...)` to a ready engine (weights loaded, "
             "every CUDA graph captured), each start a fresh process. Cold: an empty Triton cache, as on a new "
             "machine or container; warm: the cache that cold start left. Serial: each kernel compiled as graph "
             f"capture meets it; parallel: all of them first, on {f['threads']} threads (`mii/engine/precompile.py`). "
             "Tokens of a greedy and a sampled request after each start: "
             + ("identical in every start." if f["same_tokens"] else "**they differed**."), "",
             _row(["start", "compiles", "seconds, each start", "kernels compiled (warm: loaded from the cache)",
                   "compiled after ready"]),
             _row(["---"] * 5)]
    for (kind, t), rs in by.items():
        lines.append(_row([kind, f"parallel ({t} threads)" if t else "serial",
                           ", ".join(f"{r['startup_s']:.1f}" for r in rs), rs[0]["compiled"],
                           max(r["compiled_later"] for r in rs)]))
    return lines + [""]


def write_report(results: Path = HERE / "results", out: Path = HERE / "RESULTS.md") -> None:
    runs = [json.loads(p.read_text()) for p in sorted(Path(results).glob("*.json"))
            if not p.name.startswith(("quant-", "tp-", "profile-", "gemv-", "w8a8-", "attn-", "pdl-", "decode-attn",
                                      "host-", "prefix-", "score-", "bound-", "startup-"))]
    lines = ["# Benchmark results", "",
             "Regenerate with `python -m benchmarks.run` on a GPU machine (or `python -m benchmarks.report`"
             " to redraw from the JSON in `benchmarks/results/`). Random-init fp16 weights, greedy, "
             "prompt 128 / 128 new tokens unless stated. Roofline = copy bandwidth / (weight bytes + "
             "KV bytes read per step at the mean context).", "",
             "![decode tok/s against batch size: ours, HF eager, HF compiled, bs=1 roofline](results.png)", ""]
    for r in runs:
        m, o = r["meta"], r["ours"]
        bs1 = o["decode"][0]
        lines += [f"## {r['model']} ({r['arch']}, {r['weight_bytes'] / 1e9:.2f} GB of weights)", "",
                  f"{m['device']}, {m['date']}; torch {m['torch']}, transformers {m['transformers']}, "
                  f"triton {m.get('triton', '-')}; copy bandwidth {m['copy_bandwidth_GBs']:.0f} GB/s. "
                  f"Our kernels: {o['backend']}, CUDA graphs: {o['cuda_graphs']}; startup {o['startup_s']:.1f} s.", "",
                  _row(["", "bs=1 tok/s", "bs=1 ms/step", "% roofline", "bs=8", "bs=32", "bs=128", "TTFT 512 (ms)"]),
                  _row(["---"] * 8),
                  _row(["ours", f"{bs1['tok_s']:.0f}", f"{bs1['ms_per_step']:.2f}", f"{bs1['pct_roofline']:.0f}%"]
                       + [f"{d['tok_s']:.0f}" for d in o["decode"][1:]] + [f"{o['ttft_512_ms']:.1f}"])]
        for mode, h in r["hf"].items():
            d1, d32 = h["decode"]
            lines.append(_row([f"HF {mode}", f"{d1['tok_s']:.0f}", f"{d1['ms_per_step']:.2f}",
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
    for p in sorted(Path(results).glob("quant-*.json")):
        q = json.loads(p.read_text())
        m = q["meta"]
        lines += [f"## Quantization, {q['model']}", "", f"{m['device']}, {m['date']}; bs=1 decode, prompt 128. The roofline "
                  "counts the bytes a step reads (weights but the embedding table, plus K/V at the mean context) "
                  "where written as `step_bytes`, else every weight byte on the GPU.", "",
                  _row(["mode", "weights (GB)", "x fp16", "bs=1 tok/s", "speed-up", "% of its roofline",
                        "prefill 4096 (ms)", "prefill speed-up"]), _row(["---"] * 8)]
        for mode, r in q["modes"].items():
            lines.append(_row([mode, f"{r['weight_bytes'] / 1e9:.2f}", f"{r['weight_ratio']:.2f}",
                               f"{r['bs1_tok_s']:.0f}", f"{r['decode_speedup']:.2f}x", f"{r['pct_roofline']:.0f}%",
                               f"{r['prefill_4096_ms']:.0f}", f"{r['prefill_speedup']:.2f}x"]))
        replays = {mode: r for mode, r in q["modes"].items() if "bs1_replay_ms" in r}
        if replays:
            lines += ["", "A bare replay of each mode's bs=1 decode graph (the GPU's share of the step): "
                      + "; ".join(f"{mode} {r['bs1_replay_ms']:.3f} ms ({r['replay_speedup']:.2f}x fp16, "
                                  f"{r['replay_pct_roofline']:.0f}% of its roofline)" for mode, r in replays.items())
                      + "."]
        lines.append("")
    for p in sorted(Path(results).glob("gemv-*.json")):
        g = json.loads(p.read_text())
        lines += [f"## Weight-only GEMMs at decode batch sizes, {g.get('model', 'llama-7b')} shapes ({p.stem[5:]})", "",
                  f"{g['device']}, {g['date']}; {g['dtype']} activations, group 128; GB/s of weight (+ scale) bytes "
                  f"and % of the copy bandwidth ({g['copy_bw_gb_s']:.0f} GB/s); `python -m benchmarks.gemv`.", "",
                  f"PDL on: {g.get('pdl', False)} (each call may start while the one before finishes, as in "
                  "a decode step).", "",
                  _row(["linear", "M", "fp16 cuBLAS", "fp16 ours", "W8A16", "x fp16", "W4A16", "x fp16"]),
                  _row(["---"] * 8)]
        for r in g["groups"].get("128", []):
            cell = lambda m: f"{r[m]['gb_s']:.0f} ({r[m]['pct_copy_bw']:.0f}%)" if m in r else ""  # noqa: E731
            lines.append(_row([f"{r['linear']} {r['N']}x{r['K']}", r["M"], cell("fp16"), cell("gemv16"),
                               cell("w8a16"), f"{r['w8a16']['speedup_vs_fp16']:.2f}x", cell("w4a16"),
                               f"{r['w4a16']['speedup_vs_fp16']:.2f}x"]))
        lines.append("")
    for p in sorted(Path(results).glob("decode-attn-*.json")):
        a = json.loads(p.read_text())
        lines += [f"## Decode attention ({p.stem[12:]})", "",
                  f"{a['device']}, {a['date']}; `python -m benchmarks.decode_attn`: rotary, KV write and split-K "
                  "attention in one launch, block table 4,096 tokens wide, K/V read from memory; us per call and "
                  "% of the copy bandwidth its K/V bytes reach.", "",
                  _row(["shape", "batch", "context", "key tile", "us", "% copy bw"]), _row(["---"] * 6)]
        lines += [_row([r["shape"], r["batch"], r["ctx"], r["block_n"], f"{r['us']:.1f}", f"{r['pct_copy_bw']:.0f}%"])
                  for r in a["rows"]] + [""]
    for p in sorted(Path(results).glob("w8a8-*.json")):
        g = json.loads(p.read_text())
        m = g["meta"]
        lines += [f"## W8A8 GEMMs at prefill sizes, 7B shapes ({p.stem[5:]})", "",
                  f"{m['device']}, {m['date']}, triton {m['triton']}; `python -m benchmarks.w8a8_sweep`: "
                  f"fp16 `F.linear` (cuBLAS) against `kernels/w8a8_gemm.py` at its default tiles.", "",
                  _row(["linear", "M", "fp16 TFLOP/s", "W8A8 TOP/s", "speed-up"]), _row(["---"] * 5)]
        lines += [_row([f"{r['linear']} {r['N']}x{r['K']}", r["M"], f"{r['fp16_tflops']:.0f}",
                        f"{r['w8a8_tops']:.0f}", f"{r['speedup']:.2f}x"]) for r in g["rows"]] + [""]
    for p in sorted(Path(results).glob("tp-*.json")):
        t = json.loads(p.read_text())
        mode = f" {t['quantize'].upper()}" if t.get("quantize") else ""
        lines += [f"## Tensor parallel, {t['model']}{mode}", "", f"{t['device']}, {t['date']}, torch {t['torch']}; "
                  f"CUDA graphs: {t['tp2'].get('graphs')}.", "",
                  f"- bs=1 decode: TP=1 {t['tp1']['bs1_ms_per_step']:.2f} ms/step, TP=2 "
                  f"{t['tp2']['bs1_ms_per_step']:.2f} ms/step: {t['latency_ratio']:.2f}x the TP=1 latency.",
                  f"- greedy outputs identical to {t.get('outputs_reference', 'TP=1')}: {t['identical_outputs']} "
                  f"(first 8 tokens agree on "
                  f"{100 * t['first_token_agreement']:.0f}% of prompts"
                  + (f", the first token on {100 * t['one_token_agreement']:.0f}%" if "one_token_agreement" in t else "")
                  + ")"
                  + (f"; first-token log-probabilities within {t['max_logprob_diff']:.1e} of the reference's"
                     if "max_logprob_diff" in t else "")
                  + (f" (and within {t['max_logprob_diff_vs_fp16']['tp1']:.1e} and "
                     f"{t['max_logprob_diff_vs_fp16']['tp2']:.1e} of fp16's, for TP=1 and TP=2)"
                     if "max_logprob_diff_vs_fp16" in t else "") + ".",
                  *([f"- the norm fold alone (TP=1 with and without it): outputs identical "
                     f"{t['fold_identical_outputs']}, first-token log-probabilities within "
                     f"{t['fold_max_logprob_diff']:.1e}; TP=2 identical to the folded TP=1: "
                     f"{t['identical_to_folded_tp1']}."] if "fold_identical_outputs" in t else []),
                  *([f"- TP=2 with NCCL doing every all-reduce: {t['tp2_nccl']['bs1_ms_per_step']:.2f} ms/step "
                     f"({t['tp2_nccl']['bs1_ms_per_step'] / t['tp1']['bs1_ms_per_step']:.2f}x)"
                     + (f"; one NCCL all-reduce in a graph {t['allreduce_nccl_us']:.1f} us"
                        if "allreduce_nccl_us" in t else "") + "."] if "tp2_nccl" in t else []),
                  *([f"- all-reduce of one token's hidden state ({t.get('allreduce_kind', 'NCCL')}): "
                     f"{t['allreduce_us']:.1f} us"
                     + (f" replayed in a CUDA graph ({t['allreduce_eager_us']:.1f} us launched eagerly)"
                        if "allreduce_eager_us" in t else " launched eagerly")
                     + ("; inside the engine's TP=2 step (profiled, waits for the slower rank included) the all-reduces "
                        "(with the norms they are fused with, where they are) take "
                        if "tp2_profile" in t else "; 2 per layer = ")
                     + f"{t['allreduce_per_step_ms']:.2f} ms per step, {100 * t['allreduce_fraction']:.0f}% of the "
                     "TP=2 step."] if "allreduce_per_step_ms" in t else []),
                  *([f"- all-reduce, residual add and RMSNorm of one token, 64 in a CUDA graph: "
                     f"{t['peer_then_norm_us']:.1f} us as two kernels, {t['fused_norm_us']:.1f} us fused."]
                    if "fused_norm_us" in t else []),
                  *([f"- the all-reduce timed on its own (the two lines above): {t['allreduce_from']}."]
                    if "allreduce_from" in t else []),
                  *([f"- one rank's share of the model alone on one GPU ({t['rank_alone']['shape']}: the same "
                     f"kernels, no all-reduce, no gather): {t['rank_alone']['bs1_ms_per_step']:.2f} ms/step, "
                     f"{t['rank_alone']['ratio_to_tp1']:.2f}x TP=1. That is TP=2 with exchanges that cost "
                     f"nothing; they add {t['tp2']['bs1_ms_per_step'] - t['rank_alone']['bs1_ms_per_step']:.2f} ms."]
                    if "rank_alone" in t else []),
                  *([f"- the rank alone (the line above): from {t['rank_alone_from']}."]
                    if "rank_alone_from" in t else []), ""]
        if "tp2_profile" in t:  # rank 0's kernels per decode step (`--profile`), TP=1 against TP=2
            ps = [t["tp1_profile"], t["tp2_profile"]]
            names = ["TP=1", "TP=2"]
            if "profile" in t.get("rank_alone", {}):
                ps.append(t["rank_alone"]["profile"])
                names.append("one rank alone")
            lines += ["Rank 0's GPU kernels per bs=1 decode step (us; torch.profiler over 32 steps, graph replays "
                      "included):", "", _row(["kernels"] + names), _row(["---"] * (1 + len(ps))),
                      _row(["step (ms)"] + [f"{p['ms_per_step']:.3f}" for p in ps])]
            for k in dict.fromkeys(k for p in ps[1:] + ps[:1] for k in p["kernels"]):
                lines.append(_row([k] + [f"{p['kernels'][k]['us']:.0f}" if k in p["kernels"] else "" for p in ps]))
            lines.append("")
    for p in sorted(Path(results).glob("prefix-*.json")):
        lines += _prefix_section(json.loads(p.read_text()))
    for p in sorted(Path(results).glob("score-*.json")):
        lines += _score_section(json.loads(p.read_text()))
    for p in sorted(Path(results).glob("bound-*.json")):
        lines += _bound_section(json.loads(p.read_text()))
    for p in sorted(Path(results).glob("startup-*.json")):
        lines += _startup_section(json.loads(p.read_text()))
    for p in sorted(Path(results).glob("profile-prefill-*.json")):
        f = json.loads(p.read_text())
        modes = list(f["modes"])
        kinds = list(dict.fromkeys(k for v in f["modes"].values() for k in v["kernels"]))
        lines += [f"## Where a {f['prompt_tokens']:,}-token prefill goes, {f['model']}", "",
                  f"{f['device']}; `python -m benchmarks.profile_step --prefill {f['prompt_tokens']}`: time to first "
                  "token and the kernels of one prefill (chunks of 2,048 tokens), in us.", "",
                  _row(["kernels"] + modes), _row(["---"] * (1 + len(modes))),
                  _row(["time to first token (ms)"] + [f"{v['ttft_ms']:.1f}" for v in f["modes"].values()])]
        lines += [_row([k] + [f["modes"][m]["kernels"].get(k, {}).get("us", "") for m in modes]) for k in kinds]
        lines.append("")
    for p in sorted(Path(results).glob("profile-*.json")):
        f = json.loads(p.read_text())
        if "modes" in f:
            continue  # a prefill profile, above
        lines += [f"## Where a bs=1 decode step goes, {f['model']}", "",
                  f"{f['device']}: engine step {f['engine_step_ms']:.3f} ms; bare replay of its CUDA graph "
                  f"{f['graph_replay_ms']:.3f} ms; the kernels alone (profiled eagerly) {f['kernel_sum_ms']:.3f} ms; "
                  f"roofline (weights / copy bandwidth) {f['roofline_ms']:.3f} ms.", "",
                  _row(["kernels", "count", "us"]), _row(["---"] * 3)]
        lines += [_row([k, v["count"], v["us"]]) for k, v in f["kernels"].items()] + [""]
    host = Path(results) / "host-cpu.json"
    if host.is_file():
        lines += _host_section(json.loads(host.read_text()))
    notes = Path(results) / "notes.md"  # hand-written context for runs that did not finish
    if notes.is_file():
        lines += [notes.read_text()]
    Path(out).write_text("\n".join(lines) + "\n")
    _plot(runs, Path(out).with_name("results.png"))


def _host_section(h: dict) -> list[str]:
    """``benchmarks.host``: the host's share of a step on the CPU, and the admission cost model."""
    m, runs = h["meta"], {"decode, bs=128": h["decode_bs128"], "serving mix, 400 requests": h["serving_400"]}
    phases = list(dict.fromkeys(k for r in runs.values() for k in r["phase_ms_per_step"]))
    lines = ["## Host work per step (CPU)", "",
             f"{m['machine']}, {m['threads']} threads, {m['date']}; torch {m['torch']}; `python -m benchmarks.host "
             "--schedule`: a tiny Llama through the real engine, each phase of a step timed (ms per step). Host work "
             "is all but the forward pass and sampling, which the GPU runs in a deployment.", "",
             _row(["phase"] + list(runs)), _row(["---"] * (1 + len(runs))),
             _row(["host work"] + [f"{r['host_ms_per_step']:.3f}" for r in runs.values()])]
    lines += [_row([k] + [f"{r['phase_ms_per_step'].get(k, 0):.3f}" for r in runs.values()]) for k in phases]
    a = h.get("admission")
    if a:
        lines += ["", f"Admission cost model: the 7B serving workload (1,000 requests) through the real scheduler "
                  f"against {a['kv_tokens']:,} tokens of KV, with the step cost modeled on the H100:", ""]
        for name, what in (("headroom", "with the headroom"), ("full_cache", "filling the cache to its last block")):
            r = a[name]
            lines.append(f"- {what}: {r['preemptions']} preemptions, {r['steps']} steps, "
                         f"{r['prompt_tokens_computed'] - r['prompt_tokens']:,} prompt tokens computed again, "
                         f"{r['model_seconds']:.1f} model seconds.")
    return lines + [""]


def _plot(runs, path: Path) -> None:
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


if __name__ == "__main__":
    write_report()

