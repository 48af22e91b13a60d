"""Integer weights to fp16/bf16 in registers, exactly, for the weight-only GEMM kernels
(``kernels/quant_gemm.py`` for prefill tiles, ``kernels/skinny_gemm.py`` for decode)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _exact(v, zero: tl.constexpr, dtype: tl.constexpr):
    """Integers ``v`` in 0..255 (int8 stored as q + 128, int4 as q + 8) -> ``v - zero`` in
    ``dtype``, exactly (the interpreter's path)."""
    return (v.to(tl.int32) - zero).to(dtype)


# Dequantization in registers, four weights per 32-bit register. A plain int -> float
# convert runs on the conversion unit (16 per clock per SM on Hopper), too slow for weights
# streamed at full bandwidth, and compiled per element it costs about five instructions a
# weight. These stay on the integer and FMA pipes: a byte placed under a float exponent
# is that float plus the byte (fp16 0x64uu = 1024 + u, bf16 0x43uu = 128 + u for u < 128,
# fp32 0x4B0000uu = 2^23 + u), and one subtraction leaves q exactly. fp32 serves the
# one-row decode path, which multiplies on the CUDA cores (kernels/skinny_kernel.py).
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
# int8 -> four fp32 (the bytes of SRC into F0..F3), shared by the fp32 and bf16 conversions.
_I8_TO_F32 = """
.reg .b32 t, c;
mov.b32 c, 0x4B000080;
xor.b32 t, SRC, 0x80808080;
prmt.b32 F0, t, 0x4B000000, 0x7440;
prmt.b32 F1, t, 0x4B000000, 0x7441;
prmt.b32 F2, t, 0x4B000000, 0x7442;
prmt.b32 F3, t, 0x4B000000, 0x7443;
sub.f32 F0, F0, c;
sub.f32 F1, F1, c;
sub.f32 F2, F2, c;
sub.f32 F3, F3, c;
"""


def _i8_to_f32(src: str, f: tuple[str, str, str, str]) -> str:
    out = _I8_TO_F32.replace("SRC", src)
    for i, reg in enumerate(f):
        out = out.replace(f"F{i}", reg)
    return out


_I8_F32: tl.constexpr = tl.constexpr("{" + _i8_to_f32("$4", ("$0", "$1", "$2", "$3")) + "}")
_I8_BF16: tl.constexpr = tl.constexpr("{\n.reg .b32 f0, f1, f2, f3;" + _i8_to_f32("$2", ("f0", "f1", "f2", "f3"))
                                      + "prmt.b32 $0, f0, f1, 0x7632;\nprmt.b32 $1, f2, f3, 0x7632;\n}")
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
def dequant8(q, dtype: tl.constexpr, ASM: tl.constexpr, A_REGS: tl.constexpr):
    """int8 tile -> ``dtype``, exactly; ``ASM`` (on the GPU, fp16/bf16/fp32) in registers as above."""
    if ASM and dtype == tl.float32:
        return tl.inline_asm_elementwise(_I8_F32, "=r,=r,=r,=r,r", [q], dtype=tl.float32, is_pure=A_REGS, pack=4)
    elif ASM and dtype == tl.float16:
        return tl.inline_asm_elementwise(_I8_F16, "=r,=r,r", [q], dtype=tl.float16, is_pure=A_REGS, pack=4)
    elif ASM and dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(_I8_BF16, "=r,=r,r", [q], dtype=tl.bfloat16, is_pure=A_REGS, pack=4)
    else:
        return _exact(q.to(tl.uint8, bitcast=True) ^ 128, 128, dtype)


@triton.jit
def dequant4(p, dtype: tl.constexpr, ASM: tl.constexpr, A_REGS: tl.constexpr):
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
def prefetch_l2(ptrs):
    """Start moving the lines at ``ptrs`` into L2 (nothing waits on it)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\nmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
