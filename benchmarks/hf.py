"""transformers baselines on the same random-init models: eager `generate` and the
static-cache `generate` that compiles its decode step (CUDA graphs)."""
from __future__ import annotations

import time

import torch


def _generate(model, ids: torch.Tensor, new_tokens: int, static: bool) -> float:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              attention_mask=torch.ones_like(ids), pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def decode(model, batch: int, static: bool, prompt_len: int = 128, new_tokens: int = 128) -> dict:
    """Warm-up (compile, for static) is one full call, timed and reported apart."""
    vocab = min(model.config.vocab_size, 30000)
    ids = torch.randint(3, vocab, (batch, prompt_len), device="cuda")
    warm = _generate(model, ids, new_tokens, static)
    t = _generate(model, ids, new_tokens, static)
    return {"batch": batch, "tok_s": batch * new_tokens / t, "ms_per_step": 1e3 * t / new_tokens,
            "warmup_s": warm}


def serve_static_batches(model, workload: list[tuple[int, int]], static: bool, max_batches: int | None,
                         batch: int = 32) -> dict:
    """The serving workload in arrival-order static batches of 32: each batch is padded to
    its longest prompt and runs until its longest output. Only requested tokens count.
    With ``max_batches`` the time is extrapolated from the first batches (reported)."""
    vocab = min(model.config.vocab_size, 30000)
    groups = [workload[i:i + batch] for i in range(0, len(workload), batch)]
    run = groups[:max_batches] if max_batches else groups
    # static caches recompile per shape: pad every batch to one shape for the compiled path
    plen_all = max(p for p, _ in workload)
    olen_all = max(o for _, o in workload)
    warm = 0.0
    if static:
        ids = torch.randint(3, vocab, (batch, plen_all), device="cuda")
        warm = _generate(model, ids, 8, static)
    total = 0.0
    for g in run:
        plen = plen_all if static else max(p for p, _ in g)
        olen = olen_all if static else max(o for _, o in g)
        ids = torch.randint(3, vocab, (len(g), plen), device="cuda")
        total += _generate(model, ids, olen, static)
    useful = sum(o for g in run for _, o in g)
    return {"output_tok_s": useful / total, "batches_run": len(run), "batches_total": len(groups),
            "extrapolated": len(run) < len(groups), "warmup_s": warm,
            "seconds_est": total * len(groups) / len(run)}
