from .base import Cfg, Policy, W

GPT_NEOX = Policy(
    name="gpt_neox",
    base_prefix="gpt_neox.",
    weights={
        "gpt_neox.embed_in": W("embed"),
        "gpt_neox.layers.{i}.input_layernorm": W("layers.{i}.ln1"),
        "gpt_neox.layers.{i}.attention.query_key_value": W("layers.{i}.attn.qkv", "qkv_heads"),
        "gpt_neox.layers.{i}.attention.dense": W("layers.{i}.attn.o"),
        "gpt_neox.layers.{i}.post_attention_layernorm": W("layers.{i}.ln2"),
        "gpt_neox.layers.{i}.mlp.dense_h_to_4h": W("layers.{i}.mlp.up"),
        "gpt_neox.layers.{i}.mlp.dense_4h_to_h": W("layers.{i}.mlp.down"),
        "gpt_neox.final_layer_norm": W("final_norm"),
        "embed_out": W("lm_head"),
    },
    norm="layer",
    position="rotary",
    activation=Cfg("hidden_act", "gelu"),
    parallel_residual=Cfg("use_parallel_residual", True),
    qkv_bias=Cfg("attention_bias", True),
    o_bias=Cfg("attention_bias", True),
    eps=Cfg("layer_norm_eps", 1e-5),
    tied_default=False,
)
