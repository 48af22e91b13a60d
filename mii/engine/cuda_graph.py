"""CUDA graphs for every step: pure decodes and mixed prefill+decode batches.

A step launches hundreds of small kernels; replaying a captured graph costs one launch.
Every kernel here takes its grid from tensor shapes alone (never from a value on the
device), so one capture serves any batch of the same padded shape:

- decode graphs, one per batch size bucket B (T = B tokens, one per sequence), cover
  the whole forward pass, logits included, and the logits' argmax: greedy rows take their
  tokens from the replay, not from two more kernel launches (at bs=1 on a small model the
  host's launches, not the GPU, bound the step);
- mixed graphs, one per token bucket T, take up to ``max_seqs`` sequences with any
  split of the T tokens (prefill chunks and decodes side by side). Padding sequences
  bring no query (``cu_seqlens`` repeats), so the attention kernels skip them; padding
  tokens write no KV (slot -1) and belong to no sequence. They capture the blocks only:
  the final norm and LM head run eagerly on the rows that sample, so a 2,048-token
  prefill does not pay for 256 rows of logits.

Inputs are copied into fixed buffers, in one launch (``kernels/step_inputs.py``), and the
graph for the smallest fitting bucket is replayed. All graphs share one memory pool, the
largest captured first.
"""
from __future__ import annotations

import logging

import torch

from kernels.step_inputs import fill_step_inputs
from mii.model.decoder import BatchContext, DecoderModel
from mii.model.ops import Ops

log = logging.getLogger(__name__)


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch (which is always a bucket)."""
    ladder = [1, 2, 4, 8] + list(range(16, max_batch, 16))
    return [b for b in ladder if b < max_batch] + [max_batch]


def token_buckets(max_tokens: int, max_seqs: int) -> list[int]:
    """16, 32, 48, 64, 96, 128, ... (steps of 1.5x and 2x) up to max_tokens, which is
    always a bucket. T == max_seqs is left out: with as many tokens as sequences the
    attention op would read the step as decode-only."""
    ladder, t = [], 16
    while t < max_tokens:
        ladder += [t, t * 3 // 2] if t >= 32 else [t]
        t *= 2
    return [x for x in ladder if x < max_tokens and x != max_seqs] + [max_tokens + (max_tokens == max_seqs)]


class StepGraphs:
    def __init__(self, model: DecoderModel, ops: Ops, max_seqs: int, max_tokens: int, max_blocks: int,
                 device: torch.device, mixed: bool = True):
        self.model, self.ops, self.device = model, ops, device
        self.sizes = buckets(max_seqs)
        self.token_sizes = token_buckets(max_tokens, max_seqs) if mixed else []
        self.max_seqs = max_seqs
        n = max([max_seqs] + self.token_sizes)
        z = dict(device=device)
        self.input_ids = torch.zeros(n, dtype=torch.long, **z)
        self.positions = torch.zeros(n, dtype=torch.long, **z)
        self.slots = torch.full((n,), -1, dtype=torch.long, **z)
        self.tables = torch.zeros(max_seqs, max_blocks, dtype=torch.int32, **z)
        self.cu_decode = torch.arange(max_seqs + 1, dtype=torch.int32, **z)  # never rewritten
        self.cu = torch.zeros(max_seqs + 1, dtype=torch.int32, **z)
        self.ctx_lens = torch.ones(max_seqs, dtype=torch.int32, **z)
        self.rows = torch.arange(max_seqs, dtype=torch.long, **z)
        self.buffers = dict(input_ids=self.input_ids, positions=self.positions, slots=self.slots, tables=self.tables,
                            ctx_lens=self.ctx_lens, cu=self.cu)
        self.fill = fill_step_inputs  # fill_step_inputs_ref for A/B benchmarks
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[str, int], object] = {}
        self.pool = None

    def _work(self) -> list[tuple[str, int]]:
        work = [("mixed", t) for t in self.token_sizes] + [("decode", b) for b in self.sizes]
        return sorted(work, key=lambda kw: -kw[1])  # largest first, so smaller graphs reuse its pool

    def _decode_ctx(self, b: int) -> BatchContext:
        # every token of a decode step samples, in order: no row gather before the head
        return BatchContext(self.positions[:b], self.slots[:b], self.tables[:b], self.cu_decode[:b + 1],
                            self.ctx_lens[:b], None)

    def _mixed_ctx(self, t: int) -> BatchContext:
        return BatchContext(self.positions[:t], self.slots[:t], self.tables, self.cu, self.ctx_lens, self.rows)

    def _pass(self, kind: str, n: int):
        """Set the buffers up for the graph (kind, n) and return its forward pass."""
        if kind == "decode":
            ctx = self._decode_ctx(n)

            def decode():
                logits = self.model(self.input_ids[:n], ctx, self.ops)
                return logits, self.ops.argmax(logits)
            return decode
        # mixed: one sequence holding all tokens; replays rewrite all of it
        width = self.tables.shape[1] * self.model.layers[0].attn.k_cache.shape[1]
        self.cu.fill_(n)
        self.cu[0] = 0
        self.ctx_lens.fill_(1)
        self.ctx_lens[0] = min(n, width)
        ctx = self._mixed_ctx(n)
        return lambda: self.model.hidden(self.input_ids[:n], ctx, self.ops)

    def passes(self) -> list:
        """Every forward pass (and input fill) that :meth:`capture` runs, each a callable that
        sets its own buffers up: for compiling their kernels first (mii/engine/precompile.py)."""
        return [lambda kind=kind, n=n: self._pass(kind, n)() for kind, n in self._work()] + self._fills()

    @torch.inference_mode()
    def capture(self) -> None:
        for kind, n in self._work():
            fn = self._pass(kind, n)
            fn()  # warm-up: compile/autotune outside capture
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.outputs[kind, n] = fn()
            self.pool = g.pool()
            self.graphs[kind, n] = g
        for fill in self._fills():  # compiled now, not in the first step that needs them
            fill()
        self.ctx_lens.fill_(1)
        torch.cuda.synchronize()

    def _fills(self) -> list:
        """The input fill of both kinds: a one-token, one-sequence step fed from a one-token last step."""
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        table, ctx_len = torch.zeros(1, 1, dtype=torch.int32, device=self.device), self.ctx_lens[:1].clone()
        cu = torch.tensor([0, 1], dtype=torch.int32, device=self.device)
        return [lambda mixed=mixed: self.fill(self.buffers, zero, zero, zero, table, ctx_len, cu, (zero, zero, zero),
                                              1, 1, mixed) for mixed in (False, True)]

    def key(self, T: int, B: int, S: int, width: int) -> tuple[str, int] | None:
        """The graph for a step of T tokens over B sequences, S of which sample, or None."""
        if B > self.max_seqs or width > self.tables.shape[1]:
            return None
        if T == B == S:
            return "decode", next(s for s in self.sizes if s >= B)
        return next((("mixed", t) for t in self.token_sizes if t >= T), None)

    def run(self, key: tuple[str, int], input_ids: torch.Tensor, ctx: BatchContext,
            feed: tuple | None = None, float32: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for the step's logits rows (float32 from a decode graph, whatever
        ``float32``) and, from a decode graph, their argmax (else None). Both are the
        graph's buffers, which the next replay overwrites. ``feed``: see ``ModelRunner.forward``."""
        kind, n = key
        T, B = input_ids.shape[0], ctx.block_tables.shape[0]
        mixed = kind == "mixed"
        self.fill(self.buffers, input_ids, ctx.positions, ctx.slot_mapping, ctx.block_tables, ctx.context_lens,
                  ctx.cu_seqlens_q, feed, n, self.max_seqs if mixed else n, mixed)
        self.graphs[key].replay()
        if not mixed:
            logits, greedy = self.outputs[key]
            return logits[:B], greedy[:B]
        x, residual = self.outputs[key]
        return self.model.head(x[:T], residual[:T], ctx.logits_indices, self.ops, float32), None
