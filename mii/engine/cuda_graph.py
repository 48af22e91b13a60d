"""CUDA graphs for decode steps.

A decode step launches hundreds of small kernels; replaying a captured graph costs one
launch. We capture the model's forward for a ladder of batch sizes over fixed-shape
input buffers, then serve a decode batch of B sequences by copying its inputs into the
smallest bucket >= B (padding rows write no KV: slot -1) and replaying that graph.
"""
from __future__ import annotations

import logging

import torch

from mii.model.decoder import BatchContext, DecoderModel
from mii.model.ops import Ops

log = logging.getLogger(__name__)


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch (which is always a bucket)."""
    ladder = [1, 2, 4, 8] + list(range(16, max_batch, 16))
    return [b for b in ladder if b < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(self, model: DecoderModel, ops: Ops, max_batch: int, max_blocks: int, device: torch.device):
        self.model, self.ops, self.device = model, ops, device
        self.sizes = buckets(max_batch)
        n = self.sizes[-1]
        z = dict(device=device)
        self.input_ids = torch.zeros(n, dtype=torch.long, **z)
        self.positions = torch.zeros(n, dtype=torch.long, **z)
        self.slots = torch.full((n,), -1, dtype=torch.long, **z)
        self.tables = torch.zeros(n, max_blocks, dtype=torch.int32, **z)
        self.cu = torch.arange(n + 1, dtype=torch.int32, **z)
        self.ctx_lens = torch.ones(n, dtype=torch.int32, **z)
        self.rows = torch.arange(n, dtype=torch.long, **z)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self._capture()

    def _ctx(self, b: int) -> BatchContext:
        return BatchContext(self.positions[:b], self.slots[:b], self.tables[:b], self.cu[:b + 1],
                            self.ctx_lens[:b], self.rows[:b])

    @torch.inference_mode()
    def _capture(self) -> None:
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            ctx = self._ctx(b)
            self.model(self.input_ids[:b], ctx, self.ops)  # warm-up: compile/autotune outside capture
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.outputs[b] = self.model(self.input_ids[:b], ctx, self.ops)
            self.pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize()

    def fits(self, batch_size: int, width: int) -> bool:
        return batch_size <= self.sizes[-1] and width <= self.tables.shape[1]

    def run(self, input_ids: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """Logits for a decode-only batch (one token per sequence)."""
        B = input_ids.shape[0]
        b = next(s for s in self.sizes if s >= B)
        self.input_ids[:B].copy_(input_ids)
        self.positions[:B].copy_(ctx.positions)
        self.slots[:B].copy_(ctx.slot_mapping)
        self.slots[B:b].fill_(-1)
        w = ctx.block_tables.shape[1]
        self.tables[:B, :w].copy_(ctx.block_tables)
        self.ctx_lens[:B].copy_(ctx.context_lens)
        self.ctx_lens[B:b].fill_(1)
        self.graphs[b].replay()
        return self.outputs[b][:B]
