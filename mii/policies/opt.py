from .base import Cfg, Policy, W

OPT = Policy(
    name="opt",
    base_prefix="model.",
    weights={
        "model.decoder.embed_tokens": W("embed"),
        "model.decoder.embed_positions": W("pos_embed"),
        "model.decoder.layers.{i}.self_attn_layer_norm": W("layers.{i}.ln1"),
        "model.decoder.layers.{i}.self_attn.q_proj": W("layers.{i}.attn.qkv", "q"),
        "model.decoder.layers.{i}.self_attn.k_proj": W("layers.{i}.attn.qkv", "k"),
        "model.decoder.layers.{i}.self_attn.v_proj": W("layers.{i}.attn.qkv", "v"),
        "model.decoder.layers.{i}.self_attn.out_proj": W("layers.{i}.attn.o"),
        "model.decoder.layers.{i}.final_layer_norm": W("layers.{i}.ln2"),
        "model.decoder.layers.{i}.fc1": W("layers.{i}.mlp.up"),
        "model.decoder.layers.{i}.fc2": W("layers.{i}.mlp.down"),
        "model.decoder.final_layer_norm": W("final_norm"),
        "lm_head": W("lm_head"),
    },
    norm="layer",
    position="learned",
    learned_pos_offset=2,  # OPT's position table reserves its first two rows
    activation=Cfg("activation_function", "relu"),
    intermediate=Cfg("ffn_dim"),
    eps=1e-5,  # OPT uses nn.LayerNorm's default, not a config value
    qkv_bias=Cfg("enable_bias", True),
    o_bias=Cfg("enable_bias", True),
    mlp_bias=Cfg("enable_bias", True),
    # opt-350m's post-norm and projected embeddings would need their own code path.
    checks=(("do_layer_norm_before", True), ("_remove_final_layer_norm", False),
            ("layer_norm_elementwise_affine", True)),
)
