"""One-shot all-reduce over peer memory, for the small messages of decode steps.

NCCL's all-reduce of one token's hidden state (8 KB) took 14-21 us inside a CUDA graph on
2x H200, where the bytes cross NVLink in about a microsecond: the time is protocol, not
transfer. Here one kernel does it all. Each program owns one chunk:
1. it copies its chunk of x into this rank's symmetric-memory buffer;
2. it tells every peer "chunk written" and waits for theirs (flags in the signal pads);
3. it reads the chunk from every rank's buffer over NVLink and sums them in fp32, in
   rank order on every rank, so all ranks hold the same bits, and writes it back into x;
4. it tells every peer "done reading" and waits for theirs, so the next call may
   overwrite the buffers.
Flags are set 0 -> 1 by the sender and reset 1 -> 0 by the receiver (compare-and-swap at
system scope), so they are clean after every call, with no epoch counter to keep in
step: graph replays work as eager calls do. The reference is ``torch.distributed.all_reduce``.

``PeerAllReduce.add_norm`` runs the same exchange one row per program and goes on, in
the same launch, with what follows a row-parallel linear in a decoder block: its bias,
the residual add and the next norm (one kernel where there were two, twice a layer).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from . import pdl
from .norm import norm_row, norm_warps
from .pdl import enter

MAX_PROGRAMS = 64
SLOT0 = 1024  # our flags start past the signal-pad slots torch's own symm-mem ops use


@triton.jit
def _signal_and_wait(pads, slot, RANK: tl.constexpr, W: tl.constexpr):
    """Raise our flag in every peer's pad, then wait for (and lower) every peer's in ours."""
    tl.debug_barrier()  # every thread's stores come before the release below
    for p in tl.static_range(W):
        if p != RANK:
            flag = tl.load(pads + p).to(tl.pointer_type(tl.int32)) + slot + RANK
            old = tl.atomic_cas(flag, 0, 1, sem="release", scope="sys")
            while old != 0:  # the peer has not yet taken our previous signal
                old = tl.atomic_cas(flag, 0, 1, sem="release", scope="sys")
    own = tl.load(pads + RANK).to(tl.pointer_type(tl.int32)) + slot
    for p in tl.static_range(W):
        if p != RANK:
            got = tl.atomic_cas(own + p, 1, 0, sem="acquire", scope="sys")
            while got != 1:
                got = tl.atomic_cas(own + p, 1, 0, sem="acquire", scope="sys")
    tl.debug_barrier()  # and every thread's loads come after the acquire


@triton.jit
def _exchange(x, offs, mask, bufs, pads, slot, RANK: tl.constexpr, W: tl.constexpr):
    """Steps 1-4 for one program's values ``x`` at ``offs`` of the message: their sum over
    the ranks in float32, added in rank order."""
    ty = x.dtype
    tl.store(tl.load(bufs + RANK).to(tl.pointer_type(ty)) + offs, x, mask=mask)
    _signal_and_wait(pads, slot, RANK, W)
    acc = tl.zeros_like(x).to(tl.float32)
    for p in tl.static_range(W):  # rank order everywhere: the same sum on every rank
        if p == RANK:
            acc += x.to(tl.float32)
        else:
            peer = tl.load(bufs + p).to(tl.pointer_type(ty))
            acc += tl.load(peer + offs, mask=mask, other=0.0, volatile=True).to(tl.float32)
    _signal_and_wait(pads, slot + W, RANK, W)  # peers are done reading our buffer
    return acc


@triton.jit
def _one_shot_kernel(x_ptr, bufs, pads, N, RANK: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr,
                     SLOT: tl.constexpr, PDL: tl.constexpr = False):
    enter(PDL)  # see kernels/pdl.py
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    acc = _exchange(x, offs, mask, bufs, pads, SLOT + pid * 2 * W, RANK, W)
    tl.store(x_ptr + offs, acc.to(x.dtype), mask=mask)


@triton.jit
def _reduce_add_norm_kernel(x_ptr, lb_ptr, r_ptr, w_ptr, b_ptr, y_ptr, h_ptr, bufs, pads, N, eps,
                            stride_x, stride_r, stride_y, stride_h, RANK: tl.constexpr, W: tl.constexpr,
                            BLOCK: tl.constexpr, SLOT: tl.constexpr, HAS_LBIAS: tl.constexpr,
                            HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
                            PDL: tl.constexpr = False):
    # One program per row: the all-reduce of a row-parallel linear's partial output, its
    # bias, the residual add and the norm, rounded at each step as the unfused chain
    # (all-reduce, ``y + bias``, ``kernels.norm.add_norm``) rounds them.
    enter(PDL)  # see kernels/pdl.py
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    h = _exchange(x, row * N + cols, mask, bufs, pads, SLOT + row * 2 * W, RANK, W).to(x.dtype)
    if HAS_LBIAS:
        h = h + tl.load(lb_ptr + cols, mask=mask, other=0.0)
    if HAS_RES:
        h = h + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
    tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    y = norm_row(h, w_ptr, b_ptr, cols, mask, N, eps, HAS_BIAS, RMS)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


class PeerAllReduce:
    """In-place sum over the ranks of ``group`` for contiguous tensors up to ``max_bytes``;
    larger ones (prefill) stay with NCCL, which is faster there. Every rank of the group
    must be a GPU of this host that can reach the others' memory (NVLink or PCIe P2P)."""

    def __init__(self, group, device: torch.device, max_bytes: int = 512 * 1024):
        import torch.distributed._symmetric_memory as symm_mem
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if self.world > 8:
            raise ValueError(f"the one-shot all-reduce reads every peer; {self.world} ranks is too many (<= 8)")
        pad_slots = symm_mem.get_signal_pad_size() // 4
        if SLOT0 + 2 * self.world * MAX_PROGRAMS > pad_slots:
            raise ValueError(f"signal pad of {pad_slots} slots is too small for {self.world} ranks")
        self.max_bytes = max_bytes
        buf = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(buf, group)
        self._keep = (buf, handle)  # the peers map this memory for as long as we live
        self.bufs = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.pads = torch.tensor(handle.signal_pad_ptrs, dtype=torch.int64, device=device)
        dist.barrier(group)

    def fits(self, x: torch.Tensor) -> bool:
        return (x.is_contiguous() and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
                and x.numel() * x.element_size() <= self.max_bytes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        block = max(1024, triton.next_power_of_2(triton.cdiv(n, MAX_PROGRAMS)))
        _one_shot_kernel[(triton.cdiv(n, block),)](x, self.bufs, self.pads, n, RANK=self.rank, W=self.world,
                                                   BLOCK=block, SLOT=SLOT0, num_warps=4 if block <= 2048 else 8,
                                                   **pdl.launch_args(x.device))
        return x

    def fits_rows(self, x: torch.Tensor) -> bool:
        """Whether :meth:`add_norm` takes x: one program per row, each with its own flags."""
        return (x.dim() == 2 and x.stride(-1) == 1 and x.shape[0] <= MAX_PROGRAMS and x.shape[-1] <= 16384
                and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
                and x.numel() * x.element_size() <= self.max_bytes)

    def add_norm(self, x: torch.Tensor, linear_bias: torch.Tensor | None, residual: torch.Tensor | None,
                 weight: torch.Tensor, bias: torch.Tensor | None, eps: float, rms: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``kernels.norm.add_norm(all_reduce(x) + linear_bias, residual, ...)`` in one launch,
        for the partial output x [T, N] of a row-parallel linear; x itself is left as it was.
        Returns (normed, hidden) as ``add_norm`` does."""
        T, N = x.shape
        y = torch.empty_like(x)
        h = torch.empty_like(x)
        r = x if residual is None else residual
        block = triton.next_power_of_2(N)
        if T == 0:
            return y, h
        _reduce_add_norm_kernel[(T,)](
            x, x if linear_bias is None else linear_bias, r, weight, weight if bias is None else bias, y, h,
            self.bufs, self.pads, N, eps, x.stride(0), r.stride(0), y.stride(0), h.stride(0),
            RANK=self.rank, W=self.world, BLOCK=block, SLOT=SLOT0, HAS_LBIAS=linear_bias is not None,
            HAS_RES=residual is not None, HAS_BIAS=bias is not None, RMS=rms, num_warps=norm_warps(block),
            **pdl.launch_args(x.device))
        return y, h
