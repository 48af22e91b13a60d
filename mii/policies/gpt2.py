from .base import Cfg, Policy, W

# GPT-2 stores its linears as Conv1D, i.e. [in, out]: the loader transposes them.
GPT2 = Policy(
    name="gpt2",
    base_prefix="transformer.",
    weights={
        "transformer.wte": W("embed"),
        "transformer.wpe": W("pos_embed"),
        "transformer.h.{i}.ln_1": W("layers.{i}.ln1"),
        "transformer.h.{i}.attn.c_attn": W("layers.{i}.attn.qkv", "qkv", transpose=True),
        "transformer.h.{i}.attn.c_proj": W("layers.{i}.attn.o", transpose=True),
        "transformer.h.{i}.ln_2": W("layers.{i}.ln2"),
        "transformer.h.{i}.mlp.c_fc": W("layers.{i}.mlp.up", transpose=True),
        "transformer.h.{i}.mlp.c_proj": W("layers.{i}.mlp.down", transpose=True),
        "transformer.ln_f": W("final_norm"),
        "lm_head": W("lm_head"),
    },
    norm="layer",
    position="learned",
    activation=Cfg("activation_function", "gelu_new"),
    intermediate=Cfg("n_inner"),
    checks=(("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False)),
)
