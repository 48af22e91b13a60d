"""Batched sampling on the logits' device.

The draw uses the exponential race: argmax(p / q) with q ~ Exp(1) is a sample from p.
A seeded request draws its q from its own generator, so its tokens do not depend on
what else shares the batch; unseeded rows share one draw.
"""
from __future__ import annotations

import torch

from mii.config import SamplingParams
from mii.model.ops import ops_for
from .sequence import Sequence, TokenLogprob


class Sampler:
    def __init__(self, vocab: int, eos_token_ids: set[int], device: torch.device, seed: int):
        self.vocab, self.eos, self.device = vocab, eos_token_ids, device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.sample_fn = ops_for(device).sample  # temperature, top-k, top-p, draw: one kernel on CUDA

    def new_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [S, V] float32, one row per sequence that samples this step."""
        params = [s.params for s in seqs]
        raw = logits
        if any(p.repetition_penalty != 1.0 or s.num_generated < p.min_new_tokens for s, p in zip(seqs, params)):
            logits = self._penalize(logits.clone(), seqs, params)  # raw stays intact for logprobs
        if all(p.greedy for p in params):
            tokens = logits.argmax(-1)
        else:
            dev = logits.device
            noise = torch.empty_like(logits).exponential_(generator=self.generator)
            for i, s in enumerate(seqs):
                if s.generator is not None and not params[i].greedy:
                    noise[i].exponential_(generator=s.generator)
            tokens = self.sample_fn(
                logits, torch.tensor([p.temperature for p in params], device=dev, dtype=torch.float32),
                torch.tensor([p.top_k for p in params], device=dev),
                torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32), noise)
        return tokens.tolist(), self._logprobs(raw, tokens, params)

    def _penalize(self, logits: torch.Tensor, seqs: list[Sequence], params: list[SamplingParams]) -> torch.Tensor:
        for i, (s, p) in enumerate(zip(seqs, params)):
            if p.repetition_penalty != 1.0:  # HF/CTRL: divide positive logits, multiply negative
                seen = torch.tensor(sorted(set(s.token_ids)), device=logits.device, dtype=torch.long)
                row = logits[i, seen]
                logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            if s.num_generated < p.min_new_tokens:  # no end before the minimum
                ends = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos)
                ends = [t for t in ends if t < logits.shape[1]]
                if ends:
                    logits[i, ends] = float("-inf")
        return logits

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> list[TokenLogprob | None]:
        """Log-probabilities under the model's own distribution (before any processing)."""
        want = [p.logprobs for p in params]
        if all(w is None for w in want):
            return [None] * len(params)
        lp = raw.log_softmax(-1)
        chosen = lp.gather(-1, tokens[:, None])[:, 0].tolist()
        k = max(w or 0 for w in want)
        top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
        out: list[TokenLogprob | None] = []
        for i, w in enumerate(want):
            if w is None:
                out.append(None)
                continue
            top = list(zip(top_i[i, :w].tolist(), top_v[i, :w].tolist())) if w else []
            out.append(TokenLogprob(int(tokens[i]), chosen[i], top))
        return out
