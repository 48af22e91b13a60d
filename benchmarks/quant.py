"""Issue-6 figures: bs=1 decode and weight memory per quantization mode, and a 4,096-token
prefill with W8A8 against fp16, on one model shape."""
from __future__ import annotations

import gc

import torch

from . import ours
from .models import kv_bytes_per_step


def weight_bytes_on_device(eng, streamed: bool = False) -> int:
    """Bytes of the model's weights on the GPU; ``streamed``: only those a decode step reads
    in full (not the token and position embedding tables, unless the LM head shares one)."""
    model = eng.runner.model
    skip = set()
    if streamed:
        skip = {m.weight.data_ptr() for m in (model.embed, model.pos_embed) if m is not None}
        skip.discard(model.lm_head.weight.data_ptr())
    seen, n = set(skip), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cuda" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def bench_quant(path, bw: float, modes=(None, "w8a16", "w4a16", "w8a8")) -> dict:
    out = {}
    for mode in modes:
        eng, startup = ours.make_engine(path, quantize=mode)
        wb = weight_bytes_on_device(eng)
        streamed = weight_bytes_on_device(eng, streamed=True) + kv_bytes_per_step(eng.spec, 128 + 64)
        ours.decode(eng, 1, new_tokens=16)
        d = ours.best_decode(eng, 1)
        out[mode or "fp16"] = {"startup_s": startup, "weight_bytes": wb, "step_bytes": streamed,
                               "bs1_tok_s": d["tok_s"], "bs1_ms_per_step": d["ms_per_step"],
                               "bs1_runs_ms_per_step": d["runs_ms_per_step"],
                               "roofline_tok_s": bw / streamed, "pct_roofline": 100 * d["tok_s"] * streamed / bw,
                               "prefill_4096_ms": ours.ttft(eng, prompt_len=4096, repeats=3)}
        if eng.runner.graphs is not None:  # the GPU's share of the step, at the mean context
            out[mode or "fp16"]["bs1_replay_ms"] = ours.replay_ms(eng, 1, 128 + 64)
        eng.shutdown()
        del eng
        gc.collect()
        torch.cuda.empty_cache()
    fp = out["fp16"]
    for mode, r in out.items():
        r["decode_speedup"] = r["bs1_tok_s"] / fp["bs1_tok_s"]
        if "bs1_replay_ms" in r:
            r["replay_speedup"] = fp["bs1_replay_ms"] / r["bs1_replay_ms"]
            r["replay_pct_roofline"] = 100 * r["step_bytes"] / bw / (r["bs1_replay_ms"] / 1e3)
        r["weight_ratio"] = r["weight_bytes"] / fp["weight_bytes"]
        r["prefill_speedup"] = fp["prefill_4096_ms"] / r["prefill_4096_ms"]
    return out
