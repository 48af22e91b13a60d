"""Where a folded norm's cost goes (mii/model/fold.py): a decode GEMV pair around one norm, in
a CUDA graph under PDL, at bs=1, four ways: A plain GEMV, norm kernel, plain GEMV (as now);
B the first GEMV adds the residual, then the norm kernel; C the second GEMV finishes the norm
(its weight holds the norm's; no norm kernel; the first plain); D both (the fold). Timing only:
the weights are random, not folded.

    python -m benchmarks.fold_chain --hidden 2048 --inter 8192
"""
from __future__ import annotations

import argparse

import torch

from kernels.norm import add_norm
from kernels.skinny_gemm import RowNorm, skinny_linear

from .timing import time_calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()
    H, I, L = args.hidden, args.inter, args.layers
    dt, dev = torch.float16, "cuda"
    o = [torch.randn(H, H, dtype=dt, device=dev) * 0.02 for _ in range(L)]
    up = [torch.randn(2 * I, H, dtype=dt, device=dev) * 0.02 for _ in range(L)]
    nw = torch.ones(H, dtype=dt, device=dev)
    x = torch.randn(1, H, dtype=dt, device=dev)
    res = torch.randn(1, H, dtype=dt, device=dev)
    _, stats, band = skinny_linear(x, o[0], residual=res)

    def a(wo, wu):
        y = skinny_linear(x, wo)
        h, _ = add_norm(y, res, nw, None, 1e-5, True)
        return skinny_linear(h, wu, act="silu_and_mul")

    def b(wo, wu):
        h, _, _ = skinny_linear(x, wo, residual=res)
        n, _ = add_norm(h, None, nw, None, 1e-5, True)
        return skinny_linear(n, wu, act="silu_and_mul")

    def c(wo, wu):
        h = skinny_linear(x, wo)
        return skinny_linear(h, wu, act="silu_and_mul", norm=RowNorm(stats, band, 1e-5, True))

    def d(wo, wu):
        h, st, bd = skinny_linear(x, wo, residual=res)
        return skinny_linear(h, wu, act="silu_and_mul", norm=RowNorm(st, bd, 1e-5, True))

    def up_only(wo, wu):
        return skinny_linear(x, wu, act="silu_and_mul")

    def up_norm(wo, wu):
        return skinny_linear(x, wu, act="silu_and_mul", norm=RowNorm(stats, band, 1e-5, True))

    pairs = list(zip(o, up))
    for name, fn in (("A plain + norm kernel", a), ("B residual in GEMV + norm kernel", b),
                     ("C norm in 2nd GEMV", c), ("D fold", d), ("up GEMV alone", up_only),
                     ("up GEMV finishing the norm", up_norm)):
        print(f"{name:36s} {1e6 * time_calls(fn, pairs):8.2f} us", flush=True)


if __name__ == "__main__":
    main()
