"""How fast the bs=1 decode step could be if parts of its kernel chain cost nothing.

The step is timed as a bare CUDA-graph replay (192-token context, as ``benchmarks.pdl_ab``)
with the norms dropped (each add-norm kernel becomes "pass x on"; norms folded into the
GEMVs, fp16 on one rank, stay), with attention dropped (no rotary, KV write or decode
attention: q goes straight to the o projection), and with both. What remains in the last
case is the GEMVs with the embedding, the LM head and the step's input kernel. A further
variant, "attention launch", puts in attention's place a kernel that only copies q, under
PDL as attention is: the step pays attention's kernel boundary but none of its work. The
outputs are wrong; only the time means anything. It bounds what fusing the norms or
attention into the GEMVs could gain, and measures how far the GEMV chain alone is from the
roofline (step bytes over copy bandwidth).

    python -m benchmarks.chain_bound --model llama-1b --quantize fp16 --out DIR
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.pdl import enter
from mii.model import decoder

from . import ours
from .models import build, kv_bytes_per_step
from .ours import replay_ms
from .quant import weight_bytes_on_device
from .run import copy_bandwidth

DROPS = {"nothing": (), "norms": ("norms",), "attention": ("attention",), "norms+attention": ("norms", "attention"),
         "attention launch": ("attention launch",)}
CTX = 192


def _no_norm(x, residual, norm, ops, *consumers):
    return x, x  # shapes and dtypes as the real norm's; the values are not a norm's


@triton.jit
def _copy_rows(x_ptr, y_ptr, stride_x, N, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    enter(PDL)  # as decode attention: released by the qkv GEMV, waits for it
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + row * N + cols, tl.load(x_ptr + row * stride_x + cols, mask=cols < N), mask=cols < N)


def _q_of(self, x, launch: bool):
    q = self.qkv(x)[:, : self.heads * self.head_dim]
    if not launch:
        return q
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _copy_rows[(q.shape[0], triton.cdiv(q.shape[1], self.head_dim))](q, out, q.stride(0), q.shape[1],
                                                                     BLOCK=self.head_dim, **pdl.launch_args(q.device))
    return out


def _attention_replaced(launch: bool):
    def forward(self, x, ctx, ops, cos_sin, alibi, defer=False, residual=None):
        q = _q_of(self, x, launch)
        return self.o(q, defer=defer) if residual is None else self.o(q, residual=residual, rms=self.rms)
    return forward


@contextlib.contextmanager
def dropped(parts: tuple[str, ...]):
    """Patch the decoder so that the engine built inside captures graphs without ``parts``."""
    norm, attn = decoder.Block.__dict__["norm"], decoder.Attention.forward
    if "norms" in parts:
        decoder.Block.norm = staticmethod(_no_norm)
    if "attention" in parts or "attention launch" in parts:
        decoder.Attention.forward = _attention_replaced("attention launch" in parts)
    try:
        yield
    finally:
        decoder.Block.norm, decoder.Attention.forward = norm, attn


def run(name: str, root: Path, modes: list[str], repeats: int) -> dict:
    path, model = build(name, root)
    del model
    torch.cuda.empty_cache()
    bw = copy_bandwidth()
    out = {"model": name, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "context": CTX,
           "copy_bw_gb_s": bw / 1e9, "rows": []}
    for _ in range(repeats):  # alternate the variants, so that a drifting clock shows as spread
        for mode in modes:
            for drop, parts in DROPS.items():
                with dropped(parts):
                    eng, _ = ours.make_engine(path, quantize=None if mode == "fp16" else mode)
                step_bytes = weight_bytes_on_device(eng, streamed=True) + kv_bytes_per_step(eng.spec, CTX)
                row = {"mode": mode, "dropped": drop, "bs1_ms": replay_ms(eng, 1, CTX), "step_bytes": step_bytes,
                       "roofline_ms": 1e3 * step_bytes / bw}
                print(json.dumps(row), flush=True)
                out["rows"].append(row)
                eng.shutdown()
                del eng
                torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--quantize", nargs="+", default=["fp16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = run(args.model, Path(tmp), args.quantize, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bound-{args.model}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
