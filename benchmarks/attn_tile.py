"""Decode attention's key tile in the engine's own decode graphs: the tile
``kernels.decode_attention.decode_tile`` picks against fixed tiles, per context length.

    python -m benchmarks.attn_tile --model llama-1b --tiles 64:4 256:8 --out DIR

One engine per model. For each variant the decode graphs of ``--batch`` (default bs=1 and 8)
are captured again with that tile forced (``default``: decode_tile's choice), and timed by a
bare replay (``ours.replay_ms``) at several contexts; the variants alternate over two rounds,
so a drift of the machine shows as a difference between rounds. Each row also gives the
largest difference of the first batch size's logits from the default's at the same context
(tiles change the order of the softmax sums, so rounding-level differences are expected). At
long contexts the other batches' replays write K/V into blocks that batch reads, so that
column drifts between rounds too: the default's own second-round value is the noise floor. Writes
``attn-tile-MODEL.json`` under --out.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from kernels import decode_attention as dec

from . import ours
from .models import build

_DECODE = dec._decode


def _force(tile: tuple[int, ...] | None) -> None:
    """Make every decode launch take ``tile`` (keys, warps[, context slices]); None: decode_tile's choice."""
    if tile is None:
        dec._decode = _DECODE
        return

    def forced(*args, **kw):
        kw.setdefault("block_n", tile[0])
        kw.setdefault("num_warps", tile[1])
        if len(tile) > 2:
            kw.setdefault("num_splits", tile[2])
        return _DECODE(*args, **kw)
    dec._decode = forced


@torch.inference_mode()
def _recapture(eng, sizes: tuple[int, ...]) -> None:
    graphs = eng.runner.graphs
    for b in sizes:
        fn = graphs._pass("decode", b)
        fn()  # compile the variant outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            graphs.outputs["decode", b] = fn()
        graphs.graphs["decode", b] = g
    torch.cuda.synchronize()


def run(name: str, root: Path, tiles: list[tuple[int, ...]], ctxs: list[int], sizes=(1, 8)) -> dict:
    path, model = build(name, root)
    del model
    torch.cuda.empty_cache()
    eng, _ = ours.make_engine(path)
    ours.decode(eng, 1, new_tokens=8)  # warm the engine path once
    out = {"model": name, "device": torch.cuda.get_device_name(), "rows": []}
    ref: dict[int, torch.Tensor] = {}
    try:
        for rnd in range(2):
            for tile in [None, *tiles]:
                _force(tile)
                _recapture(eng, sizes)
                row = {"round": rnd, "tile": "default" if tile is None else ":".join(map(str, tile))}
                for ctx in ctxs:
                    for b in sizes:
                        row[f"bs{b}_ctx{ctx}_ms"] = ours.replay_ms(eng, b, ctx)
                    logits = eng.runner.graphs.outputs["decode", sizes[0]][0].float()
                    ref.setdefault(ctx, logits.clone())
                    row[f"bs{sizes[0]}_ctx{ctx}_max_dlogit"] = (logits - ref[ctx]).abs().max().item()
                print(json.dumps(row), flush=True)
                out["rows"].append(row)
    finally:
        _force(None)
        eng.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--tiles", nargs="+", default=["64:4", "256:8"], help="keys:warps[:slices], each against the default")
    ap.add_argument("--ctx", type=int, nargs="+", default=[192, 1024, 4000],
                    help="contexts (within the model's positions: OPT's end at 2,048)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="decode graphs to time (the first is checked)")
    ap.add_argument("--out", type=Path, default=Path("out"))
    a = ap.parse_args()
    tiles = [tuple(int(x) for x in t.split(":")) for t in a.tiles]
    with tempfile.TemporaryDirectory() as tmp:
        res = run(a.model, Path(tmp), tiles, a.ctx, tuple(a.batch))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"attn-tile-{a.model}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
