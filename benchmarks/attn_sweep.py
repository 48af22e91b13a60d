"""Prefill attention tiles against torch SDPA: `python -m benchmarks.attn_sweep --out DIR`.

Times ``kernels.attention._prefill`` (the paged flash-attention kernel) on a 7B head shape
(32 heads of 128) for the two chunks of a 4,096-token prompt as the engine runs them
(max_num_batched_tokens 2048: queries 0-2047 over 2,048 keys, then 2048-4095 over 4,096),
over a grid of tiles, warps and stages, next to causal SDPA on contiguous K/V (a lower
bound our paged kernel can aim at). Writes ``attn-sweep.json`` under --out.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

from kernels.attention import _prefill

H, D, BLOCK = 32, 128, 16


def _case(q_len: int, ctx: int, dev):
    nblk = ctx // BLOCK
    kc = torch.randn(nblk, BLOCK, H, D, device=dev, dtype=torch.float16)
    vc = torch.randn_like(kc)
    bt = torch.randperm(nblk, device=dev, dtype=torch.int32)[None]  # scattered blocks, as in serving
    q = torch.randn(q_len, H, D, device=dev, dtype=torch.float16)
    cu = torch.tensor([0, q_len], device=dev, dtype=torch.int32)
    cl = torch.tensor([ctx], device=dev, dtype=torch.int32)
    return q, kc, vc, bt, cu, cl


def _sdpa_ms(q_len: int, ctx: int, dev) -> float:
    q = torch.randn(1, H, q_len, D, device=dev, dtype=torch.float16)
    k = torch.randn(1, H, ctx, D, device=dev, dtype=torch.float16)
    v = torch.randn_like(k)
    # bottom-right causal: query i sees keys up to ctx - q_len + i
    mask = torch.ones(q_len, ctx, device=dev, dtype=torch.bool).tril(ctx - q_len)
    if q_len == ctx:
        return triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    return triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for q_len, ctx in ((2048, 2048), (2048, 4096)):
        q, kc, vc, bt, cu, cl = _case(q_len, ctx, dev)
        out = torch.empty_like(q)
        ref = torch.empty_like(q)
        _prefill(q, kc, vc, bt, cu, cl, D ** -0.5, None, None, ref)
        base = triton.testing.do_bench(lambda: _prefill(q, kc, vc, bt, cu, cl, D ** -0.5, None, None, out))
        sdpa = _sdpa_ms(q_len, ctx, dev)
        print(f"q={q_len} ctx={ctx}: default {base * 1e3:.0f} us, sdpa {sdpa * 1e3:.0f} us", flush=True)
        best = (base, "default")
        for bm, bn, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
            kw = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
            try:
                _prefill(q, kc, vc, bt, cu, cl, D ** -0.5, None, None, out, **kw)
                if (out.float() - ref.float()).abs().max().item() > 2e-2:
                    print("MISMATCH", kw, flush=True)
                    continue
                t = triton.testing.do_bench(lambda: _prefill(q, kc, vc, bt, cu, cl, D ** -0.5, None, None, out, **kw))
            except Exception as e:  # out of shared memory or registers for this tile
                print("skip", kw, type(e).__name__, flush=True)
                continue
            rows.append({"q_len": q_len, "ctx": ctx, **kw, "us": t * 1e3, "sdpa_us": sdpa * 1e3,
                         "default_us": base * 1e3})
            if t < best[0]:
                best = (t, kw)
        print(f"BEST q={q_len} ctx={ctx}: {best[0] * 1e3:.0f} us {best[1]}", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attn-sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
