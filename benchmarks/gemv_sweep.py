"""``python -m benchmarks.gemv --sweep``: tile configs x K-splits of the M <= 16 (skinny) kernel per
linear shape, fp16 and W8A16/W4A16 weights (``sweep``) and W8A8 (``sweep_w8a8``), and the fastest
config of each (``fastest``)."""
from __future__ import annotations

import torch

from kernels.quant_gemm import wxa16_gemm
from kernels.skinny_gemm import skinny_config, skinny_linear
from kernels.w8a8_gemm import decode_bk, w8a8_gemm

from .linears import linear_shapes, quantized, weight_bytes
from .timing import copies_for, time_calls

# (BN, BK, num_warps, num_stages, U, A_REGS) tried by --sweep, for both bit widths: mma.sync
# with the weight tile converted straight into its operand registers (1-2 warps), and
# wgmma with the converted tile staged in shared memory (4 warps). See skinny_config for
# what won on the H100.
SWEEP = [(64, 128, 2, 3, 1, True), (64, 128, 2, 4, 1, True), (128, 128, 2, 3, 1, True),
         (32, 128, 1, 3, 1, True), (64, 128, 4, 3, 1, False), (64, 64, 2, 4, 1, True), (32, 128, 2, 4, 1, True),
         (64, 128, 4, 4, 1, False), (64, 256, 4, 3, 1, False), (32, 128, 1, 6, 1, True), (16, 128, 1, 6, 1, True)]


def sweep(group: int, dtype: torch.dtype, bw: float, ms: tuple[int, ...] = (1, 16),
          shapes: dict[str, tuple[int, int]] | None = None, bits_list: tuple[int, ...] = (16, 8, 4)) -> list[dict]:
    """Time tile configs x K-splits for the M <= 16 kernel; one row per (linear, bits, M, config)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, (N, K) in (shapes or linear_shapes()).items():
        for bits in bits_list:
            if bits == 16:
                ws = [(torch.randn(N, K, device="cuda", dtype=dtype), None)
                      for _ in range(copies_for(weight_bytes(N, K, bits, group)))]
            else:
                ws = [quantized(N, K, bits, group) for _ in range(copies_for(weight_bytes(N, K, bits, group)))]
            for M in ms:
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                for bn, bk, warps, stages, u, regs in SWEEP:
                    seen = set()
                    for waves, min_tiles in ((2, 4), (4, 4), (8, 4), (16, 4), (8, 2), (16, 2), (16, 1)):
                        cfg = skinny_config(N, K, K if bits == 16 else group, sms, bn, bk, warps, stages, waves, u,
                                            regs, min_tiles=min_tiles)
                        if cfg["SPLIT_K"] in seen:
                            continue
                        seen.add(cfg["SPLIT_K"])
                        if bits == 16:
                            t = time_calls(lambda x, w: skinny_linear(x, w, None, cfg), [(x, w) for w, _ in ws],
                                           min_calls=32, replays=5)
                        else:
                            t = time_calls(lambda x, q, s: wxa16_gemm(x, q, s, None, bits, cfg),
                                           [(x, q, s) for q, s in ws], min_calls=32, replays=5)
                        b = weight_bytes(N, K, bits, group)
                        rows.append({"linear": name, "bits": bits, "M": M, "waves": waves, **cfg,
                                     "us": t * 1e6, "pct_copy_bw": 100 * b / t / bw})
            del ws
            torch.cuda.empty_cache()
    return rows


# (BN, BK, num_warps, num_stages, U) for int8 x int8: mma.sync on 1-2 warps, wgmma on 4.
W8A8_SWEEP = [(64, 128, 2, 3, 1), (32, 128, 1, 4, 1), (128, 128, 2, 3, 1), (64, 128, 4, 3, 1), (64, 128, 4, 4, 1),
              (128, 128, 4, 3, 1)]


def sweep_w8a8(bw: float, ms: tuple[int, ...], shapes: dict[str, tuple[int, int]]) -> list[dict]:
    """Tile configs x K-splits of the M <= 16 kernel on int8 x and int8 weights (bits "8x8")."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, (N, K) in shapes.items():
        ws = [(torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda"), torch.rand(N, device="cuda"))
              for _ in range(copies_for(N * K))]
        for M in ms:
            x8, xs = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda"), torch.rand(M, device="cuda")
            for bn, bk, warps, stages, u in W8A8_SWEEP:
                seen = set()
                for waves, min_tiles in ((2, 4), (4, 4), (8, 4)):
                    cfg = skinny_config(N, K, decode_bk(K), sms, bn, bk, warps, stages, waves, u, False,
                                        min_tiles=min_tiles)
                    if cfg["SPLIT_K"] in seen:
                        continue
                    seen.add(cfg["SPLIT_K"])
                    t = time_calls(lambda q, s: w8a8_gemm(x8, xs, q, s, None, torch.float16, cfg), ws,
                                   min_calls=32, replays=5)
                    rows.append({"linear": name, "bits": "8x8", "M": M, "waves": waves, **cfg,
                                 "us": t * 1e6, "pct_copy_bw": 100 * (N * K + 4 * N) / t / bw})
        del ws
        torch.cuda.empty_cache()
    return rows


def fastest(rows: list[dict]) -> dict[tuple, dict]:
    """The quickest sweep row per (linear, bits, M)."""
    best = {}
    for r in rows:
        key = (r["linear"], r["bits"], r["M"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    return best
