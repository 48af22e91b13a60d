"""SmoothQuant (Xiao et al., 2023): move the activations' outlier channels into the weights
before W8A8 quantization.

A linear's input X has a few channels far larger than the rest, in every token, so a
per-token int8 scale set by those channels leaves the others a handful of levels. For
a per-channel factor s, X W^T = (X / s)(s W)^T; with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

the input's channels are evened out and the weights' columns take up the difference.
The 1/s is folded into whatever produced X, so the fp model computes the same function
(exactly, up to fp rounding) and nothing is added at run time:

- qkv (and GPT-J's MLP, fed by the same norm) and up / fc1: the norm before them (its
  weight and, for LayerNorm, its bias);
- o: the v rows of qkv (and their bias). Attention mixes v over tokens only, so channel d
  of a query head's output is channel d of its KV head's v scaled by softmax weights; every
  query head that shares a KV head therefore gets one scale per KV-head channel;
- down: gated MLPs (down's input = act(gate) * up) fold into up's rows; ReLU MLPs (OPT)
  fold into fc1's rows and bias, since relu(z / s) = relu(z) / s for s > 0. GELU is not
  homogeneous, so down stays unsmoothed in GPT-2, BLOOM, GPT-NeoX and GPT-J.

Only pairs whose linears are both quantizable (by the policy) are smoothed, so every
changed tensor is either a norm or a quantized linear that the checkpoint writer saves.
"""
from __future__ import annotations

import torch

from mii.policies.base import DEFAULT_QUANTIZABLE
from .calibrate import Calibrator, observe_inputs
from .decoder import DecoderModel
from .layers import Linear, Norm
from .quant_swap import _matches

# Picked by measurement: SmolLM2-135M at W8A8, calibrated on 2048 tokens of calib_text.txt,
# perplexity increase over fp32 on eval_text.txt's first 512 tokens (round-to-nearest: +5.2%):
# alpha 0.3 +2.6%, 0.4 +1.9%, 0.5 +0.09%, 0.6 +0.7%, 0.7 +1.7%, 0.8 +3.5%.
DEFAULT_ALPHA = 0.5
_EPS = 1e-5


@torch.no_grad()
def activation_max(model: DecoderModel, cal: Calibrator, quantizable: tuple[str, ...] = DEFAULT_QUANTIZABLE,
                   show_progress: bool = False) -> dict[str, torch.Tensor]:
    """max |x_j| per input channel j of each quantizable linear over the calibration tokens."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear) and _matches(n, quantizable)}
    amax: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        m = x.abs().amax(0)
        amax[name] = m if name not in amax else torch.maximum(amax[name], m)

    with observe_inputs(linears, record):
        cal.run("Calibrating (SmoothQuant)" if show_progress else None)
    return amax


def smooth_scales(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), given both maxima per input channel j."""
    s = act_max.float().clamp(min=_EPS).pow(alpha) / w_max.float().clamp(min=_EPS).pow(1 - alpha)
    return s.clamp(min=_EPS)


def _column_max(*linears: Linear) -> torch.Tensor:
    """max |W_j| per input channel j over all of ``linears`` (the consumers of one input)."""
    return torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0)


def _fold_into_norm(norm: Norm, consumers: list[Linear], s: torch.Tensor) -> None:
    norm.weight.div_(s.to(norm.weight.dtype))
    if norm.bias is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in consumers:
        lin.weight.mul_(s.to(lin.weight.dtype))


def _fold_into_rows(producer: Linear, start: int, consumer: Linear, s_rows: torch.Tensor, s_cols: torch.Tensor
                    ) -> None:
    """Divide producer's output rows [start, start + len(s_rows)) (and bias) by s_rows and
    multiply consumer's input columns by s_cols (the same factors, spread over its inputs)."""
    rows = slice(start, start + s_rows.numel())
    producer.weight[rows].div_(s_rows.to(producer.weight.dtype)[:, None])
    if producer.bias is not None:
        producer.bias[rows].div_(s_rows.to(producer.bias.dtype))
    consumer.weight.mul_(s_cols.to(consumer.weight.dtype))


@torch.no_grad()
def smooth_model(model: DecoderModel, act_max: dict[str, torch.Tensor], alpha: float = DEFAULT_ALPHA,
                 quantizable: tuple[str, ...] = DEFAULT_QUANTIZABLE) -> set[str]:
    """Apply SmoothQuant in place, given :func:`activation_max`'s statistics; returns the names
    of the modules whose parameters changed."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    spec = model.spec
    through_act = spec.policy.gated_mlp or spec.activation == "relu"

    def ok(prefix: str, *names: str) -> bool:  # both ends of a fold quantized, so both saved
        return all(_matches(prefix + n, quantizable) for n in names)

    changed: set[str] = set()
    for i, block in enumerate(model.layers):
        p = f"layers.{i}."
        attn, mlp = block.attn, block.mlp
        # norm -> qkv (and GPT-J's MLP, which reads the same normed input)
        fed = ("attn.qkv", "mlp.up") if block.shared_norm else ("attn.qkv",)
        if ok(p, *fed):
            lins = [block.get_submodule(n) for n in fed]
            _fold_into_norm(block.ln1, lins, smooth_scales(act_max[p + "attn.qkv"], _column_max(*lins), alpha))
            changed |= {p + "ln1", *(p + n for n in fed)}
        # norm -> up / fc1
        if block.ln2 is not None and ok(p, "mlp.up"):
            _fold_into_norm(block.ln2, [mlp.up], smooth_scales(act_max[p + "mlp.up"], _column_max(mlp.up), alpha))
            changed |= {p + "ln2", p + "mlp.up"}
        # v -> o, one scale per (KV head, channel), shared by the query heads of that KV head
        if ok(p, "attn.o", "attn.qkv"):
            H, Hkv, D = attn.heads, attn.kv_heads, attn.head_dim

            def per_kv_head(t: torch.Tensor) -> torch.Tensor:  # [H * D] -> [Hkv * D], max over query heads
                return t.view(Hkv, H // Hkv, D).amax(1).reshape(Hkv * D)

            s = smooth_scales(per_kv_head(act_max[p + "attn.o"]), per_kv_head(_column_max(attn.o)), alpha)
            s_cols = s.view(Hkv, 1, D).expand(Hkv, H // Hkv, D).reshape(H * D)
            _fold_into_rows(attn.qkv, (H + Hkv) * D, attn.o, s, s_cols)
            changed |= {p + "attn.qkv", p + "attn.o"}
        # up -> down, where the activation lets a row scale through exactly
        if through_act and ok(p, "mlp.down", "mlp.up"):
            s = smooth_scales(act_max[p + "mlp.down"], _column_max(mlp.down), alpha)
            _fold_into_rows(mlp.up, mlp.up.weight.shape[0] // 2 if spec.policy.gated_mlp else 0, mlp.down, s, s)
            changed |= {p + "mlp.up", p + "mlp.down"}
    return changed
