"""Batched sampling on the logits' device.

The draw uses the exponential race: argmax(p / q) with q ~ Exp(1) is a sample from p.
A seeded request draws its q from its own generator, so its tokens do not depend on
what else shares the batch; unseeded rows share one draw.
"""
from __future__ import annotations

from collections import Counter

import torch

from mii.config import SamplingParams
from mii.model.ops import ops_for
from .sequence import Sequence, TokenLogprob


class Sampler:
    def __init__(self, vocab: int, eos_token_ids: set[int], device: torch.device, seed: int):
        self.vocab, self.eos, self.device = vocab, eos_token_ids, device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        ops = ops_for(device)
        self.sample_fn = ops.sample  # temperature, top-k, top-p, draw: one kernel on CUDA
        self.argmax_fn = ops.argmax  # greedy rows: split over the GPU on CUDA

    def warm_up(self) -> None:
        """Compile the greedy and the sampling kernels now rather than in the first request's step."""
        z = torch.zeros(1, self.vocab, device=self.device)
        self.argmax_fn(z)
        one = torch.ones(1, device=self.device)
        self.sample_fn(z, one, one.long(), one, z + 1)

    def new_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor | None = None) -> "Sampled":
        """logits: [S, V] float32, one row per sequence that samples this step. ``greedy``:
        their argmax, already computed (by a decode graph), taken when no row adjusts its
        logits first. Nothing here waits for the device: the tokens come back through
        :class:`Sampled`."""
        params = [s.params for s in seqs]
        raw = logits
        # Spelled out rather than through SamplingParams.penalizes_history: this runs for every
        # row of every step, and the property call tripled its cost (30 against 10 us at bs=128).
        if any(p.logit_bias or p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
               or (p.min_new_tokens and _generated(s) < p.min_new_tokens) for s, p in zip(seqs, params)):
            logits = self._penalize(logits.clone(), seqs, params)  # raw stays intact for logprobs
            greedy = None
        if all(p.greedy for p in params):
            tokens = greedy if greedy is not None else self.argmax_fn(logits)
        else:
            dev = logits.device
            noise = torch.empty_like(logits).exponential_(generator=self.generator)
            for i, s in enumerate(seqs):
                if s.generator is not None and not params[i].greedy:
                    noise[i].exponential_(generator=s.generator)
            # one host-to-device copy for the three per-row parameters, from pinned memory: from
            # pageable memory the copy may wait for the device, and the host would stop
            # running a step ahead of it
            knobs = torch.tensor([[p.temperature for p in params], [p.top_k for p in params],
                                  [p.top_p for p in params]], dtype=torch.float32, pin_memory=dev.type == "cuda")
            knobs = knobs.to(dev, non_blocking=True)  # rows stay contiguous for the kernel
            tokens = self.sample_fn(logits, knobs[0], knobs[1].long(), knobs[2], noise)
        return Sampled(tokens, *self._logprobs(raw, tokens, params))

    def _penalize(self, logits: torch.Tensor, seqs: list[Sequence], params: list[SamplingParams]) -> torch.Tensor:
        """Per row, in vLLM's order: logit_bias, the repetition penalty, then the presence
        and frequency penalties; last, end tokens are banned until min_new_tokens."""
        dev = logits.device
        for i, (s, p) in enumerate(zip(seqs, params)):
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=dev, dtype=torch.long)
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=dev, dtype=logits.dtype)
            if p.repetition_penalty != 1.0:  # HF/CTRL: divide positive logits, multiply negative
                seen = torch.tensor(sorted(set(s.token_ids)), device=dev, dtype=torch.long)
                row = logits[i, seen]
                logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            if p.presence_penalty or p.frequency_penalty:  # OpenAI: over the generated tokens only
                counts = Counter(s.token_ids[s.num_prompt:])
                if counts:
                    ids = torch.tensor(list(counts), device=dev, dtype=torch.long)
                    n = torch.tensor(list(counts.values()), device=dev, dtype=logits.dtype)
                    logits[i, ids] -= p.frequency_penalty * n + p.presence_penalty
            if _generated(s) < p.min_new_tokens:  # no end before the minimum
                ends = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos)
                ends = [t for t in ends if t < logits.shape[1]]
                if ends:
                    logits[i, ends] = float("-inf")
        return logits

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]):
        """Log-probabilities under the model's own distribution (before any processing):
        (chosen [S], top values [S, k], top ids [S, k], per-row k), on the device."""
        want = [p.logprobs for p in params]
        if all(w is None for w in want):
            return None, None, None, want
        lp = raw.log_softmax(-1)
        chosen = lp.gather(-1, tokens[:, None])[:, 0]
        k = max(w or 0 for w in want)
        top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
        return chosen, top_v, top_i, want


def _generated(seq: Sequence) -> int:
    """Tokens generated before this sample, those still in flight included."""
    return seq.num_tokens - seq.num_prompt


class Sampled:
    """One step's sampled tokens (and logprobs), copied to pinned host memory without
    blocking; :meth:`host` waits for the copy. The device tensor ``tokens`` feeds the
    next step's inputs when it is launched before this one is collected."""

    def __init__(self, tokens: torch.Tensor, chosen, top_v, top_i, want: list[int | None]):
        self.tokens, self.want = tokens, want
        parts = [tokens] + [t for t in (chosen, top_v, top_i) if t is not None]
        self._parts = [to_host(t) for t in parts]
        self._event = None
        if tokens.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def host(self) -> tuple[list[int], list[TokenLogprob | None]]:
        if self._event is not None:
            self._event.synchronize()
        tokens = self._parts[0].tolist()
        if len(self._parts) == 1:
            return tokens, [None] * len(tokens)
        return tokens, logprob_entries(tokens, self.want, *self._parts[1:])


def logprob_entries(token_ids: list[int], want: list[int | None], chosen: torch.Tensor,
                    top_v: torch.Tensor | None = None, top_i: torch.Tensor | None = None
                    ) -> list[TokenLogprob | None]:
    """Host tensors of logprob rows as TokenLogprobs (None where ``want`` is None): the
    chosen token's and the best ``want[r]`` of the [rows, k] top. The top goes to Python
    flattened: ``tolist`` of a [2048, 1] tensor is about 35x slower than of a flat one,
    and prompt scoring moves thousands of rows a step."""
    k = top_v.shape[1] if top_v is not None else 0
    pairs = list(zip(top_i.flatten().tolist(), top_v.flatten().tolist())) if k else []
    return [None if w is None else TokenLogprob(t, c, pairs[r * k:r * k + w])
            for r, (t, c, w) in enumerate(zip(token_ids, chosen.tolist(), want))]


def to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    buf.copy_(t, non_blocking=True)
    return buf
