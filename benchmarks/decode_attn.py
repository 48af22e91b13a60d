"""Decode attention at bs=1 and 8: `python -m benchmarks.decode_attn --out DIR`.

Times ``kernels.decode_attention._decode`` (rotary, KV write and split-K attention in one
launch) as a decode step runs it: one new token per sequence over a paged cache whose block
table is as wide as the engine's graphs make it (4,096 tokens), at contexts of 192 (the
decode benchmark's mean), 1,024 and 4,096, for the 7B (32 heads of 128) and Llama-1B
(32 query heads over 8 KV heads of 64) shapes, over key tiles of 32 and 64. Each row gives
the time per call and the share of copy bandwidth its K/V reads reach. Writes
``decode-attn.json`` under --out (not benchmarks/results: benchmarks.report reads that).
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import triton

from kernels import decode_attention as dec

from .timing import copies_for, copy_bandwidth, time_calls

SHAPES = {"llama-7b": (32, 32, 128), "llama-1b": (32, 8, 64)}  # query heads, KV heads, head dim
BLOCK, WIDTH = 16, 4096  # cache block size and block-table width in tokens


def _inputs(batch: int, ctx: int, H: int, Hkv: int, D: int) -> list[tuple]:
    """Argument sets for one (batch, context) case. Their block tables point at disjoint
    cache blocks, enough sets that cycling through them reads K/V from memory, not L2."""
    dev, dt = "cuda", torch.float16
    need = batch * triton.cdiv(ctx, BLOCK)  # blocks one call reads
    kv_bytes = 2 * need * BLOCK * Hkv * D * 2
    sets = copies_for(kv_bytes)
    kc = torch.randn(sets * need + 1, BLOCK, Hkv, D, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    perm = torch.randperm(sets * need, device=dev, dtype=torch.int32)
    spare = sets * need  # table entries past the context point at one spare block
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, device=dev).float() / D)
    freqs = torch.outer(torch.arange(WIDTH, device=dev).float(), inv)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    ctx_lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
    positions = (ctx_lens - 1).long()
    out = []
    for i in range(sets):
        tables = torch.full((batch, WIDTH // BLOCK), spare, device=dev, dtype=torch.int32)
        tables[:, :need // batch] = perm[i * need:(i + 1) * need].view(batch, -1)
        slots = tables[:, (ctx - 1) // BLOCK].long() * BLOCK + (ctx - 1) % BLOCK
        qkv = torch.randn(batch, (H + 2 * Hkv) * D, device=dev, dtype=dt)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        o = torch.empty(batch, H, D, device=dev, dtype=dt)
        new_kv = (k.view(batch, Hkv, D), v.view(batch, Hkv, D), positions, cos_sin, D, False, slots)
        out.append((q.view(batch, H, D), kc, vc, tables, ctx_lens, o, new_kv))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    bw = copy_bandwidth()
    rows = []
    for name, (H, Hkv, D) in SHAPES.items():
        for batch in (1, 8):
            for ctx in (192, 1024, 4096):
                sets = _inputs(batch, ctx, H, Hkv, D)
                kv_bytes = 2 * batch * ctx * Hkv * D * 2
                for block_n in (32, 64):
                    def call(q, kc, vc, tables, ctx_lens, o, new_kv, block_n=block_n):
                        dec._decode(q, kc, vc, tables, None, ctx_lens, D ** -0.5, None, None, o,
                                    block_n=block_n, num_warps=4, new_kv=new_kv)
                    t = time_calls(call, sets, min_calls=64, replays=10)
                    rows.append({"shape": name, "batch": batch, "ctx": ctx, "block_n": block_n, "us": t * 1e6,
                                 "pct_copy_bw": 100 * kv_bytes / t / bw})
                    r = rows[-1]
                    print(f"{name:9} bs={batch:<2} ctx={ctx:<5} block_n={block_n:<3} {r['us']:6.1f} us "
                          f"{r['pct_copy_bw']:4.0f}% of copy bw")
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__, "copy_bw_gb_s": bw / 1e9}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode-attn.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
