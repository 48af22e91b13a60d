"""RESULTS.md's tensor-parallel section (``benchmarks.tp``): TP=2 against TP=1, and where the all-reduces go."""
from __future__ import annotations

from .report_md import row


def tp_section(t: dict) -> list[str]:
    """One ``tp-*.json``: latency, output agreement, the all-reduce's cost, and per-kernel profiles if taken."""
    mode = f" {t['quantize'].upper()}" if t.get("quantize") else ""
    lines = [f"## Tensor parallel, {t['model']}{mode}", "", f"{t['device']}, {t['date']}, torch {t['torch']}; "
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
             *([f"- TP=2 with its norms unfolded (an all-reduce-and-norm kernel after each row-parallel GEMV; "
                f"folded, the GEMV sums its bands over the ranks itself): "
                f"{t['tp2_unfolded']['bs1_ms_per_step']:.2f} ms/step ({t['unfolded_latency_ratio']:.2f}x)."]
               if "tp2_unfolded" in t else []),
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
               if "rank_alone_from" in t else []),
             *([f"- Note: {t['note']}"] if "note" in t else []), ""]
    if "tp2_profile" in t:  # rank 0's kernels per decode step (`--profile`), TP=1 against TP=2
        ps = [t["tp1_profile"], t["tp2_profile"]]
        names = ["TP=1", "TP=2"]
        if "profile" in t.get("rank_alone", {}):
            ps.append(t["rank_alone"]["profile"])
            names.append("one rank alone")
        lines += ["Rank 0's GPU kernels per bs=1 decode step (us; torch.profiler over 32 steps, graph replays "
                  "included):", "", row(["kernels"] + names), row(["---"] * (1 + len(ps))),
                  row(["step (ms)"] + [f"{p['ms_per_step']:.3f}" for p in ps])]
        for k in dict.fromkeys(k for p in ps[1:] + ps[:1] for k in p["kernels"]):
            lines.append(row([k] + [f"{p['kernels'][k]['us']:.0f}" if k in p["kernels"] else "" for p in ps]))
        lines.append("")
    return lines
