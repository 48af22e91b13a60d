"""Prompt scoring on a GPU, the work of lm-eval's log-likelihood tasks:
`python -m benchmarks.score --model llama-1b --out DIR`.

1,000 prompts of random token ids, lengths uniform in 64-512, each scored in full
(``prompt_logprobs=1``: every prompt token's log-probability and the top alternative, as
lm-eval's ``local-completions`` asks with ``echo`` and ``logprobs=1``) and one token
generated, all submitted at once. Measured beside:
- the same prompts without scoring (prefill and one token): what scoring adds;
- HF transformers, the way lm-eval's ``hf`` backend runs: batches of 32 in length order,
  right-padded, one forward each, log-softmax gathered at the prompt tokens; the first
  batch is a warm-up, excluded and reported.
The scores of the first prompts are compared with HF's (both fp16). Writes
``score-MODEL.json`` (``benchmarks.report`` puts it in RESULTS.md).
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import datetime
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from mii.config import SamplingParams

from . import ours
from .models import build

N, LO, HI, HF_BATCH = 1000, 64, 512, 32


def prompts(vocab: int, n: int = N) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, min(vocab, 30000)) for _ in range(rng.randint(LO, HI))] for _ in range(n)]


def ours_run(eng, batch: list[list[int]], scored: bool, profile: bool = False) -> tuple[float, list]:
    params = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True, prompt_logprobs=1 if scored else None)
    torch.cuda.synchronize()
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    outs = eng.generate(batch, params)
    seconds = time.perf_counter() - t0
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(16)
    return seconds, outs


@torch.no_grad()
def hf_scores(model, batch: list[list[int]]) -> list[torch.Tensor]:
    """Each prompt's [len - 1] log-probabilities of its tokens 1.., on the host."""
    width = max(map(len, batch))
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    ids, mask = ids.cuda(), mask.cuda()
    lp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
    got = lp.gather(-1, ids[:, 1:, None])[..., 0].cpu()
    return [got[i, :len(p) - 1] for i, p in enumerate(batch)]


def hf_run(model, batch: list[list[int]]) -> dict:
    order = sorted(range(len(batch)), key=lambda i: -len(batch[i]))  # longest first, as lm-eval
    groups = [[batch[i] for i in order[k:k + HF_BATCH]] for k in range(0, len(order), HF_BATCH)]
    t0 = time.perf_counter()
    hf_scores(model, groups[0])
    torch.cuda.synchronize()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for g in groups[1:]:
        hf_scores(model, g)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(len(p) for g in groups[1:] for p in g)
    return {"batch": HF_BATCH, "seconds": seconds, "prompt_tok_s": tokens / seconds, "warmup_s": warmup}


def run(model: str, root: Path, profile: bool = False) -> dict:
    path, hf = build(model, root)
    eng, _ = ours.make_engine(path)
    batch = prompts(eng.spec.vocab)
    tokens = sum(map(len, batch))
    out = {"model": model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "prompts": N, "prompt_lengths": [LO, HI], "prompt_tokens": tokens,
           "max_num_seqs": eng.config.max_num_seqs, "max_num_batched_tokens": eng.config.max_num_batched_tokens}
    ours_run(eng, batch[:64], True)  # warm-up
    for scored in (False, True):
        seconds, outs = ours_run(eng, batch, scored)
        out["scored" if scored else "plain"] = {"seconds": seconds, "prompt_tok_s": tokens / seconds}
    if profile:  # where the host's time goes, in a run of its own (the profiler slows it)
        ours_run(eng, batch, True, profile=True)
    print(json.dumps(out), flush=True)
    eng.shutdown()
    del eng
    gc.collect()
    torch.cuda.empty_cache()  # the engine's KV cache filled the GPU
    # the scores against HF's on the first prompts (fp16 both)
    ref = hf_scores(hf, batch[:16])
    out["max_abs_diff_vs_hf"] = max((torch.tensor([e.logprob for e in o.prompt_logprobs[1:]]) - r).abs().max().item()
                                    for o, r in zip(outs[:16], ref))
    out["hf"] = hf_run(hf, batch)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=["llama-1b"])
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--profile", action="store_true", help="print the host's hot functions of a scored run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.model:
            (args.out / f"score-{m}.json").write_text(json.dumps(run(m, Path(tmp), args.profile), indent=1))


if __name__ == "__main__":
    main()
