"""The one generic decoder. Every architecture is this code plus a policy.

A step's tokens arrive packed ([T] ids, no padding): prefill chunks and decodes side
by side. Blocks hand on (out, residual) so that each residual add fuses into the next
norm, as in vLLM: the true hidden state is always out + residual.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from kernels.skinny_gemm import exchange_fits
from mii.policies.base import ModelSpec, alibi_slopes
from .fold import Folded, Normed, step_folds
from .layers import GatedUpLinear, Linear, Norm, PositionEmbedding, QKVLinear, VocabEmbedding
from .ops import Ops
from .parallel import TP, Partial
from .quant_linear import norm_quant


@dataclass(slots=True)
class BatchContext:
    """Per-step inputs besides the token ids; fixed-shape buffers under CUDA graphs."""

    positions: torch.Tensor      # [T] int64
    slot_mapping: torch.Tensor   # [T] int64, -1 = padding
    block_tables: torch.Tensor   # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor   # [B + 1] int32
    context_lens: torch.Tensor   # [B] int32, KV length after this step
    logits_indices: torch.Tensor | None  # [S] int64, rows of T whose next token is sampled; None: all, in order


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        self.qkv = QKVLinear(spec.hidden, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.qkv_bias, dtype)
        self.o = Linear(spec.num_heads * spec.head_dim, spec.hidden, spec.o_bias, "row", dtype)
        self.heads, self.kv_heads, self.head_dim = self.qkv.heads, self.qkv.kv_heads, spec.head_dim
        self.scale = spec.head_dim ** -0.5
        self.rotary_dim = spec.rotary_dim
        self.interleaved = spec.policy.rotary_interleaved
        self.window = spec.sliding_window
        self.rms = spec.policy.norm == "rms"  # the kind of norm that follows (a folded norm's statistics)
        self.k_cache = self.v_cache = torch.empty(0)  # bound by the model runner

    def forward(self, x: torch.Tensor | Normed, ctx: BatchContext, ops: Ops, cos_sin, alibi,
                defer: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor | Partial | Folded:
        """``residual``: the o projection adds it and returns :class:`Folded` (fold.py)."""
        # Attention comes next; in a decode step, decode attention, which has loads to issue before
        # it waits on qkv: the qkv GEMV releases it at once (skinny_gemm's release_first).
        qkv = self.qkv(x, release_first=True)  # x may be an int8 activation (W8A8), so the shape comes from qkv
        T, D = qkv.shape[0], self.head_dim
        sizes = [self.heads * D, self.kv_heads * D, self.kv_heads * D]
        q, k, v = (t.view(T, -1, D) for t in qkv.split(sizes, dim=-1))
        cache_args = (ctx.positions, cos_sin, self.rotary_dim, self.interleaved,
                      self.k_cache, self.v_cache, ctx.slot_mapping)
        if T == ctx.cu_seqlens_q.shape[0] - 1:  # one token per sequence, known from shapes: one fused kernel
            o = ops.decode_attention(q, k, v, *cache_args, ctx.block_tables, ctx.context_lens, self.scale, alibi,
                                     self.window)
        else:
            q = ops.rotary_cache(q, k, v, *cache_args)
            o = ops.paged_attention(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.cu_seqlens_q,
                                    ctx.context_lens, self.scale, alibi, self.window)
        o = o.reshape(T, self.heads * D)
        return self.o(o, defer=defer) if residual is None else self.o(o, residual=residual, rms=self.rms)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        if spec.policy.gated_mlp:
            self.up = GatedUpLinear(spec.hidden, spec.intermediate, spec.mlp_bias, dtype)
        else:
            self.up = Linear(spec.hidden, spec.intermediate, spec.mlp_bias, "column", dtype, fuse_bias=False)
        self.down = Linear(spec.intermediate, spec.hidden, spec.mlp_bias, "row", dtype)
        self.act = spec.activation
        self.rms = spec.policy.norm == "rms"

    def forward(self, x: torch.Tensor | Normed, ops: Ops, defer: bool = False,
                residual: torch.Tensor | None = None) -> torch.Tensor | Partial | Folded:
        if residual is not None:  # a folded norm on each side (fold.py): decode on the GPU
            return self.down(self.up(x, act=self.act), residual=residual, rms=self.rms)
        if ops.backend == "triton" and self.up.fuses_act(x):  # decode: the activation rides in up's GEMV
            return self.down(self.up(x, act=self.act), defer=defer)
        return self.down(ops.bias_act(self.up(x), self.up.bias, self.act), defer=defer)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        p = spec.policy
        rms = p.norm == "rms"
        self.parallel = spec.parallel_residual
        self.shared_norm = p.shared_input_norm
        self.ln1 = Norm(spec.hidden, rms, spec.eps, dtype)
        self.attn = Attention(spec, dtype)
        self.ln2 = None if p.shared_input_norm else Norm(spec.hidden, rms, spec.eps, dtype)
        self.mlp = MLP(spec, dtype)

    def forward(self, x, residual, ctx: BatchContext, ops: Ops, cos_sin, alibi, fold: bool = False):
        """x: the previous block's output, or its :class:`Partial` under TP (reduced by the norm
        here); returns this block's the same way. ``fold``: the norms run inside the linears
        (fold.py), and the block returns (:class:`Folded`, None): x + residual is already summed."""
        if isinstance(x, Folded):
            h, residual = x.normed(self.ln1), x.h
        else:
            first = (self.attn.qkv, self.mlp.up) if self.shared_norm else (self.attn.qkv,)
            h, residual = self.norm(x, residual, self.ln1, ops, *first)
        if fold:
            a = self.attn(h, ctx, ops, cos_sin, alibi, residual=residual)
            return self.mlp(a.normed(self.ln2), ops, residual=a.h), None
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x)); GPT-J reuses ln1's output
            a = self.attn(h, ctx, ops, cos_sin, alibi)
            if not self.shared_norm:
                h, _ = self.norm(residual, None, self.ln2, ops, self.mlp.up)
            return a + self.mlp(h, ops), residual
        a = self.attn(h, ctx, ops, cos_sin, alibi, defer=True)
        h, residual = self.norm(a, residual, self.ln2, ops, self.mlp.up)
        return self.mlp(h, ops, defer=True), residual

    @staticmethod
    def norm(x, residual, norm: Norm, ops: Ops, *consumers: nn.Module):
        """(norm(x + residual), x + residual). When the linears it feeds take int8 (W8A8),
        the per-token quantization is fused into the norm and they get an ``Int8Act``."""
        return add_norm(x, residual, norm, ops, all(getattr(m, "takes_int8", False) for m in consumers))


def add_norm(x: torch.Tensor | Partial, residual: torch.Tensor | None, norm: Norm, ops: Ops, int8: bool = False):
    """(norm(x + residual), x + residual), per-token int8 with ``int8``. A :class:`Partial` x
    (a row-parallel linear's output under TP) is summed over the ranks first: in the norm's
    own kernel where the peer-memory all-reduce takes it (decode sizes on one host)."""
    if isinstance(x, Partial):
        peer = TP.peer_all_reduce
        if not int8 and peer is not None and peer.fits_rows(x.x):
            return peer.add_norm(x.x, x.bias, residual, norm.weight, norm.bias, norm.eps, norm.rms)
        x = x.reduced()
    if int8:
        return norm_quant(x, residual, norm)
    return ops.add_norm(x, residual, norm.weight, norm.bias, norm.eps, norm.rms)


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        p = spec.policy
        self.spec, self.dtype = spec, dtype
        rms = p.norm == "rms"
        self.embed = VocabEmbedding(spec.vocab, spec.hidden, dtype)
        self.pos_embed = None
        if p.position == "learned":
            self.pos_embed = PositionEmbedding(spec.max_positions + p.learned_pos_offset, spec.hidden, dtype)
        self.embed_norm = Norm(spec.hidden, rms, spec.eps, dtype) if p.embed_norm else None
        self.layers = nn.ModuleList(Block(spec, dtype) for _ in range(spec.num_layers))
        self.final_norm = Norm(spec.hidden, rms, spec.eps, dtype)
        self.lm_head = self.embed if spec.tied else VocabEmbedding(spec.vocab, spec.hidden, dtype, p.lm_head_bias)
        self.cos_sin: torch.Tensor | None = None
        self.alibi: torch.Tensor | None = None
        self.fold_norms = False  # decode steps fold the norms into the linears (fold.py)
        self.head_folded = False  # the final norm's weights are in the LM head's (fold.py)

    def foldable(self) -> bool:
        """Whether decode steps can fold the norms into the linears (fold.py): sequential
        residual blocks, every linear an fp16/bf16 one on the decode kernel, and under TP the
        row-parallel GEMVs able to sum their outputs over the ranks themselves (the peer-memory
        all-reduce set up; every rank gets the same answer). The model runner asks once the
        model is loaded (and quantized, which rules it out)."""
        if self.spec.parallel_residual or self.dtype not in (torch.float16, torch.bfloat16):
            return False
        device = self.embed.weight.device
        if TP.size > 1 and (TP.peer_all_reduce is None or not exchange_fits(self.spec.hidden, device)):
            return False
        linears = [m for b in self.layers for m in (b.attn.qkv, b.attn.o, b.mlp.up, b.mlp.down)]
        return all(getattr(m, "folds", False) for m in linears) and self.spec.hidden % 16 == 0

    def init_buffers(self, device: torch.device) -> None:
        """Position tables, computed (not loaded) once the model sits on its device."""
        spec = self.spec
        if spec.rotary_dim:
            inv_freq, scale = spec.rope_inv_freq(device)
            t = torch.arange(spec.max_positions, device=device, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
            self.cos_sin = torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)
        if spec.policy.position == "alibi":
            h = self.layers[0].attn.heads
            self.alibi = alibi_slopes(spec.num_heads)[TP.rank * h:(TP.rank + 1) * h].to(device)

    def embed_input(self, input_ids: torch.Tensor, positions: torch.Tensor, ops: Ops) -> torch.Tensor:
        """The first block's input: token (plus learned position) embeddings, normed for BLOOM."""
        x = self.embed.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight[positions + self.spec.policy.learned_pos_offset]
        if self.embed_norm is not None:
            x, _ = ops.add_norm(x, None, self.embed_norm.weight, self.embed_norm.bias, self.spec.eps, False)
        return x

    def forward(self, input_ids: torch.Tensor, ctx: BatchContext, ops: Ops, float32: bool = True) -> torch.Tensor:
        """Logits for the rows ``ctx.logits_indices`` ([S, vocab]; see :meth:`head`)."""
        x, residual = self._blocks(input_ids, ctx, ops, fold=True)
        return self.head(x, residual, ctx.logits_indices, ops, float32)

    def hidden(self, input_ids: torch.Tensor, ctx: BatchContext, ops: Ops) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's (out, residual) for every token; their sum is the hidden state."""
        x, residual = self._blocks(input_ids, ctx, ops)
        return (x.reduced() if isinstance(x, Partial) else x), residual

    def _blocks(self, input_ids: torch.Tensor, ctx: BatchContext, ops: Ops, fold: bool = False):
        """``fold``: a decode step may fold its norms (its output is then :class:`Folded`)."""
        fold = fold and self.fold_norms and ops.backend == "triton" and step_folds(input_ids)
        x, residual = self.embed_input(input_ids, ctx.positions, ops), None
        for layer in self.layers:
            x, residual = layer(x, residual, ctx, ops, self.cos_sin, self.alibi, fold)
        return x, residual

    def head(self, x: torch.Tensor | Partial, residual: torch.Tensor, rows: torch.Tensor | None, ops: Ops,
             float32: bool = True) -> torch.Tensor:
        """Final norm and LM head on the given rows only (None: every row, as a decode step
        samples them all; its graph then holds no gather kernels): float32 logits, or in the
        model's dtype (as the GEMM rounded them: no precision lost) for a caller that converts
        them a few rows at a time, as prompt scoring does with a step's every token."""
        if isinstance(x, Folded):
            x = x if rows is None else x.rows(rows)
            if self.head_folded:  # the final norm runs in the LM head's GEMV
                logits = self.lm_head.logits(x.normed(self.final_norm))
                return logits.float() if float32 else logits
            x, residual, rows = x.h, None, None
        if rows is not None:
            x = x.rows(rows) if isinstance(x, Partial) else x[rows]
            residual = residual[rows]
        h, _ = add_norm(x, residual, self.final_norm, ops)
        logits = self.lm_head.logits(h)
        return logits.float() if float32 else logits
