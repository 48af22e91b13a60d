"""An injection policy: everything that tells one architecture from another, as data.

The generic decoder (``mii.model.decoder``) reads a resolved ``ModelSpec``; the loader
reads ``Policy.weights`` to route each checkpoint tensor to its engine parameter.
Values written as strings in ``Cfg`` are read from the HF config (with a default),
so one policy covers every size and variant of a family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch


class W(NamedTuple):
    """Where a checkpoint module's weight/bias goes.

    target: engine module name ("layers.{i}.attn.qkv"); shard: which part of a fused
    engine linear it fills ("q", "k", "v", "qkv" for a [q;k;v] fused tensor,
    "qkv_heads" for per-head interleaved [H, 3, D] as in BLOOM/NeoX, "gate", "up");
    transpose: the checkpoint stores [in, out] (GPT-2's Conv1D).
    """

    target: str
    shard: str | None = None
    transpose: bool = False


class Cfg(NamedTuple):
    """A value read from the HF config: ``getattr(config, name, default)``."""

    name: str
    default: Any = None


# How each engine linear is sliced for tensor parallelism, and which may be quantized.
# Families override only where they differ (none do today).
DEFAULT_TP_PLAN = {
    "embed": "vocab", "lm_head": "vocab",
    "attn.qkv": "column_heads", "attn.o": "row",
    "mlp.up": "column", "mlp.down": "row",
}
DEFAULT_QUANTIZABLE = ("attn.qkv", "attn.o", "mlp.up", "mlp.down")

_ACT_ALIASES = {
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu",
}


@dataclass(frozen=True)
class Policy:
    name: str
    base_prefix: str                 # checkpoints saved from the base model lack it
    weights: dict[str, W]            # HF module name (with {i}) -> engine target
    norm: str                        # "layer" | "rms"
    position: str                    # "learned" | "rotary" | "alibi"
    activation: str | Cfg            # HF activation name (aliases resolved above)
    gated_mlp: bool = False
    parallel_residual: bool | Cfg = False
    shared_input_norm: bool = False  # GPT-J: one norm feeds attention and MLP
    qkv_bias: bool | Cfg = True
    o_bias: bool | Cfg = True
    mlp_bias: bool | Cfg = True
    lm_head_bias: bool = False
    embed_norm: bool = False         # BLOOM's LayerNorm right after the embedding
    learned_pos_offset: int = 0      # OPT stores positions shifted by 2
    rotary_interleaved: bool = False  # GPT-J rotates (x0,x1) pairs, NeoX/Llama halves
    rotary_dim: Cfg | None = None    # absolute rotary dims (GPT-J); else the rope fraction
    intermediate: Cfg = Cfg("intermediate_size")
    eps: Cfg | float = Cfg("layer_norm_epsilon", 1e-5)
    tied_default: bool = True
    tp_plan: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TP_PLAN))
    quantizable: tuple[str, ...] = DEFAULT_QUANTIZABLE
    checks: tuple[tuple[str, Any], ...] = ()  # (config attr, required value) we rely on


def read(config, value):
    return getattr(config, value.name, value.default) if isinstance(value, Cfg) else value


@dataclass(frozen=True)
class ModelSpec:
    """A policy resolved against one HF config: plain numbers and kinds."""

    policy: Policy
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    max_positions: int
    activation: str
    parallel_residual: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tied: bool
    rotary_dim: int
    rope_theta: float
    sliding_window: int | None
    hf_config: Any

    def rope_inv_freq(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
        """Inverse frequencies and attention scaling, via transformers' rope table for
        the scaled variants (linear, dynamic, yarn, llama3, longrope)."""
        rope = _rope_params(self.hf_config)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
            if kind not in ROPE_INIT_FUNCTIONS:
                raise ValueError(f"unsupported rope_type {kind!r}; known: {sorted(ROPE_INIT_FUNCTIONS)}")
            inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](self.hf_config, device)
            return inv_freq.float(), float(scale)
        d = self.rotary_dim
        return 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)), 1.0


def _rope_params(config) -> dict:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(rp)


def resolve(policy: Policy, config) -> ModelSpec:
    for attr, want in policy.checks:
        if getattr(config, attr, want) != want:
            raise ValueError(f"{policy.name}: config {attr}={getattr(config, attr)!r} is not supported "
                             f"(need {want!r})")
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    inter = read(config, policy.intermediate) or 4 * hidden
    act = read(config, policy.activation)
    if act not in _ACT_ALIASES:
        raise ValueError(f"{policy.name}: unsupported activation {act!r}; known: {sorted(_ACT_ALIASES)}")
    act = _ACT_ALIASES[act] + ("_and_mul" if policy.gated_mlp else "")
    rope = _rope_params(config)
    rotary_dim = 0
    if policy.position == "rotary":
        fixed = read(config, policy.rotary_dim) if policy.rotary_dim else None
        frac = rope.get("partial_rotary_factor", getattr(config, "rotary_pct", None)
                        or getattr(config, "partial_rotary_factor", 1.0))
        rotary_dim = int(fixed or head_dim * frac)
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    tied = getattr(config, "tie_word_embeddings", policy.tied_default)
    return ModelSpec(
        policy=policy, hidden=hidden, num_layers=config.num_hidden_layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, intermediate=inter, vocab=config.vocab_size,
        eps=float(read(config, policy.eps)),
        max_positions=getattr(config, "max_position_embeddings", None) or 2048,
        activation=act, parallel_residual=bool(read(config, policy.parallel_residual)),
        qkv_bias=bool(read(config, policy.qkv_bias)), o_bias=bool(read(config, policy.o_bias)),
        mlp_bias=bool(read(config, policy.mlp_bias)), tied=bool(tied), rotary_dim=rotary_dim,
        rope_theta=float(theta), sliding_window=window, hf_config=config,
    )


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.), including the non-power-of-two interpolation."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)
