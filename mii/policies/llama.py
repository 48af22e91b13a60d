from dataclasses import replace

from .base import Cfg, Policy, W

_LLAMA_WEIGHTS = {
    "model.embed_tokens": W("embed"),
    "model.layers.{i}.input_layernorm": W("layers.{i}.ln1"),
    "model.layers.{i}.self_attn.q_proj": W("layers.{i}.attn.qkv", "q"),
    "model.layers.{i}.self_attn.k_proj": W("layers.{i}.attn.qkv", "k"),
    "model.layers.{i}.self_attn.v_proj": W("layers.{i}.attn.qkv", "v"),
    "model.layers.{i}.self_attn.o_proj": W("layers.{i}.attn.o"),
    "model.layers.{i}.post_attention_layernorm": W("layers.{i}.ln2"),
    "model.layers.{i}.mlp.gate_proj": W("layers.{i}.mlp.up", "gate"),
    "model.layers.{i}.mlp.up_proj": W("layers.{i}.mlp.up", "up"),
    "model.layers.{i}.mlp.down_proj": W("layers.{i}.mlp.down"),
    "model.norm": W("final_norm"),
    "lm_head": W("lm_head"),
}

LLAMA = Policy(
    name="llama",
    base_prefix="model.",
    weights=_LLAMA_WEIGHTS,
    norm="rms",
    position="rotary",
    activation=Cfg("hidden_act", "silu"),
    gated_mlp=True,
    qkv_bias=Cfg("attention_bias", False),
    o_bias=Cfg("attention_bias", False),
    mlp_bias=Cfg("mlp_bias", False),
    eps=Cfg("rms_norm_eps", 1e-6),
    tied_default=False,
)

# Mistral is Llama plus a sliding window, which ModelSpec reads from the config.
MISTRAL = LLAMA

# Qwen2: biases on q/k/v only.
QWEN2 = replace(LLAMA, name="qwen2", qkv_bias=True, o_bias=False, mlp_bias=False)
