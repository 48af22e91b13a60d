"""The decode GEMM (M <= 16 rows): y = x W^T (+ b), bound by streaming the weight.

One kernel (``kernels/skinny_kernel.py``) serves fp16/bf16 weights (``skinny_linear``, the
engine's decode linears) and the integer weights of W8A16/W4A16 (``kernels/quant_gemm.py``,
storage described there). This file holds its launch parameters (tiles, K-splits, pipeline
depth per weight width) and the typed wrappers.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from . import pdl
from .activation import split_kind
from .counters import zeroed
from .band_exchange import BAND_REGION, MAX_BANDS, BandExchange
from .skinny_kernel import _skinny_exchange_kernel, _skinny_kernel


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: keep grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _smem(device: torch.device) -> int | None:
    """Shared memory a program may take on this GPU (None in the interpreter: no limit)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


SKINNY_M = 16  # up to this many rows (decode batches) take the weight-streaming kernel
SKINNY_PREFETCH = 1  # tiles per program pulled into L2 before waiting on the kernel before (PDL)
# A weight of at most this many bytes is pulled into L2 whole, each program prefetching its
# entire slice before its PDL wait, to use the HBM left idle by decode attention and norms.
# Off: every size tried made the step slower on the H100 (Llama-1B 1.152 ms at 0, 1.154 /
# 1.169 / 1.201 ms at 8 / 16 / 32 MB; 7B W8A16 3.26 -> 3.34 ms at 24 MB; 2026-11-23). Kept
# for ``benchmarks.pdl_ab --prefetch-whole-mb``.
SKINNY_PREFETCH_WHOLE_BYTES = 0
SKINNY_RELEASE: int | None = None  # overrides skinny_config's ``release`` (``benchmarks.pdl_ab --release``)
# A release this many steps before the end falls on every program's first step (``release_first``).
RELEASE_FIRST = 1 << 20


def skinny_config(N: int, K: int, group: int, sms: int, BN: int = 64, BK: int = 128, num_warps: int = 2,
                  num_stages: int = 3, waves: int = 4, U: int = 1, A_REGS: bool = True,
                  prefetch: int | None = None, min_tiles: int = 4, bits: int = 16, release: int = 2,
                  max_tiles: int | None = None, smem: int | None = None, BM: int = SKINNY_M,
                  pipeline_from: int | None = None, pipeline: tuple[int, int, int] = (3, 6, 25)) -> dict:
    """Launch parameters of the M <= 16 kernel: [BN, BK] tiles (BK capped by the group), and
    enough K-splits that about ``waves`` programs per SM stream at once (so every SM has
    loads in flight while the last ones finish), keeping at least ``min_tiles`` K-tiles per split.
    With ``max_tiles`` the split is instead the fewest that leaves no program more than
    ``max_tiles`` K-tiles, as long as the programs still fit in ``waves`` per SM (a split
    never starts a further wave). ``smem``: the device's shared memory per block, which caps
    the pipeline's stages. ``pipeline_from`` (one-row tiles only; see ROW_TILES): programs of
    at least that many tiles take ``pipeline`` = (loop stages, release, carveout percent).

    The defaults, mma.sync on 2 warps with the operands converted in registers and about
    4 programs per SM, were the fastest for W4A16 in a sweep on an H100 (2026-11-22, triton
    3.6, the 7B shapes, M = 1 and 16; ``python -m benchmarks.gemv --sweep``) and within 3%
    of the fastest for W8A16 (BN=32 on 1 warp). wgmma with the converted tile staged in
    shared memory (``num_warps=4, A_REGS=False``) was 10-30% slower: it is bound by
    shared-memory traffic. 8 programs per SM cost 3-10%.

    ``release``: under PDL, how many steps before the end of its stream a program releases
    the next kernel (0: after the stream). The gains once measured for releasing early (up to
    4% of the Llama-1B step) were taken while the split-K counters were broken (see _LOCKS).
    Measured again on the fixed code, bs=1 decode graph replay on an H100 (2026-11-23, ms,
    release 0 / 2 / 3 / 4 / 6, the earlier fp16 tiles): Llama-1B 1.153 / 1.154 / 1.152 / 1.149 /
    1.161, OPT-1.3B 1.415 / 1.436 / 1.427 / 1.421 / 1.414: no effect beyond noise.
    """
    if BM == 1 and group & (group - 1) == 0 and BK > group and K & -K >= 2 * group:
        BK = min(BK, K & -K)  # one-row tiles may span groups: a power of two dividing K
    else:
        BK = min(group & -group, BK)  # a power of two dividing the group, and so K (fp16: group = K)
    if BK < 16:
        raise ValueError(f"K={K} with groups of {group}: the kernel needs K tiles of at least 16")
    bands, tiles = triton.cdiv(N, BN), K // BK
    if max_tiles is None:
        split = max(1, min(triton.cdiv(waves * sms, bands), tiles // min_tiles, triton.cdiv(tiles, U)))
    else:
        split = max(1, min(waves * sms // bands, triton.cdiv(tiles, max_tiles), triton.cdiv(tiles, U)))
    if smem is not None:  # a stage holds a weight tile and an x tile (x as wide as a float weight, else fp16)
        stage = BN * BK * bits // 8 + BM * BK * max(2, bits // 8)
        num_stages = max(2, min(num_stages, (smem - 8192) // stage))
    if prefetch is None:
        whole = N * K * bits // 8 <= SKINNY_PREFETCH_WHOLE_BYTES
        # A power of two: the kernel prefetches [BN, lines] at once (past the slice's end, the
        # lines of the next split, which its own program prefetches too).
        prefetch = triton.next_power_of_2(triton.cdiv(tiles, split)) if whole else SKINNY_PREFETCH
    loop_stages, carveout = 0, None
    if BM == 1 and pipeline_from is not None and triton.cdiv(tiles, split) >= pipeline_from:
        loop_stages, release, carveout = pipeline
    if SKINNY_RELEASE is not None:
        release = SKINNY_RELEASE
    return dict(kind="skinny", BM=BM, BN=BN, BK=BK, U=U, A_REGS=A_REGS, SPLIT_K=split, num_warps=num_warps,
                num_stages=num_stages, PREFETCH=prefetch, RELEASE=release, LOOP_STAGES=loop_stages,
                CARVEOUT=carveout)


# Per device: one int32 arrival counter per n-band for the split-K kernel (kernels/counters.py).
# Kept per (device, stream) once, the capture stream got a buffer inside the graphs' pool, and a
# mixed prefill graph's replay overwrote it: the next decode step's bands were reduced by no
# program or the wrong one (garbage logits for bloom-560m shapes at bs=3, H100, 2026-11-23).
_LOCKS: dict[torch.device, torch.Tensor] = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    return zeroed(_LOCKS, device, n, 4096, "the split-K GEMV")


class RowNorm(NamedTuple):
    """A norm whose weight (and bias) were folded into the decode GEMV's weight (and bias), left
    for the GEMV to finish (``mii/model/fold.py``): x is the residual stream h, ``stats``
    [bands, 2, M] what the GEMV that wrote h left (``skinny_gemm``'s ``stats``), in bands of
    ``band`` columns; a layer norm also takes ``row_sums`` [N] fp32, each weight row's sum."""

    stats: torch.Tensor
    band: int
    eps: float
    rms: bool
    row_sums: torch.Tensor | None = None


def skinny_gemm(x2, w, scales, bias, y, bits, group, cfg, act: str | None = None,
                x_scale: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                stats: torch.Tensor | None = None, rms: bool = True, norm: RowNorm | None = None,
                release_first: bool = False, exchange: BandExchange | None = None) -> None:
    """Launch the kernel on 2-D x2 into y; ``bits`` 16 (float weight, ``scales`` unused), 8 or
    4; ``cfg`` from :func:`skinny_config`, minus "kind". ``act``: a ``kernels.activation``
    kind applied, with the bias, in the epilogue; y is [M, N / 2] for a gated kind, else [M, N].
    ``x_scale`` [M] fp32 (W8A8): x2 is int8, ``scales`` [N] one per weight row, bits 8.
    ``residual`` [M, N]: y = x W^T + b + residual, and ``stats`` [bands, 2, M] fp32 (bands =
    N / cfg's BN) receive its statistics for an RMS (``rms``) or layer norm. ``norm``: x2 is
    normalized by it, its weight already in w (see :class:`RowNorm`).

    ``release_first``: the next kernel is decode attention, which has its own loads to issue
    before its PDL wait (context length, block table, first K/V tile: a chain of three round
    trips). Released at each program's first step rather than ``cfg``'s few steps before the
    end, it has the whole weight stream to issue them. Bare replay of the decode graphs at a
    192-token context (H100, 2026-11-24, ms, bs=1 / bs=8): Llama-1B 1.054 -> 1.034 / 1.099 ->
    1.082, OPT-1.3B 1.273 -> 1.267 / 1.402 -> 1.380, 7B fp16 4.910 -> 4.825 / 5.306 -> 5.274,
    7B W4A16 2.534 -> 2.504 / 2.950 -> 2.911. Not for a pipelined one-row loop (``cfg``'s
    LOOP_STAGES, the 7B W8A16 qkv at bs=1), which keeps its own: there it was 0.2% slower.

    ``exchange`` (with ``residual``): the weight is a row-parallel slice, and x W^T this rank's
    partial sum. Each band's last program sums it over the ranks through peer memory before
    the bias and the residual (``kernels/band_exchange.py``), so every rank
    writes the same y and statistics, and the all-reduce and norm kernels that followed the
    GEMV are gone. A band's program waits there for its peers' same band: see
    :func:`exchange_fits` for why that cannot deadlock."""
    M, N, K = x2.shape[0], w.shape[0], x2.shape[1]
    if w.shape[1] * (2 if bits == 4 else 1) != K:
        raise ValueError(f"x has K={K} columns but the weight {tuple(w.shape)} takes "
                         f"{w.shape[1] * (2 if bits == 4 else 1)}")
    kind, gated = split_kind(act) if act is not None else ("", False)
    if gated and N % 2:
        raise ValueError(f"a gated activation needs [gate; up] weight rows, got an odd {N}")
    if M > cfg["BM"]:
        raise ValueError(f"the skinny kernel takes at most BM={cfg['BM']} rows, got M={M}")
    xq = x_scale is not None
    if xq and (bits != 8 or scales.dim() != 1):
        raise ValueError("int8 x takes an int8 weight with one scale per row")
    if residual is not None and (act is not None or stats is None or residual.shape != y.shape
                                 or residual.stride() != y.stride()):
        raise ValueError("a residual takes no activation, a stats buffer, and the output's shape and strides")
    if norm is not None and (xq or norm.stats.shape[2] != M or (not norm.rms and norm.row_sums is None)):
        raise ValueError(f"a folded norm needs float x, stats for its {M} rows, and row sums for a layer norm")
    if exchange is not None and residual is None:
        raise ValueError("a GEMV exchanges its bands only with a residual (a folded norm after it)")
    if K % cfg["BK"]:  # the loop covers K // BK whole tiles: a ragged K would lose its tail
        raise ValueError(f"K={K} is not a multiple of the tile's BK={cfg['BK']}")
    cfg = dict(cfg)
    if release_first and not cfg.get("LOOP_STAGES"):
        cfg["RELEASE"] = RELEASE_FIRST
    split = cfg.pop("SPLIT_K")
    carveout = cfg.pop("CARVEOUT", None)
    n_bands = triton.cdiv(N // 2, cfg["BN"] // 2) if gated else triton.cdiv(N, cfg["BN"])
    if residual is not None and tuple(stats.shape) != (n_bands, 2, M):
        raise ValueError(f"stats must be [{n_bands}, 2, {M}], got {tuple(stats.shape)}")
    if exchange is not None and not _exchange_fits(n_bands, cfg["BN"] * cfg["BM"], x2.device):
        raise ValueError(f"{n_bands} bands of {cfg['BN']}x{cfg['BM']} cannot exchange on {x2.device}")
    NP = n_bands * cfg["BN"]
    part = torch.empty((split, M, NP) if split > 1 else (1,), device=x2.device,
                       dtype=torch.int32 if xq else torch.float32)
    locks = _locks(x2.device, n_bands) if split > 1 else part
    stride_sn, stride_sg = (0, 0) if bits == 16 else (scales.stride(0), scales.stride(1) if scales.dim() == 2 else 0)
    nrm = norm if norm is not None else RowNorm(part, 1, 0.0, rms)
    st = stats if residual is not None else nrm.stats
    xc = {} if exchange is None else dict(XCHG=True, XRANK=exchange.rank, XW=exchange.world, XREGION=BAND_REGION)
    xb = (part, part) if exchange is None else exchange[:2]
    kernel = (_skinny_kernel if exchange is None else _skinny_exchange_kernel)[(n_bands, split)](
        x2, w, scales, bias if bias is not None else w, y, part, locks, x_scale if xq else scales, M, N, K, NP,
        x2.stride(0), w.stride(0), stride_sn, stride_sg, y.stride(0), split, residual if residual is not None else y,
        st, nrm.row_sums if nrm.row_sums is not None else part, nrm.stats.shape[0], nrm.band, nrm.eps, *xb, **xc,
        GROUP=group, BITS=bits, HAS_BIAS=bias is not None, ASM=x2.is_cuda, ACT=kind, GATED=gated, XQ=xq,
        RES=residual is not None, NORM=norm is not None, RMS=nrm.rms, NB=triton.next_power_of_2(nrm.stats.shape[0]),
        **pdl.launch_args(x2.device), **cfg)
    if carveout is not None:
        pdl.set_carveout(kernel, carveout)


# The fp16 weight's tiles: wgmma on 4 warps over [64, 256] tiles in a 4-stage pipeline (160 KB
# of shared memory, so one program per SM), and no more K-splits than one wave of programs
# holds, each streaming at most 8 tiles (256 KB). Split-K's reduction costs each GEMV about
# 1.5-2 us, so a band takes one program where that still streams fast enough. Against the
# earlier tiles ([64, 128], 3 stages, about 2 programs per SM), back to back in one CUDA graph
# on an H100 (2026-11-23, M = 1, us): Llama-1B qkv 7.11 -> 6.34, o 5.83 -> 5.45, gate_up
# 25.83 -> 24.02, down 15.39 -> 13.42; OPT-1.3B qkv 11.56 -> 10.07, fc1 13.50 -> 12.57, fc2
# 15.46 -> 13.41; 7B o 14.68 -> 13.40, down 34.99 -> 32.46 (qkv and gate_up within 0.3%).
FLOAT_TILES = dict(BK=256, num_warps=4, num_stages=4, waves=1, max_tiles=8, A_REGS=False, release=3)


# One row of x with int8 weights (W8A16 at bs=1): no MMA. Each program multiplies its
# dequantized [64, 128] tiles by the x row on the CUDA cores (8 warps, so 4 programs fit an
# SM), and K is split as far as one wave of those programs holds, no further: on an H100
# the 7B down_proj took 20.4 us at 8 splits (one wave) and 25.9 us at 9 (a second one).
# Back to back in one CUDA graph (2026-11-23, us, against the MMA tiles): o 12.0 -> 9.5,
# down 22.2 -> 20.2, qkv and gate_up within 2%. The 7B W8A16 bs=1 step (graph replay,
# alternating) 3.417, 3.416 -> 3.330, 3.328 ms. The MMA pads the one row to 16. The other
# weights stay on the MMA, where this path was slower: fp16 GEMVs by 30-60% (Llama-1B and
# 7B shapes), and the 7B bs=1 step 2.53 -> 3.41 ms for W4A16 and 3.18 -> 3.82 ms for W8A8.
#
# ``pipeline_from``: a program streaming that many tiles or more (the 7B qkv and gate_up)
# has Triton pipeline its loop through shared memory (``pipeline``: 3 stages), releases the
# next kernel 6 steps before its stream ends, and asks the driver for 25% of each SM as
# shared memory (``kernels.pdl.set_carveout``). The carveout is what makes the pipeline pay in
# the step. With the driver's own choice, a trace of the 7B W8A16 bs=1 graph (torch.profiler,
# H100, 2026-11-24) put the pipelined gate_up at 43.0 us a layer against 40.3 us unpipelined,
# though alone, back to back, it ran 35.9 against 39.2. At 25% it took 35.3 us in the step.
# 30-100% (a 100 KB split or more) was as slow as the default. The likely cause: 25% caps
# a pipelined program's SM at 3 of them (17 KB each), so programs launched early under PDL
# cannot pile onto the SMs that freed first; a larger L1 is the other candidate. The same
# 25% for every kernel slowed the unpipelined step (3.33 -> 3.51 ms) and decode attention.
# Graph replay, bs=1, alternating (ms): off 3.328 / 3.322, this 3.134 / 3.132; releasing 2
# or 10 steps early 3.174 / 3.135; pipelining down too (11 tiles) 3.275; no carveout 3.446.
ROW_TILES = dict(BM=1, BN=64, BK=128, num_warps=8, num_stages=3, waves=4, max_tiles=1, A_REGS=True,
                 pipeline_from=16)


def _exchange_fits(bands: int, band_elems: int, device: torch.device) -> bool:
    # A band's last program waits for its peers' same band. Every program that waits is a
    # band's last, and the others never wait, so with fewer bands than SMs every band's last
    # program is resident at some point on every rank (a program takes at most a whole SM;
    # the next kernel's programs launch only once all of this grid's are running). The
    # interpreter runs the programs one by one, in the same order on every rank.
    fits_sms = device.type != "cuda" or bands < _num_sms(device)
    return fits_sms and bands <= MAX_BANDS and band_elems <= BAND_REGION


def exchange_fits(n_out: int, device: torch.device) -> bool:
    """Whether a row-parallel fp16/bf16 decode GEMV of ``n_out`` outputs, on the weight-streaming
    tiles (``FLOAT_TILES``), can sum its bands over the ranks itself (``skinny_gemm``'s exchange)."""
    cfg = skinny_config(n_out, 256, 256, _num_sms(device), **FLOAT_TILES)
    return _exchange_fits(triton.cdiv(n_out, cfg["BN"]), cfg["BN"] * cfg["BM"], device)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: dict | None = None, act: str | None = None, residual: torch.Tensor | None = None,
                  rms: bool = True, norm: RowNorm | None = None, release_first: bool = False,
                  exchange: BandExchange | None = None):
    """y = x W^T + b for a float weight [N, K] and x [..., K] with at most 16 rows: the same
    weight-streaming kernel as W8A16 decode, so fp16 decode GEMMs join the PDL chain.
    ``act``: y = bias_act(x W^T, b, act) in the same kernel (N / 2 columns for a gated kind).
    ``residual``: returns (y + residual, its band statistics for an RMS (``rms``) or layer
    norm, their band width); ``norm``: x is normalized by it first (see :class:`RowNorm`).
    ``release_first``, ``exchange``: see :func:`skinny_gemm`."""
    K, N = x.shape[-1], weight.shape[0]
    if weight.shape[1] != K or weight.dtype != x.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not fit weight {tuple(weight.shape)} {weight.dtype}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        raise ValueError("weight rows must be contiguous")
    n_out = N // 2 if act is not None and split_kind(act)[1] else N
    y = torch.empty((x2.shape[0], n_out), device=x.device, dtype=x.dtype)
    cfg = dict(config or skinny_config(N, K, K, _num_sms(x.device), **FLOAT_TILES, bits=8 * weight.element_size(),
                                       smem=_smem(x.device)))
    cfg.pop("kind")
    stats = None if residual is None else residual_stats(y, cfg)
    if x2.shape[0]:
        skinny_gemm(x2, weight, weight, bias, y, 16, K, cfg, act, residual=_rows2(residual, N), stats=stats,
                    rms=rms, norm=norm, release_first=release_first, exchange=exchange)
    y = y.reshape(*x.shape[:-1], n_out)
    return y if residual is None else (y, stats, cfg["BN"])


def residual_stats(y: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The [bands, 2, M] float32 statistics buffer of a GEMV with a residual into y [M, N]."""
    return torch.empty((triton.cdiv(y.shape[-1], cfg["BN"]), 2, y.numel() // y.shape[-1]), device=y.device,
                       dtype=torch.float32)


def _rows2(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1, n).contiguous()
