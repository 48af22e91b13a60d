"""Setup shared by the quantization kernel tests (test_quant_wxa16.py, test_skinny_gemm.py,
test_quant_w8a8.py, test_quant_linear.py) and test_norm_fold.py. Imported first, it switches
on Triton's interpreter when there is no CUDA; then the device, the dtypes to test, a relative
error, random quantized weights and forced kernel configs."""
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton or kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.quant_gemm import pack_int4  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float16, torch.float32)  # the interpreter's tl.dot is wrong on bf16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_qweight(n: int, k: int, bits: int, group: int, group_major: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(-127, 128, (n, k)) if bits == 8 else torch.randint(-8, 8, (n, k))
    qweight = q.to(torch.int8) if bits == 8 else pack_int4(q)
    scales = torch.rand(n, k // group) * 0.02 + 0.002
    if group_major:  # QuantLinear's layout: [n, groups] with each group's scales contiguous
        scales = scales.t().contiguous().t()
    return qweight.to(DEV), scales.to(DEV)


# Forced configs so split-K (even and uneven splits of the K-tiles) and several tile shapes
# run in the interpreter too.
CONFIGS = {
    "skinny_split3": dict(kind="skinny", BM=16, BN=16, BK=32, U=1, A_REGS=False, SPLIT_K=3, num_warps=4, num_stages=1),
    "skinny_split7": dict(kind="skinny", BM=16, BN=64, BK=32, U=1, A_REGS=True, SPLIT_K=7, num_warps=4, num_stages=1),
    "skinny_steps": dict(kind="skinny", BM=16, BN=32, BK=32, U=3, A_REGS=False, SPLIT_K=2, num_warps=4, num_stages=1),
    "gemm_tiles": dict(kind="gemm", BM=16, BN=32, BK=32, GROUP_M=2, num_warps=4, num_stages=1),
}
