"""Prompt logprobs (vLLM's ``prompt_logprobs``, OpenAI's ``echo`` with ``logprobs``): the
log-probability of each prompt token given the tokens before it, as lm-eval-harness asks
for to score a continuation.

A prefill chunk of a sequence that asks for them has its logits computed at every prompt
position, not only at the last. Those rows join the step's sampling rows in token order, so
a step of one-token rows still matches the decode CUDA graph's row order (logits of
tokens 0..B-1); the runner then splits the logits into the rows that sample and the rows
that score. Scores move to the host as sampled tokens do: without blocking, collected
with the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampler import to_host
from .sequence import Sequence, TokenLogprob


@dataclass(slots=True)
class PromptRows:
    """Which of a step's logits rows sample and which score prompt positions."""

    sample_rows: list[int]          # logits rows of the sampling sequences, in batch order
    score_rows: list[int]           # logits rows that score a prompt position
    scored: list[tuple[Sequence, int]]  # (sequence, position) of each score row

    @classmethod
    def merge(cls, sample_tokens: list[int], scored: list[tuple[int, Sequence, int]]
              ) -> tuple[list[int], PromptRows]:
        """``sample_tokens``: the packed token index of each sampling row; ``scored``:
        (packed token index, sequence, position) of each prompt position to score.
        Returns the step's logits indices, in token order, and the split."""
        rows = sorted([(t, None, 0) for t in sample_tokens] + scored, key=lambda r: r[0])
        sample_rows = [k for k, r in enumerate(rows) if r[1] is None]
        score_rows = [k for k, r in enumerate(rows) if r[1] is not None]
        return [r[0] for r in rows], cls(sample_rows, score_rows, [(r[1], r[2]) for r in rows if r[1] is not None])

    def split(self, logits: torch.Tensor) -> tuple[torch.Tensor, PromptScores]:
        """(the sampling rows' logits, the scores launched from the others)."""
        dev = logits.device
        sample = logits[torch.tensor(self.sample_rows, device=dev, dtype=torch.long)]
        return sample, PromptScores(logits[torch.tensor(self.score_rows, device=dev, dtype=torch.long)], self.scored)


class PromptScores:
    """Scores of one step's prompt positions, computed on the logits' device and copied
    to the host without blocking; :meth:`host` waits for them."""

    def __init__(self, logits: torch.Tensor, scored: list[tuple[Sequence, int]]):
        self.scored = scored
        self.want = [seq.params.prompt_logprobs for seq, _ in scored]
        dev = logits.device
        targets = torch.tensor([seq.token_ids[p + 1] for seq, p in scored], dtype=torch.long).to(dev, non_blocking=True)
        lp = logits.float().log_softmax(-1)
        parts = [lp.gather(-1, targets[:, None])[:, 0]]
        k = max(self.want)
        if k:
            parts += list(lp.topk(k, dim=-1))
        self._parts = [to_host(t) for t in parts]
        self._event = None
        if dev.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def host(self) -> list[tuple[Sequence, TokenLogprob]]:
        if self._event is not None:
            self._event.synchronize()
        chosen = self._parts[0].tolist()
        top_v, top_i = (self._parts[1].tolist(), self._parts[2].tolist()) if len(self._parts) == 3 else ([], [])
        out = []
        for r, ((seq, p), w) in enumerate(zip(self.scored, self.want)):
            top = list(zip(top_i[r][:w], top_v[r][:w])) if w else []
            out.append((seq, TokenLogprob(seq.token_ids[p + 1], chosen[r], top)))
        return out

