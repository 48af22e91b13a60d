"""Weight-only quantized GEMM (W8A16, W4A16): y = x W^T (+ b) with W held as integers.

Storage (see ``mii/model/quant.py``): ``qweight`` [N, K] int8, or [N, K/2] uint8 with two
INT4 values per byte (element 2j in the low nibble, 2j+1 in the high one, each stored
as q + 8); ``scales`` [N, K/group] float32, symmetric, so W[n, k] = q[n, k] * scales[n, k // group].

The integers never become a float weight in memory: each tile is dequantized in
registers (exactly: int8/int4 values are exact in fp16/bf16, see the exponent trick
below), its partial product over one scale group taken on the raw integers by the
tensor cores, and scaled once in fp32. Two kernels share that storage:
- ``_skinny_kernel`` for M <= 16 (decode): bound by streaming the weight, so it is built
  around that. Each program streams a band of weight rows along K in 16-byte loads,
  pipelined into shared memory; the MMA takes the weight tile as its wide operand and the
  few x rows (padded to 16) as the narrow one; split-K fills the GPU when N alone cannot,
  and the last program of each band reduces the partials in the same launch.
- ``_gemm_kernel`` for M > 16 (prefill): plain ``tl.dot`` tiles.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] int8 in -8..7 (low nibble first)."""
    p = packed.to(torch.int16)
    return torch.stack(((p & 15) - 8, (p >> 4) - 8), dim=-1).flatten(-2).to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in -8..7 -> [N, K/2] uint8 (low nibble first); K must be even."""
    u = (q.to(torch.int16) + 8).reshape(*q.shape[:-1], q.shape[-1] // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).to(torch.uint8)


def dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 weight [N, K] that (qweight, scales) stand for."""
    q = qweight if bits == 8 else unpack_int4(qweight)
    group = q.shape[1] // scales.shape[1]
    return q.float() * scales.float().repeat_interleave(group, dim=1)


DEQUANT_MIN_M = 1024  # rows from which wxa16_gemm dequantizes and calls cuBLAS


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in ``dtype`` (one rounding of q * scale), group by group."""
    q = qweight if bits == 8 else unpack_int4(qweight)
    N, K = q.shape
    G = scales.shape[1]
    return (q.view(N, G, K // G).to(dtype) * scales.to(dtype)[:, :, None]).view(N, K)


def wxa16_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    """x [..., K] @ dequant(W)^T + bias, in float32, rounded once to x's dtype."""
    y = x.float() @ dequantize_ref(qweight, scales, bits).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def w8a16_gemm_ref(x, qweight, scales, bias=None):
    return wxa16_gemm_ref(x, qweight, scales, bias, 8)


def w4a16_gemm_ref(x, qweight, scales, bias=None):
    return wxa16_gemm_ref(x, qweight, scales, bias, 4)


@triton.jit
def _exact(v, zero: tl.constexpr, dtype: tl.constexpr):
    """Integers ``v`` in 0..255 (int8 stored as q + 128, int4 as q + 8) -> ``v - zero`` in
    ``dtype``, exactly (the interpreter's path and the fallback for fp32)."""
    return (v.to(tl.int32) - zero).to(dtype)


# Dequantization in registers, four weights per 32-bit register. A plain int -> float
# convert runs on the conversion unit (16 per clock per SM on Hopper), too slow for weights
# streamed at full bandwidth, and compiled per element it costs about five instructions a
# weight. These stay on the integer and FMA pipes: a byte placed under a float exponent
# is that float plus the byte (fp16 0x64uu = 1024 + u, bf16 0x43uu = 128 + u for u < 128,
# fp32 0x4B0000uu = 2^23 + u), and one subtraction leaves q exactly.
# ``A_REGS`` (``is_pure``) lets Triton move the conversion after the load of the MMA operand
# from shared memory, so the tile goes straight into the operand registers: right for
# mma.sync (1-2 warps), which loads 8 bytes a thread. wgmma (4 warps) takes its register
# operand two bytes at a time, so there ``A_REGS=False`` converts a whole row-major tile
# and stages it in shared memory for the MMA.
_I8_F16: tl.constexpr = tl.constexpr("""{
.reg .b32 t, c;
mov.b32 c, 0x64806480;
xor.b32 t, $2, 0x80808080;
prmt.b32 $0, t, 0x64646464, 0x4140;
prmt.b32 $1, t, 0x64646464, 0x4342;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
}""")
_I8_BF16: tl.constexpr = tl.constexpr("""{
.reg .b32 t, c, f0, f1, f2, f3;
mov.b32 c, 0x4B000080;
xor.b32 t, $2, 0x80808080;
prmt.b32 f0, t, 0x4B000000, 0x7440;
prmt.b32 f1, t, 0x4B000000, 0x7441;
prmt.b32 f2, t, 0x4B000000, 0x7442;
prmt.b32 f3, t, 0x4B000000, 0x7443;
sub.f32 f0, f0, c;
sub.f32 f1, f1, c;
sub.f32 f2, f2, c;
sub.f32 f3, f3, c;
prmt.b32 $0, f0, f1, 0x7632;
prmt.b32 $1, f2, f3, 0x7632;
}""")
# int4: bytes b0..b3 -> [b0, 0, b1, 0] and [b2, 0, b3, 0]; low nibbles masked under the
# exponent give elements (0, 1) and (2, 3) of the low tensor, shifted by 4 the high one.
_U4 = """{
.reg .b32 a, b, c;
mov.b32 c, ZERO;
prmt.b32 a, $4, 0, 0x5150;
prmt.b32 b, $4, 0, 0x5352;
lop3.b32 $0, a, 0x000f000f, MAGIC, 0xea;
lop3.b32 $1, b, 0x000f000f, MAGIC, 0xea;
shr.b32 a, a, 4;
shr.b32 b, b, 4;
lop3.b32 $2, a, 0x000f000f, MAGIC, 0xea;
lop3.b32 $3, b, 0x000f000f, MAGIC, 0xea;
SUB $0, $0, c;
SUB $1, $1, c;
SUB $2, $2, c;
SUB $3, $3, c;
}"""
_U4_F16: tl.constexpr = tl.constexpr(_U4.replace("ZERO", "0x64086408").replace("MAGIC", "0x64006400")
                                     .replace("SUB", "sub.f16x2"))
_U4_BF16: tl.constexpr = tl.constexpr(_U4.replace("ZERO", "0x43084308").replace("MAGIC", "0x43004300")
                                      .replace("SUB", "sub.rn.bf16x2"))


@triton.jit
def _dequant8(q, dtype: tl.constexpr, ASM: tl.constexpr, A_REGS: tl.constexpr):
    """int8 tile -> ``dtype``, exactly; ``ASM`` (on the GPU, fp16/bf16) in registers as above."""
    if ASM and dtype == tl.float16:
        return tl.inline_asm_elementwise(_I8_F16, "=r,=r,r", [q], dtype=tl.float16, is_pure=A_REGS, pack=4)
    elif ASM and dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(_I8_BF16, "=r,=r,r", [q], dtype=tl.bfloat16, is_pure=A_REGS, pack=4)
    else:
        return _exact(q.to(tl.uint8, bitcast=True) ^ 128, 128, dtype)


@triton.jit
def _dequant4(p, dtype: tl.constexpr, ASM: tl.constexpr, A_REGS: tl.constexpr):
    """uint8 tile of int4 pairs (q + 8 in each nibble) -> (low, high) nibbles in ``dtype``, exactly."""
    if ASM and dtype == tl.float16:
        return tl.inline_asm_elementwise(_U4_F16, "=r,=r,=r,=r,r", [p], dtype=(tl.float16, tl.float16),
                                         is_pure=A_REGS, pack=4)
    elif ASM and dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(_U4_BF16, "=r,=r,=r,=r,r", [p], dtype=(tl.bfloat16, tl.bfloat16),
                                         is_pure=A_REGS, pack=4)
    else:
        return _exact(p & 15, 8, dtype), _exact(p >> 4, 8, dtype)


@triton.jit
def _prefetch_l2(ptrs):
    """Start moving the lines at ``ptrs`` into L2 (nothing waits on it)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\nmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def tile_ids(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row-blocks share each weight column-block
    while it is in L2. Shared with ``kernels/w8a8_gemm.py``."""
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


# M, SPLIT_K and the scale stride stay runtime values: one compiled kernel per tile config
# serves every decode batch size, split and layer (down_proj's K/128 = 86 is no multiple of 16).
@triton.jit(do_not_specialize=["M", "stride_sn", "SPLIT_K"])
def _skinny_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, lock_ptr, M, N, K,
                   stride_xm, stride_wn, stride_sn, stride_ym, SPLIT_K,
                   GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, U: tl.constexpr, A_REGS: tl.constexpr):
    # Program (pid_n, pid_k) streams weight rows [pid_n*BN, +BN) over its share of K in
    # steps of U [BN, BK] tiles side by side along K (U > 1 reads longer runs of each row at
    # once; on the H100 it measured no faster than U = 1, the default). Loads are 16 bytes
    # wide and pipelined into shared memory. Each tile is the MMA's A operand and x^T its B:
    # the weight fills the wide side of the MMA, the M <= BM = 16 rows of x the narrow one,
    # so the result is y^T [BN, BM].
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = (pid_n * BN + tl.arange(0, BN)) % N  # wrapped rows keep the weight loads unmasked
    rm = tl.arange(0, BM)
    KB: tl.constexpr = BK if BITS == 8 else BK // 2  # bytes of one weight row per tile
    tiles = K // BK  # BK divides the group, the group divides K
    steps = tl.cdiv(tiles, U)
    i0 = pid_k * steps // SPLIT_K  # splits differ by at most one step
    i1 = (pid_k + 1) * steps // SPLIT_K
    w_ptrs = w_ptr + rn[:, None] * stride_wn + tl.arange(0, KB)[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + tl.arange(0, BK)[None, :]
    s_ptrs = s_ptr + rn * stride_sn
    dt: tl.constexpr = x_ptr.dtype.element_ty
    acc = tl.zeros((BN, BM), tl.float32)
    for i in range(i0, i1):
        if ASM:  # scales two steps ahead into L2, as only the MMA operands are pipelined (a hint)
            _prefetch_l2(s_ptrs + tl.minimum((i + 2) * U, tiles - 1) * BK // GROUP)
        for j in tl.static_range(U):
            t = i * U + j
            ok = (tl.zeros((1, 1), tl.int32) + t) < tiles  # a short last step: its missing tiles load as zeros
            s = tl.load(s_ptrs + tl.minimum(t, tiles - 1) * BK // GROUP)
            q = tl.load(w_ptrs + t * KB, mask=ok, other=0)
            x = tl.load(x_ptrs + t * BK, mask=(rm[:, None] < M) & ok, other=0.0)
            if BITS == 8:
                part = tl.dot(_dequant8(q, dt, ASM, A_REGS), tl.trans(x))
            else:  # element 2j of a row is the low nibble of byte j: pair it with x's even columns
                lo, hi = _dequant4(q.to(tl.uint8, bitcast=True), dt, ASM, A_REGS)
                xe, xo = tl.split(tl.reshape(x, (BM, KB, 2)))
                part = tl.dot(lo, tl.trans(xe)) + tl.dot(hi, tl.trans(xo))
            acc += part * s[:, None]
    on = pid_n * BN + tl.arange(0, BN)
    mask = (on[:, None] < N) & (rm[None, :] < M)
    y_ptrs = y_ptr + rm[None, :] * stride_ym + on[:, None]
    if SPLIT_K > 1:
        # Split-K in one launch: each program leaves its fp32 partial, and the last of an
        # n-band's SPLIT_K programs to arrive (counted by an atomic) sums them in a fixed
        # order, so the result is deterministic and no zeroing or reduction kernel runs.
        p_ptrs = part_ptr + rm[None, :] * N + on[:, None]
        tl.store(p_ptrs + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the count is released
        if tl.atomic_add(lock_ptr + pid_n, 1) == SPLIT_K - 1:  # acq_rel: the others' partials are visible
            acc = tl.zeros((BN, BM), tl.float32)
            for i in range(SPLIT_K):
                acc += tl.load(p_ptrs + i * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn).to(tl.float32)[:, None]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next launch
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn).to(tl.float32)[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                 GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = (pid_m * BM + tl.arange(0, BM)) % M
    rn = (pid_n * BN + tl.arange(0, BN)) % N
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):  # BK divides the group, the group divides K
        if BITS == 8:
            rk = tl.arange(0, BK)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + rk[None, :])
            q = tl.load(w_ptr + rn[None, :] * stride_wn + k0 + rk[:, None])  # [BK, BN]
            part = tl.dot(x, _dequant8(q, x.dtype, ASM, False))
        else:
            rk = tl.arange(0, BK // 2)
            xe = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + 2 * rk[None, :])
            xo = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + 2 * rk[None, :] + 1)
            p = tl.load(w_ptr + rn[None, :] * stride_wn + k0 // 2 + rk[:, None]).to(tl.uint8, bitcast=True)
            lo, hi = _dequant4(p, xe.dtype, ASM, False)
            part = tl.dot(xe, lo) + tl.dot(xo, hi)
        s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP)
        acc += part * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    om = pid_m * BM + tl.arange(0, BM)
    on = pid_n * BN + tl.arange(0, BN)
    ptr = y_ptr + om[:, None] * stride_ym + on[None, :]
    tl.store(ptr, acc.to(y_ptr.dtype.element_ty), mask=(om[:, None] < M) & (on[None, :] < N))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: keep grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


SKINNY_M = 16  # up to this many rows (decode batches) take the weight-streaming kernel


def skinny_config(N: int, K: int, group: int, sms: int, BN: int = 64, BK: int = 128, num_warps: int = 2,
                  num_stages: int = 3, waves: int = 4, U: int = 1, A_REGS: bool = True) -> dict:
    """Launch parameters of the M <= 16 kernel: [BN, BK] tiles (BK capped by the group), and
    enough K-splits that about ``waves`` programs per SM stream at once (so every SM has
    loads in flight while the last ones finish), keeping at least 4 K-tiles per split.

    The defaults, mma.sync on 2 warps with the operands converted in registers and about
    4 programs per SM, were the fastest for W4A16 in a sweep on an H100 (2026-11-22, triton
    3.6, the 7B shapes, M = 1 and 16; ``python -m benchmarks.gemv --sweep``) and within 3%
    of the fastest for W8A16 (BN=32 on 1 warp). wgmma with the converted tile staged in
    shared memory (``num_warps=4, A_REGS=False``) was 10-30% slower: it is bound by
    shared-memory traffic. 8 programs per SM cost 3-10%.
    """
    BK = min(group, BK)
    bands, tiles = triton.cdiv(N, BN), K // BK
    split = max(1, min(triton.cdiv(waves * sms, bands), tiles // 4, triton.cdiv(tiles, U)))
    return dict(kind="skinny", BM=SKINNY_M, BN=BN, BK=BK, U=U, A_REGS=A_REGS, SPLIT_K=split, num_warps=num_warps,
                num_stages=num_stages)


def default_config(M: int, N: int, K: int, group: int, bits: int, device: torch.device) -> dict:
    """Launch parameters by shape: the weight-streaming kernel for M <= 16, GEMM tiles above."""
    if M <= SKINNY_M:
        return skinny_config(N, K, group, _num_sms(device))
    bm = 64 if M <= 64 else 128
    return dict(kind="gemm", BM=bm, BN=128, BK=min(group, 64), GROUP_M=8, num_warps=4 if bm == 64 else 8,
                num_stages=4)


# Per (device, stream): one int32 arrival counter per n-band for the split-K kernel. Every
# launch leaves them at zero again, and kernels on one stream never overlap.
_LOCKS: dict[tuple, torch.Tensor] = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    key = (device.index, torch.cuda.current_stream(device).stream_id) if device.type == "cuda" else (device.type,)
    locks = _LOCKS.get(key)
    if locks is None or locks.numel() < n:
        locks = _LOCKS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return locks


def wxa16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
               bits: int, config: dict | None = None) -> torch.Tensor:
    """Triton y = x @ dequant(W)^T + bias for x [..., K] in fp16/bf16 (fp32 works, as tf32 on GPU).

    ``bits`` is 8 or 4; ``config`` overrides :func:`default_config` (benchmarks sweep it).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    K = x.shape[-1]
    N = qweight.shape[0]
    if qweight.shape[1] * (8 // bits) != K:
        raise ValueError(f"x has K={K} but qweight {tuple(qweight.shape)} holds {qweight.shape[1] * (8 // bits)}")
    group = K // scales.shape[1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M >= DEQUANT_MIN_M and config is None and x.is_cuda and x.dtype != torch.float32:
        # Prefill: the fused kernel ran a 4,096-token 7B prefill at 0.43x fp16 (H100,
        # 2026-11-22). Dequantizing the weight once for the step and calling cuBLAS costs
        # one extra pass over the weight, small against M rows of matmul.
        w = dequantize(qweight, scales, bits, x.dtype)
        return torch.nn.functional.linear(x2, w, bias).reshape(*x.shape[:-1], N)
    cfg = dict(config or default_config(M, N, K, group, bits, x.device))
    kind = cfg.pop("kind")
    if group % cfg["BK"]:
        raise ValueError(f"block K={cfg['BK']} must divide group size {group}")
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    b = bias if bias is not None else scales  # dummy pointer, never read
    common = dict(GROUP=group, BITS=bits, HAS_BIAS=bias is not None, ASM=x.is_cuda)
    if M == 0:
        pass
    elif kind == "skinny":
        if M > cfg["BM"]:
            raise ValueError(f"the skinny kernel takes at most BM={cfg['BM']} rows, got M={M}")
        split = cfg.pop("SPLIT_K")
        n_bands = triton.cdiv(N, cfg["BN"])
        part = torch.empty((split, M, N) if split > 1 else (1,), device=x.device, dtype=torch.float32)
        locks = _locks(x.device, n_bands) if split > 1 else part
        _skinny_kernel[(n_bands, split)](x2, qweight, scales, b, y, part, locks, M, N, K, x2.stride(0),
                                         qweight.stride(0), scales.stride(0), N, split, **common, **cfg)
    else:
        grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
        _gemm_kernel[grid](x2, qweight, scales, b, y, M, N, K, x2.stride(0), qweight.stride(0),
                           scales.stride(0), N, **common, **cfg)
    return y.reshape(*x.shape[:-1], N)


def w8a16_gemm(x, qweight, scales, bias=None, config=None):
    return wxa16_gemm(x, qweight, scales, bias, 8, config)


def w4a16_gemm(x, qweight, scales, bias=None, config=None):
    return wxa16_gemm(x, qweight, scales, bias, 4, config)
