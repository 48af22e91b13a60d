"""One-shot all-reduce over peer memory, for the small messages of decode steps.

NCCL's all-reduce of one token's hidden state (8 KB) took 14-21 us inside a CUDA graph on
2x H200, where the bytes cross NVLink in about a microsecond: the time is protocol, not
transfer. Here one kernel does it all, each program owning one chunk of the message:
1. it writes its chunk into every peer's buffer (its memory mapped here), into the region kept for
   (this program, this call's parity, this rank), and raises a flag in that peer's
   signal pad;
2. it waits for every peer's flag in its own pad (and lowers it), then sums the chunks,
   its own and the peers' now in its local buffer, in fp32 in rank order, so all ranks
   hold the same bits.
Only stores cross NVLink, and they are not waited on: one crossing per call, where
reading the peers' buffers took a round trip and a second barrier ("done reading") was
needed before a buffer could be written again. Here calls alternate between two regions
(the parity); a program writes a region again two calls later, by which time every peer
has read it: the peer raised its own flag for the call in between only after finishing
the calls before it (a stream runs its kernels in order). Each program keeps a call
counter in device memory that gives the parity, so graph replays work as eager calls do;
every rank makes the same calls, so the counters stay in step. Flags are raised and
lowered in turn, so they are clean between calls. The reference is ``torch.distributed.all_reduce``.

``PeerAllReduce.add_norm`` runs the same exchange one row per program and goes on, in
the same launch, with what follows a row-parallel linear in a decoder block: its bias,
the residual add and the next norm (one kernel where there were two, twice a layer).

The same memory also holds the band area of ``kernels/band_exchange.py``, where a row-parallel
decode GEMV sums its output bands over the ranks in its own epilogue (``bands``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from . import pdl
from .band_exchange import MAX_BANDS, BandExchange
from .norm import norm_params, norm_row, norm_warps
from .pdl import enter

MAX_PROGRAMS = 64
SLOT0 = 0  # the first flag of a signal pad (a pad is ours alone)


@triton.jit
def _raise(flag, ASM: tl.constexpr):
    """Set a peer's flag to 1 with release semantics at system scope, not waiting for it.
    One thread stores: a second store from another thread could land after the peer has
    lowered the flag, and leave it raised for a later call."""
    if ASM:
        tl.inline_asm_elementwise(
            "{ .reg .pred first; .reg .b32 t; mov.u32 t, %tid.x; setp.eq.u32 first, t, 0; mov.u32 $0, 1;\n"
            "@first st.release.sys.global.u32 [$1], $0; }", "=r,l", [flag], dtype=tl.int32, is_pure=False, pack=1)
    else:  # the interpreter runs no PTX
        tl.atomic_xchg(flag, 1, sem="release", scope="sys")


@triton.jit
def _share(x, offs, mask, bufs, pads, counters, pid, REGION, SLOT: tl.constexpr, RANK: tl.constexpr,
           W: tl.constexpr, ASM: tl.constexpr):
    """Steps 1-2 for program ``pid``'s values ``x`` at ``offs`` (< REGION elements) of its
    region, bar the sum: returns where rank p's values now lie in this rank's memory,
    ``mine + (base + p) * REGION + offs``, as (mine, base)."""
    ty = x.dtype
    call = tl.load(counters + pid)
    base = (pid * 2 + (call & 1)) * W  # regions and flags of (program, parity), one per sending rank (`& 1`:
    # right when the int32 counter wraps, after 2^31 calls; `% 2` then gave -1)
    for p in tl.static_range(W):
        if p != RANK:
            peer = tl.load(bufs + p).to(tl.pointer_type(ty))
            tl.store(peer + (base + RANK) * REGION + offs, x, mask=mask)
    tl.debug_barrier()  # every thread's stores come before the release below
    for p in tl.static_range(W):
        if p != RANK:
            _raise(tl.load(pads + p).to(tl.pointer_type(tl.int32)) + SLOT + base + RANK, ASM)
    own = tl.load(pads + RANK).to(tl.pointer_type(tl.int32)) + SLOT + base
    for p in tl.static_range(W):
        if p != RANK:
            got = tl.atomic_cas(own + p, 1, 0, sem="acquire", scope="sys")
            while got != 1:
                got = tl.atomic_cas(own + p, 1, 0, sem="acquire", scope="sys")
    tl.debug_barrier()  # and every thread's loads come after the acquire
    tl.store(counters + pid, call + 1)
    return tl.load(bufs + RANK).to(tl.pointer_type(ty)), base


@triton.jit
def _exchange(x, offs, mask, bufs, pads, counters, pid, REGION, SLOT: tl.constexpr, RANK: tl.constexpr,
              W: tl.constexpr, ASM: tl.constexpr):
    """Steps 1-2 for program ``pid``'s values ``x`` at ``offs`` (< REGION elements) of its
    region: their sum over the ranks in float32, added in rank order."""
    mine, base = _share(x, offs, mask, bufs, pads, counters, pid, REGION, SLOT, RANK, W, ASM)
    acc = tl.zeros_like(x).to(tl.float32)
    for p in tl.static_range(W):  # rank order everywhere: the same sum on every rank
        if p == RANK:
            acc += x.to(tl.float32)
        else:
            acc += tl.load(mine + (base + p) * REGION + offs, mask=mask, other=0.0, volatile=True).to(tl.float32)
    return acc


@triton.jit
def _gather_kernel(x_ptr, y_ptr, bufs, pads, counters, N, C, REGION, RANK: tl.constexpr, W: tl.constexpr,
                   BLOCK: tl.constexpr, SLOT: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = False):
    # x: [N / C, C] flattened, this rank's columns; y: [N / C, W * C], every rank's side by side.
    enter(PDL)  # see kernels/pdl.py
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    i = pid * BLOCK + cols
    mask = i < N
    x = tl.load(x_ptr + i, mask=mask, other=0.0)
    mine, base = _share(x, cols, mask, bufs, pads, counters, pid, REGION, SLOT, RANK, W, ASM)
    out = y_ptr + (i // C) * (W * C) + i % C
    for p in tl.static_range(W):
        if p == RANK:
            tl.store(out + p * C, x, mask=mask)
        else:
            tl.store(out + p * C, tl.load(mine + (base + p) * REGION + cols, mask=mask, volatile=True), mask=mask)


@triton.jit
def _one_shot_kernel(x_ptr, bufs, pads, counters, N, REGION, RANK: tl.constexpr, W: tl.constexpr,
                     BLOCK: tl.constexpr, SLOT: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = False):
    enter(PDL)  # see kernels/pdl.py
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = pid * BLOCK + cols < N
    x = tl.load(x_ptr + pid * BLOCK + cols, mask=mask, other=0.0)
    acc = _exchange(x, cols, mask, bufs, pads, counters, pid, REGION, SLOT, RANK, W, ASM)
    tl.store(x_ptr + pid * BLOCK + cols, acc.to(x.dtype), mask=mask)


@triton.jit
def _reduce_add_norm_kernel(x_ptr, lb_ptr, r_ptr, w_ptr, b_ptr, y_ptr, h_ptr, bufs, pads, counters, N, REGION,
                            eps, stride_x, stride_r, stride_y, stride_h, RANK: tl.constexpr, W: tl.constexpr,
                            BLOCK: tl.constexpr, SLOT: tl.constexpr, ASM: tl.constexpr, HAS_LBIAS: tl.constexpr,
                            HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
                            PDL: tl.constexpr = False):
    # One program per row: the all-reduce of a row-parallel linear's partial output, its
    # bias, the residual add and the norm, rounded at each step as the unfused chain
    # (all-reduce, ``y + bias``, ``kernels.norm.add_norm``) rounds them.
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w, b = norm_params(w_ptr, b_ptr, cols, mask, HAS_BIAS)
    enter(PDL)  # see kernels/pdl.py
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    h = _exchange(x, cols, mask, bufs, pads, counters, row, REGION, SLOT, RANK, W, ASM).to(x.dtype)
    if HAS_LBIAS:
        h = h + tl.load(lb_ptr + cols, mask=mask, other=0.0)
    if HAS_RES:
        h = h + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
    tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    y = norm_row(h, w, b, mask, N, eps, HAS_BIAS, RMS)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


# Every kernel that waits on its peers: they must run on every rank or on none
# (mii/engine/precompile.py skips them all while it records what to compile; the decode
# GEMV's exchanging variant, kernels/skinny_kernel.py, is one too).
EXCHANGE_KERNELS = (_one_shot_kernel, _gather_kernel, _reduce_add_norm_kernel)


class PeerAllReduce:
    """In-place sum over ``world`` ranks for contiguous tensors up to ``max_bytes``; larger
    ones (prefill) stay with NCCL, which is faster there. ``buffers``/``pads``: every rank's
    buffer of :meth:`buffer_bytes` and signal pad, at this process's addresses (peer
    memory over NVLink or PCIe P2P; :meth:`create` sets them up over CUDA IPC)."""

    def __init__(self, rank: int, world: int, buffers: list[int], pads: list[int], device: torch.device,
                 max_bytes: int = 512 * 1024):
        if not 2 <= world <= 8:
            raise ValueError(f"the one-shot all-reduce writes to every peer: world={world} must be 2..8")
        if not 0 <= rank < world or len(buffers) != world or len(pads) != world:
            raise ValueError(f"rank {rank} of {world} needs {world} buffers and pads, "
                             f"got {len(buffers)} and {len(pads)}")
        self.rank, self.world, self.max_bytes = rank, world, max_bytes
        self.region = self.region_bytes(max_bytes)
        self.bufs = torch.tensor(buffers, dtype=torch.int64, device=device)
        self.pads = torch.tensor(pads, dtype=torch.int64, device=device)
        self.counters = torch.zeros(MAX_PROGRAMS, dtype=torch.int32, device=device)  # calls per program
        self.asm = device.type == "cuda"
        area = MAX_PROGRAMS * 2 * world * self.region  # the bands' area follows the programs' regions
        self.bands = BandExchange(torch.tensor([b + area for b in buffers], dtype=torch.int64, device=device),
                                  torch.zeros(MAX_BANDS, dtype=torch.int32, device=device), rank, world)

    @staticmethod
    def region_bytes(max_bytes: int) -> int:
        """One program's share of a call (twice the even share: chunks are powers of two)."""
        return 2 * triton.cdiv(max_bytes, MAX_PROGRAMS)

    @classmethod
    def buffer_bytes(cls, world: int, max_bytes: int) -> int:
        return MAX_PROGRAMS * 2 * world * cls.region_bytes(max_bytes) + BandExchange.area_bytes(world)

    @staticmethod
    def pad_slots(world: int) -> int:
        return SLOT0 + MAX_PROGRAMS * 2 * world

    @classmethod
    def create(cls, group, device: torch.device, max_bytes: int = 512 * 1024) -> PeerAllReduce:
        """Over the GPUs of ``group`` (one host): each rank's buffer and signal pad in one
        allocation, mapped into the peers (kernels/peer_memory.py). Collective; raises on
        every rank if any rank cannot take part."""
        from .peer_memory import PeerMemory
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        nbytes = cls.buffer_bytes(world, max_bytes)
        mem = PeerMemory(nbytes + 4 * cls.pad_slots(world), group, device)
        self = cls(rank, world, mem.ptrs, [p + nbytes for p in mem.ptrs], device, max_bytes)
        self._keep = mem  # the peers write into this memory for as long as we live
        dist.barrier(group)
        return self

    @staticmethod
    def _block(n: int) -> int:
        return max(1024, triton.next_power_of_2(triton.cdiv(n, MAX_PROGRAMS)))

    def fits(self, x: torch.Tensor) -> bool:
        return (x.is_contiguous() and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
                and x.numel() * x.element_size() <= self.max_bytes
                and self._block(x.numel()) * x.element_size() <= self.region)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        block = self._block(n)
        _one_shot_kernel[(triton.cdiv(n, block),)](x, self.bufs, self.pads, self.counters, n,
                                                   self.region // x.element_size(), RANK=self.rank,
                                                   W=self.world, BLOCK=block, SLOT=SLOT0, ASM=self.asm,
                                                   num_warps=4 if block <= 2048 else 8, **pdl.launch_args(x.device))
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x [..., C] side by side along the last dimension, [..., W * C], as
        ``torch.distributed.all_gather`` then ``torch.cat`` (the vocab-parallel LM head's
        logits); for x that :meth:`fits`."""
        n = x.numel()
        y = torch.empty(*x.shape[:-1], self.world * x.shape[-1], dtype=x.dtype, device=x.device)
        if n == 0:
            return y
        block = self._block(n)
        _gather_kernel[(triton.cdiv(n, block),)](x, y, self.bufs, self.pads, self.counters, n, x.shape[-1],
                                                 self.region // x.element_size(), RANK=self.rank, W=self.world,
                                                 BLOCK=block, SLOT=SLOT0, ASM=self.asm,
                                                 num_warps=4 if block <= 2048 else 8, **pdl.launch_args(x.device))
        return y

    def fits_rows(self, x: torch.Tensor) -> bool:
        """Whether :meth:`add_norm` takes x: one program per row, each with its own region."""
        return (x.dim() == 2 and x.stride(-1) == 1 and x.shape[0] <= MAX_PROGRAMS
                and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
                and x.shape[1] * x.element_size() <= self.region)

    def add_norm(self, x: torch.Tensor, linear_bias: torch.Tensor | None, residual: torch.Tensor | None,
                 weight: torch.Tensor, bias: torch.Tensor | None, eps: float, rms: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``kernels.norm.add_norm(all_reduce(x) + linear_bias, residual, ...)`` in one launch,
        for the partial output x [T, N] of a row-parallel linear; x itself is left as it was.
        Returns (normed, hidden) as ``add_norm`` does."""
        T, N = x.shape
        y = torch.empty_like(x)
        h = torch.empty_like(x)
        if T == 0:
            return y, h
        r = x if residual is None else residual
        block = triton.next_power_of_2(N)
        _reduce_add_norm_kernel[(T,)](
            x, x if linear_bias is None else linear_bias, r, weight, weight if bias is None else bias, y, h,
            self.bufs, self.pads, self.counters, N, self.region // x.element_size(), eps,
            x.stride(0), r.stride(0), y.stride(0), h.stride(0), RANK=self.rank, W=self.world, BLOCK=block,
            SLOT=SLOT0, ASM=self.asm, HAS_LBIAS=linear_bias is not None, HAS_RES=residual is not None,
            HAS_BIAS=bias is not None, RMS=rms, num_warps=norm_warps(block), **pdl.launch_args(x.device))
        return y, h
