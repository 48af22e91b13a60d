"""Build the decoder on the meta device and stream checkpoint tensors into it.

Each tensor is read (memory-mapped), routed by the policy to its engine module, and
copied into that module's own parameter by its ``weight_loader``, which keeps only
this rank's slice. No second copy of the model is ever held.

A checkpoint written by ``mii.quantize`` is built with empty quantized linears instead
of fp ones, and names their tensors by engine module (``layers.3.attn.qkv.qweight``):
they are already fused, so they go straight to that module.
"""
from __future__ import annotations

import glob
import logging
import os
import re
from typing import Iterator

import torch
from tqdm.auto import tqdm

from mii.policies.base import ModelSpec, Policy, W
from .decoder import DecoderModel
from .quant_swap import quantized_skeleton, saved_quantization

log = logging.getLogger(__name__)


def checkpoint_files(path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        files = sorted(f for f in glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise ValueError(f"no *.safetensors or pytorch_model*.bin weights in {path!r}")
    return files


def iter_tensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(f, framework="pt") as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name)
        else:
            state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            for name in list(state):
                yield name, state.pop(name)


def _count(files: list[str]) -> int:
    n = 0
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(f, framework="pt") as sf:
                n += len(list(sf.keys()))
        else:
            return 0  # unknown without loading; tqdm then shows a plain counter
    return n


class WeightRouter:
    """Matches checkpoint names against a policy's module templates."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.rules = []
        for src, w in policy.weights.items():
            pattern = re.escape(src).replace(re.escape("{i}"), r"(\d+)")
            self.rules.append((re.compile(rf"^{pattern}\.(weight|bias)$"), w))
        for target in dict.fromkeys(w.target for w in policy.weights.values()):  # quantized layers' tensors
            pattern = re.escape(target).replace(re.escape("{i}"), r"(\d+)")
            self.rules.append((re.compile(rf"^{pattern}\.(qweight|scales|bias)$"), W(target)))

    def route(self, name: str):
        """(engine module, param name, W) or None for tensors we do not use."""
        prefix = self.policy.base_prefix
        candidates = [name] if name.startswith(prefix) else [name, prefix + name]
        for cand in candidates:
            for rx, w in self.rules:
                m = rx.match(cand)
                if m:
                    target = w.target.replace("{i}", m.group(1)) if "{i}" in w.target else w.target
                    return target, m.group(m.lastindex), w
        return None


def load_model(path: str, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
               show_progress: bool = True) -> DecoderModel:
    saved = saved_quantization(spec.hf_config)
    with torch.device("meta"):
        model = DecoderModel(spec, dtype)
        if saved:
            quantized_skeleton(model, saved["mode"], saved["group_size"], tuple(saved["modules"]))
    model = model.to_empty(device=device)
    expected = {n for n, _ in model.named_parameters()}  # tied heads appear once
    loaded: set[str] = set()
    unused: list[str] = []
    router = WeightRouter(spec.policy)
    files = checkpoint_files(path)
    bar = tqdm(total=_count(files) or None, desc="Loading weights", unit="tensor", disable=not show_progress)
    with torch.no_grad():
        for name, tensor in iter_tensors(files):
            bar.update(1)
            routed = router.route(name)
            if routed is None:
                unused.append(name)
                continue
            target, pname, w = routed
            if target == "lm_head" and spec.tied:
                continue  # tied: the embedding already holds it
            try:
                module = model.get_submodule(target)
            except AttributeError:
                unused.append(name)
                continue
            param = getattr(module, pname, None)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model ({target}.{pname}); "
                                 f"the config and the weights disagree")
            if w.transpose and tensor.dim() == 2:
                tensor = tensor.t()
            module.weight_loader(param, tensor, w.shard)  # copy_ casts to the model dtype
            loaded.add(f"{target}.{pname}")
    bar.close()
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint at {path!r} lacks weights for {missing[:8]}"
                         f"{' and more' if len(missing) > 8 else ''}")
    if unused:
        log.info("ignored %d checkpoint tensors, e.g. %s", len(unused), unused[:4])
    model.init_buffers(device)
    return model.eval()
