"""How fast the bs=1 decode step could be if parts of its kernel chain cost nothing.

The step is timed as a bare CUDA-graph replay (192-token context, as ``benchmarks.pdl_ab``)
with the norms dropped (each block's two add-norms become "pass x on"), with attention
dropped (no rotary, KV write or decode attention: q goes straight to the o projection), and
with both. What remains in the last case is the GEMVs with the embedding, the LM head and
the step's input kernel. The outputs are wrong; only the time means anything. It bounds
what fusing the norms or attention into the GEMVs could gain, and measures how far the
GEMV chain alone is from the roofline (step bytes over copy bandwidth).

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

from mii.model import decoder

from . import ours
from .models import build, kv_bytes_per_step
from .ours import replay_ms
from .quant import weight_bytes_on_device
from .run import copy_bandwidth

DROPS = {"nothing": (), "norms": ("norms",), "attention": ("attention",), "norms+attention": ("norms", "attention")}
CTX = 192


def _no_norm(x, residual, norm, ops, *consumers):
    return x, x  # shapes and dtypes as the real norm's; the values are not a norm's


def _no_attention(self, x, ctx, ops, cos_sin, alibi, defer=False):
    qkv = self.qkv(x)
    return self.o(qkv[:, : self.heads * self.head_dim], defer=defer)


@contextlib.contextmanager
def dropped(parts: tuple[str, ...]):
    """Patch the decoder so that the engine built inside captures graphs without ``parts``."""
    norm, attn = decoder.Block.__dict__["norm"], decoder.Attention.forward
    if "norms" in parts:
        decoder.Block.norm = staticmethod(_no_norm)
    if "attention" in parts:
        decoder.Attention.forward = _no_attention
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
