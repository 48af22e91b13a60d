"""Tensor-parallel state of this process and its two collectives.

With one rank (the default) every collective is a no-op, so the model code carries
no special case. Multi-rank setup (process launch, group init) lives with the
engine's TP runner; the layers only ask ``rank``/``size`` here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(slots=True)
class TPState:
    rank: int = 0
    size: int = 1
    group: object | None = None      # the collectives on the model's tensors (NCCL on CUDA)
    cpu_group: object | None = None  # gloo: step inputs from rank 0's host to the others'
    peer_all_reduce: object | None = None  # kernels.allreduce.PeerAllReduce for small messages


TP = TPState()


def set_tensor_parallel(rank: int, size: int, group=None, cpu_group=None, peer_all_reduce=None) -> None:
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is outside world size {size}")
    TP.rank, TP.size, TP.group, TP.cpu_group = rank, size, group, cpu_group
    TP.peer_all_reduce = peer_all_reduce


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """In place. Small messages (decode) take the one-shot peer-memory kernel where it was
    set up; the choice depends on shape and dtype only, so every rank makes the same one."""
    if TP.size > 1:
        if TP.peer_all_reduce is not None and TP.peer_all_reduce.fits(x):
            return TP.peer_all_reduce(x)
        dist.all_reduce(x, group=TP.group)
    return x


@dataclass(slots=True)
class Partial:
    """A row-parallel linear's output before its all-reduce and bias. A decoder block hands it
    to the norm that follows, which sums it over the ranks in the same kernel where it can
    (``kernels.allreduce.PeerAllReduce.add_norm``)."""

    x: torch.Tensor
    bias: torch.Tensor | None

    def reduced(self) -> torch.Tensor:
        y = all_reduce(self.x)
        return y if self.bias is None else y + self.bias  # bias once, after the sum

    def rows(self, index: torch.Tensor) -> Partial:
        return Partial(self.x[index], self.bias)


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x side by side along the last dimension (a vocab-parallel LM head's
    logits); decode sizes take the peer-memory kernel, as ``all_reduce`` does."""
    if TP.size == 1:
        return x
    if TP.peer_all_reduce is not None and x.is_contiguous() and TP.peer_all_reduce.fits(x):
        return TP.peer_all_reduce.all_gather_last_dim(x)
    parts = [torch.empty_like(x) for _ in range(TP.size)]
    dist.all_gather(parts, x.contiguous(), group=TP.group)
    return torch.cat(parts, dim=-1)


def split(n: int, what: str) -> int:
    """n divided evenly over the ranks, or a ValueError naming what does not divide."""
    if n % TP.size:
        raise ValueError(f"{what}={n} is not divisible by tensor_parallel={TP.size}")
    return n // TP.size
