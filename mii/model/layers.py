"""Layers that load their own parameters: each module's ``weight_loader(param, tensor,
shard)`` takes the slice this tensor-parallel rank keeps, so loading just streams checkpoint tensors.

Linears are plain modules with ``weight``/``bias``, so quantization can swap them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.skinny_gemm import SKINNY_M, skinny_linear

from .fold import Folded, Normed
from .parallel import TP, Partial, all_gather_last_dim, all_reduce, split


class DecodeGemv:
    """Whether CUDA decode-sized linears (at most 16 rows, fp16/bf16) take our weight-streaming
    kernel instead of cuBLAS: it chains with its neighbours under PDL (``kernels/pdl.py``).
    A switch for A/B benchmarks; on by default."""

    enabled = True


def decode_sized(x: torch.Tensor) -> bool:
    """A CUDA fp16/bf16 activation of at most SKINNY_M rows: the weight-streaming kernels take it."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.numel() <= SKINNY_M * x.shape[-1]


def _skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # K tiles are powers of two from 16 up (SmolLM2's 576 inputs take tiles of 64)
    return (DecodeGemv.enabled and decode_sized(x) and weight.dtype == x.dtype and weight.stride(-1) == 1
            and x.shape[-1] % 16 == 0)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           act: str | None = None, release_first: bool = False) -> torch.Tensor:
    """``act``, ``release_first``: see :meth:`Linear.forward`; only the weight-streaming kernel takes them."""
    if act is not None or _skinny(x, weight):
        return skinny_linear(x, weight, bias, act=act, release_first=release_first)
    return F.linear(x, weight, bias)


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _copy(param: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if param.shape != src.shape:
        raise ValueError(f"{what}: checkpoint shape {tuple(src.shape)} does not fit {tuple(param.shape)}")
    param.copy_(src)


def _rows(t: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    return t.narrow(0, rank * size, size)


class Linear(nn.Module):
    """y = x W^T (+ b). kind: "column" splits outputs, "row" splits inputs and all-reduces,
    None keeps it whole. ``fuse_bias=False`` leaves the bias for a fused epilogue
    (the MLP adds it inside its activation kernel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, kind: str | None,
                 dtype: torch.dtype, fuse_bias: bool = True):
        super().__init__()
        self.kind = kind
        self.fuse_bias = fuse_bias
        if kind == "column":
            out_features = split(out_features, "output features")
        elif kind == "row":
            in_features = split(in_features, "input features")
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param(out_features, in_features, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None

    def weight_loader(self, param: nn.Parameter, w: torch.Tensor, shard: str | None) -> None:
        if self.kind == "column":
            w = _rows(w, param.shape[0], TP.rank)
        elif self.kind == "row" and param.dim() == 2:
            w = w.narrow(1, TP.rank * param.shape[1], param.shape[1])
        _copy(param.data, w, "linear")

    def fuses_act(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x, act=...)`` can apply the activation inside its decode kernel:
        a column-split (or whole) layer, whose outputs are this rank's to activate."""
        return self.kind != "row" and _skinny(x, self.weight)

    @property
    def folds(self) -> bool:
        """Whether a decode step can fold norms into this layer (``mii/model/fold.py``)."""
        return self.weight.dtype in (torch.float16, torch.bfloat16) and self.in_features % 16 == 0

    def forward(self, x: torch.Tensor | Normed, act: str | None = None, defer: bool = False,
                residual: torch.Tensor | None = None, rms: bool = True,
                release_first: bool = False) -> torch.Tensor | Partial | Folded:
        """``act``: a ``kernels.activation`` kind; the layer returns ``bias_act(x W^T, bias, act)``
        from its decode kernel's epilogue (when :meth:`fuses_act` says it can), so a decode
        step's MLP runs no separate activation kernel. ``defer``: a row-parallel layer under
        TP returns its :class:`Partial` output, for the norm after it to reduce. A folded norm
        (decode): x may be :class:`Normed`, and with ``residual`` the layer returns
        :class:`Folded` statistics for an RMS (``rms``) or layer norm, summed over the ranks
        first for a row-parallel layer under TP. ``release_first``: the
        decode kernel lets the next one (decode attention) start at once under PDL
        (``kernels.skinny_gemm.skinny_gemm``)."""
        if act is not None and self.kind == "row":
            raise ValueError("a row-parallel linear's outputs are partial sums: it cannot apply an activation")
        bias = self.bias if self.fuse_bias or act is not None else None
        if isinstance(x, Normed) or residual is not None:
            h, norm = (x.h, x.row_norm(self)) if isinstance(x, Normed) else (x, None)
            # under TP the row-parallel GEMV sums its partial over the ranks itself (fold.py)
            exchange = TP.peer_all_reduce.bands if residual is not None and self.kind == "row" and TP.size > 1 else None
            out = skinny_linear(h, self.weight, bias, act=act, residual=residual, rms=rms, norm=norm,
                                release_first=release_first, exchange=exchange)
            return Folded(*out) if residual is not None else out
        if self.kind == "row" and TP.size > 1:
            y = Partial(linear(x, self.weight), bias)
            return y if defer else y.reduced()
        return linear(x, self.weight, bias, act, release_first)


class QKVLinear(Linear):
    """Fused q/k/v projection holding whole heads per rank. With fewer KV heads than
    ranks, each KV head is replicated on the ranks that share it."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool,
                 dtype: torch.dtype):
        self.heads = split(num_heads, "num_attention_heads")
        if num_kv_heads >= TP.size:
            self.kv_heads = split(num_kv_heads, "num_key_value_heads")
        else:
            if TP.size % num_kv_heads:
                raise ValueError(f"tensor_parallel={TP.size} is not a multiple of num_key_value_heads={num_kv_heads}")
            self.kv_heads = 1
        self.total_heads, self.total_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        super().__init__(hidden, (self.heads + 2 * self.kv_heads) * head_dim, bias, None, dtype)
        self.kind = "column"

    def weight_loader(self, param: nn.Parameter, w: torch.Tensor, shard: str | None) -> None:
        D, H, Hkv = self.head_dim, self.total_heads, self.total_kv_heads
        if shard == "qkv":  # [q; k; v] stacked
            q, k, v = w.split([H * D, Hkv * D, Hkv * D], dim=0)
            for s, t in (("q", q), ("k", k), ("v", v)):
                self.weight_loader(param, t, s)
            return
        if shard == "qkv_heads":  # BLOOM/NeoX: [H, 3, D] per head
            w = w.reshape(H, 3, D, *w.shape[1:])
            for i, s in enumerate("qkv"):
                self.weight_loader(param, w[:, i].reshape(H * D, *w.shape[3:]), s)
            return
        q_size, kv_size = self.heads * D, self.kv_heads * D
        if shard == "q":
            src, dst = _rows(w, q_size, TP.rank), param.data.narrow(0, 0, q_size)
        elif shard in ("k", "v"):
            # replicated KV heads: ranks r*Hkv//tp .. share one head
            kv_rank = TP.rank if Hkv >= TP.size else TP.rank * Hkv // TP.size
            src = _rows(w, kv_size, kv_rank)
            dst = param.data.narrow(0, q_size + (kv_size if shard == "v" else 0), kv_size)
        else:
            raise ValueError(f"QKV weight needs a q/k/v shard, got {shard!r}")
        _copy(dst, src, f"{shard}_proj")


class GatedUpLinear(Linear):
    """gate and up projections fused as [gate; up], each split by rank."""

    def __init__(self, hidden: int, intermediate: int, bias: bool, dtype: torch.dtype):
        self.local = split(intermediate, "intermediate_size")
        super().__init__(hidden, 2 * self.local * TP.size, bias, "column", dtype, fuse_bias=False)

    def weight_loader(self, param: nn.Parameter, w: torch.Tensor, shard: str | None) -> None:
        if shard not in ("gate", "up"):
            raise ValueError(f"gated MLP weight needs a gate/up shard, got {shard!r}")
        dst = param.data.narrow(0, 0 if shard == "gate" else self.local, self.local)
        _copy(dst, _rows(w, self.local, TP.rank), f"{shard}_proj")


class VocabEmbedding(nn.Module):
    """Embedding split by vocabulary rows; also serves as the (tied) LM head."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, bias: bool = False):
        super().__init__()
        self.vocab = vocab
        self.per_rank = -(-vocab // TP.size)  # ceil: the last rank's tail is padding
        self.start = TP.rank * self.per_rank
        self.weight = _param(self.per_rank, hidden, dtype=dtype)
        self.bias = _param(self.per_rank, dtype=dtype) if bias else None

    def weight_loader(self, param: nn.Parameter, w: torch.Tensor, shard: str | None) -> None:
        part = w[self.start:self.start + self.per_rank]
        param.data.zero_()
        _copy(param.data[: part.shape[0]], part, "embedding")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if TP.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * mine[:, None]
        return all_reduce(out)

    def logits(self, h: torch.Tensor | Normed) -> torch.Tensor:
        if isinstance(h, Normed):  # a folded final norm
            out = skinny_linear(h.h, self.weight, self.bias, norm=h.row_norm(self))
        else:
            out = linear(h, self.weight, self.bias)
        return all_gather_last_dim(out)[..., : self.vocab]


class Norm(nn.Module):
    """LayerNorm or RMSNorm parameters; the math runs in ``ops.add_norm``."""

    def __init__(self, hidden: int, rms: bool, eps: float, dtype: torch.dtype):
        super().__init__()
        self.rms, self.eps = rms, eps
        self.weight = _param(hidden, dtype=dtype)
        self.bias = None if rms else _param(hidden, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, w: torch.Tensor, shard: str | None) -> None:
        _copy(param.data, w, "norm")


class PositionEmbedding(nn.Module):
    """Learned absolute positions (GPT-2, OPT), replicated on every rank."""

    def __init__(self, positions: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.weight = _param(positions, hidden, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, w: torch.Tensor, shard: str | None) -> None:
        _copy(param.data, w, "position embedding")
