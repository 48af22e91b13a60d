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

A step's packed inputs are copied into one fixed staging buffer and the graph for the
smallest fitting bucket is replayed: its first kernel unpacks them into the buffers the
rest was captured on (``kernels/step_inputs.py``), feeding the input ids still on the
device from ``last``, the runner's buffer of the last step's tokens. All graphs share one
memory pool, the largest captured first.
"""
from __future__ import annotations

import logging

import torch

from kernels.step_inputs import fill_step_inputs
from mii.model.decoder import BatchContext, DecoderModel
from mii.model.ops import Ops
from .inputs import HEADER, StepInputs

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
                 last: torch.Tensor, mixed: bool = True):
        self.model, self.ops, self.last = model, ops, last
        device = last.device
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
        # the largest step a graph takes: T <= n tokens, as many logits rows, B <= max_seqs
        self.stage = torch.zeros(StepInputs.words((n, max_seqs, max_blocks, n, max_seqs)), dtype=torch.long, **z)
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
        """The work of graph (kind, n): unpack the staged step, then the forward pass."""
        mixed = kind == "mixed"
        fill = (self.buffers, self.stage, self.last, n, self.max_seqs if mixed else n, mixed)
        if not mixed:
            ctx = self._decode_ctx(n)

            def decode():
                fill_step_inputs(*fill)
                logits = self.model(self.input_ids[:n], ctx, self.ops)
                return logits, self.ops.argmax(logits, out=self.last[:n])
            return decode
        ctx = self._mixed_ctx(n)

        def mixed_step():
            fill_step_inputs(*fill)
            return self.model.hidden(self.input_ids[:n], ctx, self.ops)
        return mixed_step

    def passes(self) -> list:
        """Every pass that :meth:`capture` runs: for compiling their kernels first
        (mii/engine/precompile.py)."""
        self.stage.zero_()  # an empty step: every token and sequence is padding
        return [self._pass(kind, n) for kind, n in self._work()]

    @torch.inference_mode()
    def capture(self) -> None:
        self.stage.zero_()
        for kind, n in self._work():
            fn = self._pass(kind, n)
            fn()  # warm-up: compile/autotune outside capture
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.outputs[kind, n] = fn()
            self.pool = g.pool()
            self.graphs[kind, n] = g
        torch.cuda.synchronize()

    def key(self, sizes: tuple[int, int, int, int, int]) -> tuple[str, int] | None:
        """The graph for a step of these sizes (see StepInputs), or None."""
        T, B, width, S, _ = sizes
        if B > self.max_seqs or width > self.tables.shape[1] or StepInputs.words(sizes) > self.stage.numel():
            return None
        if T == B == S:
            return "decode", next(s for s in self.sizes if s >= B)
        return next((("mixed", t) for t in self.token_sizes if t >= T), None)

    def run(self, key: tuple[str, int], inputs: StepInputs, float32: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for the step's logits rows (float32 from a decode graph, whatever
        ``float32``) and, from a decode graph, their argmax (else None), which is also in
        ``last``. Both are the graph's buffers, which the next replay overwrites."""
        kind, n = key
        T, B, _, S, _ = inputs.sizes
        self.stage[:inputs.data.numel()].copy_(inputs.data, non_blocking=True)
        self.graphs[key].replay()
        if kind == "decode":
            logits, greedy = self.outputs[key]
            return logits[:B], greedy[:B]
        x, residual = self.outputs[key]
        rows = self.stage[HEADER + 3 * T:HEADER + 3 * T + S]
        return self.model.head(x[:T], residual[:T], rows, self.ops, float32), None
