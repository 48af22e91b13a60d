"""The sum over tensor-parallel ranks of a row-parallel decode GEMV's output, inside the GEMV.

Under TP, o_proj and down_proj each leave a partial sum that every rank needs whole before
the residual add and the next norm. Each band program of the GEMV (``kernels/skinny_kernel.py``,
XCHG) sums its own band of columns with the same band on the peers, in its epilogue, so no
all-reduce kernel runs and the norms can fold into the GEMVs as on one GPU (mii/model/fold.py).

The protocol carries the flag in the data, as NCCL's LL protocol does: every float32 value
goes to each peer as one 8-byte word, its bits beside the call's number. A word is written
whole, so a reader that sees this call's number in a word holds its value, and no fence and
no separate flag is needed. With a flag behind a system-scope release, as the all-reduce
kernels do (``kernels/allreduce.py``), the exchange took about 5 us of the 7B TP=2 step per
GEMV (2x H200, 2026-11-24: folded 2.474 ms against 2.455 unfolded, where the rank alone runs
2.133). Reader and writer poll and store plain words; calls alternate between two regions per
band (the parity), so a band's region is written again only two calls later, when every peer
has read it (as in allreduce.py), and the call numbers keep rising, so stale words never match.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_BANDS = 128  # output bands of a GEMV that exchanges in its epilogue
BAND_REGION = 128 * 16  # words of one band's partial: up to 128 columns of 16 rows


class BandExchange(NamedTuple):
    """Where a row-parallel decode GEMV's band programs exchange: every rank's band area (at
    this process's addresses, as ``PeerAllReduce`` maps them) and a call counter per band."""

    bufs: torch.Tensor  # [world] int64 addresses
    counters: torch.Tensor  # [MAX_BANDS] int32, the calls each band has made
    rank: int
    world: int

    @staticmethod
    def area_bytes(world: int) -> int:
        return MAX_BANDS * 2 * world * BAND_REGION * 8


@triton.jit
def band_sum(x, offs, mask, bufs, counters, band, REGION: tl.constexpr, RANK: tl.constexpr, W: tl.constexpr):
    """x [BN, BM] float32 (this rank's partial of ``band``, rows where ``mask``) summed over
    the W ranks in rank order, so every rank gets the same bits. ``offs`` [BN, BM]: each
    value's word in the band's region (< REGION)."""
    call = tl.load(counters + band)
    # The call's number as 32 bits (the int32 counter wraps after 2^31 calls, about a day of
    # 7B decode steps at TP=2; `& 1` and the unsigned compare stay right across the wrap).
    tag = (call + 1).to(tl.uint32, bitcast=True)
    base = (band * 2 + (call & 1)) * W  # regions of (band, parity), one per sending rank
    word = x.to(tl.uint32, bitcast=True).to(tl.uint64) | (tag.to(tl.uint64) << 32)
    for p in tl.static_range(W):
        if p != RANK:
            peer = tl.load(bufs + p).to(tl.pointer_type(tl.uint64))
            tl.store(peer + (base + RANK) * REGION + offs, word, mask=mask)
    mine = tl.load(bufs + RANK).to(tl.pointer_type(tl.uint64))
    acc = tl.zeros_like(x)
    for p in tl.static_range(W):  # rank order everywhere: the same sum on every rank
        if p == RANK:
            acc += x
        else:
            src = mine + (base + p) * REGION + offs
            got = tl.load(src, mask=mask, other=0, volatile=True)
            while tl.sum((((got >> 32).to(tl.uint32) != tag) & mask).to(tl.int32), axis=None) > 0:
                got = tl.load(src, mask=mask, other=0, volatile=True)
            acc += tl.where(mask, got.to(tl.uint32).to(tl.float32, bitcast=True), 0.0)
    tl.store(counters + band, call + 1)
    return acc
