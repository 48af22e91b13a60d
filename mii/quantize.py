"""Offline quantization and its quality report.

    mii quantize MODEL OUT --mode w8a16 [--group-size 128] [--calibrate/--no-calibrate] [--eval]
    python -m mii.quantize MODEL OUT --mode w4a16 --eval

``quantize_checkpoint`` loads the fp model as the engine does (streamed into its
shards), quantizes the policy's linears and writes ``OUT``: one safetensors file,
config.json with a ``mii_quantization`` section, and the tokenizer.

Offline quantization can afford to look at data. By default it calibrates on
``mii/data/calib_text.txt`` (never the eval text): W8A8 applies SmoothQuant
(``mii.model.smooth``) before rounding, W4A16 quantizes with GPTQ (``mii.model.gptq``);
W8A16 rounds to nearest, as its error is already small, unless ``calibrate=True``
(then GPTQ). The ``method`` in config.json says which ("smoothquant", "gptq", "rtn").
Either way the checkpoint holds the same integers-plus-scales format, so it loads and
tensor-slices like any other. On-the-fly ``quantize=`` at load always rounds to nearest.

The quantized
layers' tensors are saved under their engine names (``layers.0.attn.qkv.qweight``),
already fused; every other tensor is copied unchanged under its original name.
``mii.pipeline(OUT)`` then builds those layers empty and loads the integers straight
into them: no fp copy of a quantized weight is ever made.

``evaluate_perplexity`` scores a model on ``mii/data/eval_text.txt`` (English prose
written for this repository), so ``--eval`` can report what quantization costs.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from importlib import resources
from pathlib import Path

import torch

from mii.model.calibrate import CALIB_TEXT, CALIB_TOKENS
from mii.model.quant import DEFAULT_GROUP_SIZE, MODES, check_quant_args
from mii.model.quant_linear import QuantLinear
from mii.model.quant_swap import QUANT_CONFIG_KEY
from mii.model.smooth import DEFAULT_ALPHA

EVAL_TEXT = "eval_text.txt"
CALIBRATED_BY_DEFAULT = ("w8a8", "w4a16")  # w8a16 loses <0.5% to round-to-nearest already


def eval_text() -> str:
    """The shipped evaluation text (a few thousand tokens of plain English prose)."""
    return (resources.files("mii") / "data" / EVAL_TEXT).read_text(encoding="utf-8")


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


def quantize_checkpoint(model: str | Path | None, out_dir: str | Path, mode: str = "w8a16",
                        group_size: int = DEFAULT_GROUP_SIZE, show_progress: bool = True,
                        calibrate: bool | None = None, calib_tokens: int = CALIB_TOKENS) -> Path:
    """Write a quantized copy of ``model`` (HF directory, .gguf, hub id, None = default) to ``out_dir``.

    ``group_size`` is the requested size; layers it does not divide fall back as described in
    ``mii.model.quant``. ``calibrate``: None = the mode's default (True for w8a8 and w4a16),
    on ``calib_tokens`` tokens of the shipped calibration text. ``out_dir`` must not exist
    yet or be empty. Returns ``out_dir``.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from mii.model.loader import WeightRouter, checkpoint_files, iter_tensors, load_model
    from mii.model.quant_swap import saved_quantization
    from mii.model.source import resolve_model_path
    from mii.policies import policy_for
    from mii.policies.base import resolve

    check_quant_args(mode, group_size)
    src = Path(resolve_model_path(None if model is None else str(model), show_progress=show_progress))
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output directory {str(out)!r} exists and is not empty")
    hf_config = AutoConfig.from_pretrained(src)
    if saved_quantization(hf_config) is not None:
        raise ValueError(f"{str(src)!r} is already quantized; quantize the fp checkpoint instead")
    _, policy = policy_for(hf_config)
    spec = resolve(policy, hf_config)

    if calibrate is None:
        calibrate = mode in CALIBRATED_BY_DEFAULT
    # fp32 weights, so the scales come from the checkpoint's own precision, then quantize in place.
    fp = load_model(str(src), spec, torch.float32, torch.device("cpu"), show_progress)
    tokenizer = AutoTokenizer.from_pretrained(src)
    qmodel, how, changed = _quantize(fp, tokenizer, mode, group_size,
                                     policy.quantizable, calibrate, calib_tokens, show_progress)
    tensors: dict[str, torch.Tensor] = {}
    quantized = set()
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLinear):
            quantized.add(name)
            tensors.update({f"{name}.{p}": t for p, t in m.state_dict().items()})  # row-major, as stored on disk
    router = WeightRouter(policy)
    rewritten = set()
    for name, t in iter_tensors(checkpoint_files(str(src))):
        routed = router.route(name)
        if routed is None or routed[0] in quantized:
            continue
        target, pname, _ = routed
        if target in changed:  # a norm that SmoothQuant rescaled: its new value, kept in fp32
            t = getattr(qmodel.get_submodule(target), pname).detach().float()
            rewritten.add(target)
        tensors[name] = t.contiguous().clone()  # clone: .bin checkpoints may share storage (tied heads)
    if changed - quantized - rewritten:
        raise RuntimeError(f"calibration changed {sorted(changed - quantized - rewritten)[:4]}, "
                           f"which the checkpoint would not hold")

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config[QUANT_CONFIG_KEY] = {"mode": mode, "group_size": group_size, "modules": list(policy.quantizable), **how}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(out)
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", out)
    if show_progress:
        before, after = _dir_size(src), _dir_size(out)
        print(f"Wrote {mode} ({how['method']}) checkpoint to {out}: {after / 2**20:.1f} MiB "
              f"({after / before:.2f}x of {before / 2**20:.1f} MiB)", flush=True)
    return out


def _quantize(model, tokenizer, mode: str, group_size: int, quantizable: tuple[str, ...], calibrate: bool,
              calib_tokens: int, show_progress: bool) -> tuple[torch.nn.Module, dict, set[str]]:
    """(quantized model, how: its config.json entries, names of the fp modules calibration changed)."""
    from mii.model.calibrate import Calibrator, calibration_ids
    from mii.model.gptq import gptq_model
    from mii.model.quant_swap import quantize_model
    from mii.model.smooth import activation_max, smooth_model

    if not calibrate:
        return quantize_model(model, mode, group_size, quantizable, show_progress), {"method": "rtn"}, set()
    cal = Calibrator(model, calibration_ids(tokenizer, max_tokens=calib_tokens))
    data = {"text": CALIB_TEXT, "tokens": cal.num_tokens}
    if mode == "w8a8":  # per-token int8 activations: even out their channels first
        act_max = activation_max(model, cal, quantizable, show_progress)
        changed = smooth_model(model, act_max, DEFAULT_ALPHA, quantizable)
        how = {"method": "smoothquant", "calibration": {**data, "alpha": DEFAULT_ALPHA}}
        return quantize_model(model, mode, group_size, quantizable, show_progress), how, changed
    how = {"method": "gptq", "calibration": data}
    return gptq_model(model, cal, mode, group_size, quantizable, show_progress), how, set()


@torch.inference_mode()
def evaluate_perplexity(model_path: str | Path | None, quantize: str | None = None, text: str | None = None, *,
                        group_size: int = DEFAULT_GROUP_SIZE, max_tokens: int | None = None,
                        window: int = 1024, stride: int = 512, device: str | None = None,
                        dtype: str = "fp32") -> float:
    """Perplexity of ``model_path`` (quantized on the fly when ``quantize`` is set) on ``text``
    (default: the shipped eval text), truncated to ``max_tokens`` tokens.

    Texts longer than ``window`` are scored in windows that advance by ``stride``: each
    token is scored once, with at least ``window - stride`` tokens of context after the first window.
    """
    from mii.config import EngineConfig
    from mii.engine.engine import LLMEngine
    from mii.model.decoder import BatchContext

    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    eng = LLMEngine(EngineConfig(model=None if model_path is None else str(model_path), quantize=quantize,
                                 quant_group_size=group_size, device=device, dtype=dtype, show_progress=False))
    runner = eng.runner
    ids = eng.tokenizer.encode(eval_text() if text is None else text)[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} tokens; perplexity needs at least 2")
    window = min(window, eng.max_model_len)
    stride = min(stride, window)
    dev = runner.device
    nll, scored, begin = 0.0, 1, 0  # the first token has no prediction
    while scored < len(ids):
        end = min(begin + window, len(ids))
        L = end - begin
        chunk = torch.tensor(ids[begin:end], device=dev)
        pos = torch.arange(L, device=dev)
        # One sequence whose KV blocks are 0, 1, 2, ...: a token's cache slot is its position.
        ctx = BatchContext(positions=pos, slot_mapping=pos,
                           block_tables=torch.arange(-(-L // runner.block_size), device=dev, dtype=torch.int32)[None],
                           cu_seqlens_q=torch.tensor([0, L], device=dev, dtype=torch.int32),
                           context_lens=torch.tensor([L], device=dev, dtype=torch.int32),
                           logits_indices=torch.arange(scored - 1 - begin, L - 1, device=dev))
        logits = runner.model(chunk, ctx, runner.ops)
        nll += torch.nn.functional.cross_entropy(logits, chunk[scored - begin:], reduction="sum").item()
        scored, begin = end, begin + stride
    return math.exp(nll / (len(ids) - 1))


DESCRIPTION = ("Write a quantized checkpoint (ZeroQuant-style), calibrated by default for w8a8 (SmoothQuant) "
               "and w4a16 (GPTQ).")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The ``mii quantize`` arguments, for a parser of its own or a subcommand."""
    ap.add_argument("model", help="fp model: HF directory, .gguf file or hub id ('default' = embedded model)")
    ap.add_argument("out", help="directory for the quantized checkpoint (must not exist or be empty)")
    ap.add_argument("--mode", default="w8a16", choices=MODES)
    ap.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                    help="inputs per weight scale, a power of two >= 32 (w8a16/w4a16; default 128)")
    ap.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                    help="calibrate on the shipped calib_text.txt: SmoothQuant for w8a8, GPTQ for w4a16 and "
                         "w8a16 (default: on for w8a8 and w4a16, off for w8a16). On-the-fly quantization "
                         "at load (--quantize, quantize=) always rounds to nearest")
    ap.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS,
                    help=f"calibration tokens (default {CALIB_TOKENS})")
    ap.add_argument("--eval", action="store_true",
                    help="report the perplexity of the fp and the quantized model on the shipped English text")
    ap.add_argument("--eval-tokens", type=int, default=None, help="score only the text's first N tokens")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    model = None if args.model == "default" and not Path(args.model).exists() else args.model
    out = quantize_checkpoint(model, args.out, args.mode, args.group_size, show_progress=not args.quiet,
                              calibrate=args.calibrate, calib_tokens=args.calib_tokens)
    if args.eval:
        fp = evaluate_perplexity(model, max_tokens=args.eval_tokens)
        q = evaluate_perplexity(out, max_tokens=args.eval_tokens)
        print(f"perplexity on {EVAL_TEXT}: fp32 {fp:.4f}, {args.mode} {q:.4f}, "
              f"ratio {q / fp:.4f} ({100 * (q / fp - 1):+.2f}%)", flush=True)
    return 0


def cli_main(argv: list[str] | None = None) -> int:
    """``mii quantize MODEL OUT --mode w8a16 [--group-size N] [--calibrate/--no-calibrate] [--eval]``;
    returns the exit code."""
    ap = argparse.ArgumentParser(prog="mii quantize", description=DESCRIPTION)
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return run(args)
    except (ValueError, RuntimeError) as e:
        print(f"mii quantize: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli_main())
