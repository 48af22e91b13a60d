from .base import Cfg, Policy, W

# GPT-J: attention and MLP read the same LayerNorm output and add in parallel.
GPTJ = Policy(
    name="gptj",
    base_prefix="transformer.",
    weights={
        "transformer.wte": W("embed"),
        "transformer.h.{i}.ln_1": W("layers.{i}.ln1"),
        "transformer.h.{i}.attn.q_proj": W("layers.{i}.attn.qkv", "q"),
        "transformer.h.{i}.attn.k_proj": W("layers.{i}.attn.qkv", "k"),
        "transformer.h.{i}.attn.v_proj": W("layers.{i}.attn.qkv", "v"),
        "transformer.h.{i}.attn.out_proj": W("layers.{i}.attn.o"),
        "transformer.h.{i}.mlp.fc_in": W("layers.{i}.mlp.up"),
        "transformer.h.{i}.mlp.fc_out": W("layers.{i}.mlp.down"),
        "transformer.ln_f": W("final_norm"),
        "lm_head": W("lm_head"),
    },
    norm="layer",
    position="rotary",
    rotary_interleaved=True,
    rotary_dim=Cfg("rotary_dim"),
    activation=Cfg("activation_function", "gelu_new"),
    parallel_residual=True,
    shared_input_norm=True,
    qkv_bias=False,
    o_bias=False,
    lm_head_bias=True,
    intermediate=Cfg("n_inner"),
    tied_default=False,
)
