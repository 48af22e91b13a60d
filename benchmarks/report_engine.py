"""RESULTS.md's engine sections: the prefix cache, prompt scoring, startup, and the host's work per step."""
from __future__ import annotations

from .report_md import row


def prefix_section(f: dict) -> list[str]:
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
            row(["measurement", "cache off", "cache on"]), row(["---"] * 3)] + [row(list(r)) for r in rows] + [""]


def score_section(f: dict) -> list[str]:
    """``benchmarks.score``: prompt scoring (lm-eval's log-likelihood requests)."""
    lo, hi = f["prompt_lengths"]
    return [f"## Prompt scoring, {f['model']}", "",
            f"{f['device']}, {f['date']}, torch {f['torch']}; `python -m benchmarks.score`: {f['prompts']:,} prompts "
            f"of {lo}-{hi} random tokens ({f['prompt_tokens']:,} in all), every token scored with its top "
            "alternative (`prompt_logprobs=1`, lm-eval's `echo` + `logprobs=1`), all submitted at once.", "",
            row(["run", "seconds", "prompt tok/s"]), row(["---"] * 3),
            row(["ours, scored", f"{f['scored']['seconds']:.2f}", f"{f['scored']['prompt_tok_s']:.0f}"]),
            row(["ours, the same prompts unscored (prefill + 1 token)", f"{f['plain']['seconds']:.2f}",
                 f"{f['plain']['prompt_tok_s']:.0f}"]),
            row([f"HF, batches of {f['hf']['batch']} by length, one forward + log-softmax each "
                 f"(warm-up {f['hf']['warmup_s']:.1f} s excluded)", f"{f['hf']['seconds']:.2f}",
                 f"{f['hf']['prompt_tok_s']:.0f}"]), "",
            f"Scores of the first 16 prompts against HF's (both fp16): largest difference "
            f"{f['max_abs_diff_vs_hf']:.3f} nats.", ""]


def startup_section(f: dict) -> list[str]:
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
             row(["start", "compiles", "seconds, each start", "kernels compiled (warm: loaded from the cache)",
                  "compiled after ready"]),
             row(["---"] * 5)]
    for (kind, t), rs in by.items():
        lines.append(row([kind, f"parallel ({t} threads)" if t else "serial",
                          ", ".join(f"{r['startup_s']:.1f}" for r in rs), rs[0]["compiled"],
                          max(r["compiled_later"] for r in rs)]))
    return lines + [""]


def host_section(h: dict) -> list[str]:
    """``benchmarks.host``: the host's share of a step on the CPU, and the admission cost model."""
    m, runs = h["meta"], {"decode, bs=128": h["decode_bs128"], "serving mix, 400 requests": h["serving_400"]}
    phases = list(dict.fromkeys(k for r in runs.values() for k in r["phase_ms_per_step"]))
    lines = ["## Host work per step (CPU)", "",
             f"{m['machine']}, {m['threads']} threads, {m['date']}; torch {m['torch']}; `python -m benchmarks.host "
             "--schedule`: a tiny Llama through the real engine, each phase of a step timed (ms per step). Host work "
             "is all but the forward pass and sampling, which the GPU runs in a deployment.", "",
             row(["phase"] + list(runs)), row(["---"] * (1 + len(runs))),
             row(["host work"] + [f"{r['host_ms_per_step']:.3f}" for r in runs.values()])]
    lines += [row([k] + [f"{r['phase_ms_per_step'].get(k, 0):.3f}" for r in runs.values()]) for k in phases]
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
