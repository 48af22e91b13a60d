from .base import Policy, W

BLOOM = Policy(
    name="bloom",
    base_prefix="transformer.",
    weights={
        "transformer.word_embeddings": W("embed"),
        "transformer.word_embeddings_layernorm": W("embed_norm"),
        "transformer.h.{i}.input_layernorm": W("layers.{i}.ln1"),
        "transformer.h.{i}.self_attention.query_key_value": W("layers.{i}.attn.qkv", "qkv_heads"),
        "transformer.h.{i}.self_attention.dense": W("layers.{i}.attn.o"),
        "transformer.h.{i}.post_attention_layernorm": W("layers.{i}.ln2"),
        "transformer.h.{i}.mlp.dense_h_to_4h": W("layers.{i}.mlp.up"),
        "transformer.h.{i}.mlp.dense_4h_to_h": W("layers.{i}.mlp.down"),
        "transformer.ln_f": W("final_norm"),
        "lm_head": W("lm_head"),
    },
    norm="layer",
    position="alibi",
    activation="gelu_new",  # BloomGelu is the tanh approximation
    embed_norm=True,
    intermediate=None,  # always 4 * hidden
    checks=(("apply_residual_connection_post_layernorm", False), ("pretraining_tp", 1)),
)
