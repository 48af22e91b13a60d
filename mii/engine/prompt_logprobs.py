"""Prompt logprobs (vLLM's ``prompt_logprobs``, OpenAI's ``echo`` with ``logprobs``): the
log-probability of each prompt token given the tokens before it, as lm-eval-harness asks
for to score a continuation.

A prefill chunk of a sequence that asks for them has its logits computed at every prompt
position, not only at the last. ``StepInputs.pack`` lists those rows beside the sampling
rows in token order, so a step of one-token rows still matches the decode CUDA graph's
row order (logits of tokens 0..B-1); the runner then splits the logits into the rows that
sample and the rows that score. Scores move to the host as sampled tokens do: without
blocking, collected with the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampler import logprob_entries, to_host
from .sequence import Sequence, TokenLogprob


@dataclass(slots=True)
class PromptRows:
    """Which of a step's logits rows sample and which score prompt positions."""

    sample_rows: list[int]              # logits rows of the sampling sequences, in batch order
    score_rows: list[int]               # logits rows that score a prompt position
    scored: list[tuple[Sequence, int]]  # (sequence, position) of each score row

    @classmethod
    def of(cls, num_rows: int, score_rows: list[int], scored: list[tuple[Sequence, int]]) -> PromptRows:
        is_score = bytearray(num_rows)
        for r in score_rows:
            is_score[r] = 1
        return cls([r for r in range(num_rows) if not is_score[r]], score_rows, scored)

    def split(self, logits: torch.Tensor) -> tuple[torch.Tensor, PromptScores]:
        """(the sampling rows' logits, the scores launched from the others)."""
        sample = logits[_device_index(self.sample_rows, logits.device)]
        return sample, PromptScores(logits[_device_index(self.score_rows, logits.device)], self.scored)


class PromptScores:
    """Scores of one step's prompt positions, computed on the logits' device and copied
    to the host without blocking; :meth:`host` waits for them.

    A step may score every one of its tokens, so its logits come in the model's dtype and
    are taken to float32 ``chunk`` rows at a time: the memory this needs beyond the
    logits themselves stays fixed (``ModelRunner._activation_reserve`` counts both)."""

    chunk = 256

    def __init__(self, logits: torch.Tensor, scored: list[tuple[Sequence, int]]):
        self.scored = scored
        self.want = [seq.params.prompt_logprobs for seq, _ in scored]
        self.targets = [seq.token_ids[p + 1] for seq, p in scored]
        targets = _device_index(self.targets, logits.device)
        k = max(self.want)
        chosen, top_v, top_i = [], [], []
        for i in range(0, logits.shape[0], self.chunk):
            rows = logits[i:i + self.chunk].float()
            lse = rows.logsumexp(-1)  # log p = logit - logsumexp: no log-softmax copy
            chosen.append(rows.gather(-1, targets[i:i + self.chunk, None])[:, 0] - lse)
            if k:
                values, ids = rows.topk(k, dim=-1)
                top_v.append(values - lse[:, None])
                top_i.append(ids)
        parts = [torch.cat(chosen)] + ([torch.cat(top_v), torch.cat(top_i)] if k else [])
        self._parts = [to_host(t) for t in parts]
        self._event = None
        if logits.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def host(self) -> list[tuple[Sequence, TokenLogprob]]:
        if self._event is not None:
            self._event.synchronize()
        entries = logprob_entries(self.targets, self.want, *self._parts)
        return list(zip([seq for seq, _ in self.scored], entries))


def _device_index(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 indices on ``device`` without waiting for it: a copy from pageable memory
    would first wait for the step's forward to finish."""
    t = torch.tensor(values, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
