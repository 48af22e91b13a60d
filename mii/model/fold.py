"""Decode steps fold each residual-add norm into the GEMVs around it (``kernels/norm.py``).

A pre-norm block's ``h = x + residual; y = norm(h)`` is a kernel of its own, and at bs=1 a
launch that streams no weight. Folded:

- at load, :func:`fold_norm_weights` moves each norm's weight (and bias) into the linears it
  feeds, as QuaRot fuses LayerNorm weights: ``norm(h) W^T = (n(h) * w) W^T = n(h) (W diag w)^T``,
  plus ``W b`` into their bias, where n is the bare normalization. The norms become unit ones,
  so every other path (prefill, CPU) computes the same function from the new weights;
- in a decode step the row-parallel linear before a norm (o, down) adds the residual in its
  epilogue and leaves per-band statistics of h (:class:`Folded`); the linears after it stream
  h itself and scale each output row by 1 / rms(h), first taking out mean(h) times the weight
  row's sum for a LayerNorm (:class:`Normed`).

Under TP the row-parallel GEMVs (o, down) sum their bands over the ranks in their epilogue
through peer memory before adding the residual (``kernels.skinny_gemm.skinny_gemm``'s
exchange), so every rank holds the same h and statistics, and a layer runs the five kernels
it runs on one GPU; unfolded, an all-reduce-and-norm kernel follows each of them.

It applies where every linear runs the weight-streaming decode kernel on fp16/bf16 weights:
one rank, or TP with the peer-memory all-reduce set up, sequential residual blocks, no quantization (its weights would have to be folded before
they are quantized), at most ``SKINNY_M`` tokens in the step. A tied LM head keeps its final
norm: folding it would change the embedding. ``EngineConfig.fold_norms=False`` turns it off.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from kernels.skinny_gemm import SKINNY_M, RowNorm


@dataclass(slots=True)
class Folded:
    """The residual stream h (a linear's output plus the residual) and the statistics of h that
    its GEMV left, in bands of ``band`` columns: the next norm has not run yet."""

    h: torch.Tensor
    stats: torch.Tensor  # [bands, 2, rows] float32
    band: int

    def normed(self, norm) -> Normed:
        """``norm`` (a ``layers.Norm`` folded by :func:`fold_norm_weights`) of h, for the
        linears that read it to finish."""
        return Normed(self.h, self.stats, self.band, norm.eps, norm.rms)

    def rows(self, index: torch.Tensor) -> Folded:
        return Folded(self.h[index], self.stats[:, :, index].contiguous(), self.band)


@dataclass(slots=True)
class Normed:
    """n(h) for a norm folded into the linear that takes it (see the module docstring)."""

    h: torch.Tensor
    stats: torch.Tensor
    band: int
    eps: float
    rms: bool

    def row_norm(self, linear: nn.Module) -> RowNorm:
        return RowNorm(self.stats, self.band, self.eps, self.rms, getattr(linear, "fold_row_sums", None))


@torch.no_grad()
def fold_norm_weights(model) -> None:
    """Move every block norm's weight and bias into the linears it feeds (and the final norm's
    into an untied LM head), leaving the norms at weight 1 and bias 0. For a LayerNorm each of
    those linears also keeps its weight rows' sums (``fold_row_sums``), for the decode kernel."""
    pairs = [(n, lin) for b in model.layers for n, lin in ((b.ln1, b.attn.qkv), (b.ln2, b.mlp.up))]
    if model.lm_head is not model.embed:
        pairs.append((model.final_norm, model.lm_head))
    for norm, lin in pairs:
        w, b = norm.weight.float(), None if norm.bias is None else norm.bias.float()
        rows = torch.empty(lin.weight.shape[0], device=w.device) if not norm.rms else None
        for i in range(0, lin.weight.shape[0], 8192):  # in slices: an LM head in fp32 is large
            W = lin.weight[i:i + 8192]
            if b is not None and b.any():
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.weight.shape[0], dtype=W.dtype, device=W.device),
                                            requires_grad=False)
                lin.bias[i:i + 8192] = lin.bias[i:i + 8192].float() + W.float() @ b
            W.copy_(W.float() * w)
            if rows is not None:
                rows[i:i + 8192] = W.float().sum(1)  # of the rounded weight the kernel streams
        if rows is not None:
            lin.fold_row_sums = rows
    for norm in {id(n): n for n, _ in pairs}.values():
        norm.weight.fill_(1)
        if norm.bias is not None:
            norm.bias.zero_()
    model.head_folded = model.lm_head is not model.embed


def step_folds(input_ids: torch.Tensor) -> bool:
    """Whether a step of these tokens folds its norms, given a folded model and the Triton
    ops (on CUDA; the CPU tests run them interpreted): decode sizes."""
    return input_ids.numel() <= SKINNY_M
