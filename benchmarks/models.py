"""Benchmark model shapes, built with random init from transformers configs."""
from __future__ import annotations

from pathlib import Path

import torch

# name -> (architecture, config kwargs). Shapes follow the public checkpoints.
SHAPES: dict[str, tuple[str, dict]] = {
    "gpt2-124m": ("GPT2LMHeadModel", dict(n_embd=768, n_layer=12, n_head=12, n_positions=2048, vocab_size=50257)),
    "opt-1.3b": ("OPTForCausalLM", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                                        ffn_dim=8192, max_position_embeddings=2048, word_embed_proj_dim=2048,
                                        vocab_size=50272)),
    "llama-1b": ("LlamaForCausalLM", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                          max_position_embeddings=4096, tie_word_embeddings=True,
                                          rope_theta=500000.0)),
    "llama-7b": ("LlamaForCausalLM", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                          max_position_embeddings=8192)),  # room for a 4,096-token prefill
    "llama-8b": ("LlamaForCausalLM", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                          max_position_embeddings=8192, rope_theta=500000.0)),  # Llama 3 8B: GQA, heads of 128
}


def rank_shape(name: str, tp: int) -> str:
    """Register and return the name of one tensor-parallel rank's share of a Llama shape as
    a model of its own: heads, KV heads (where they split), MLP width and vocabulary over
    ``tp``, hidden size and head size kept. On one GPU it runs a TP rank's kernels without
    the all-reduces, which bounds what TP can reach."""
    arch, kw = SHAPES[name]
    if not arch.startswith("Llama"):
        raise ValueError(f"rank_shape takes a Llama shape, {name!r} is {arch}")
    kw = dict(kw, head_dim=kw["hidden_size"] // kw["num_attention_heads"])
    for k in ("num_attention_heads", "intermediate_size", "vocab_size"):
        kw[k] //= tp
    if kw["num_key_value_heads"] >= tp:
        kw["num_key_value_heads"] //= tp
    rank = f"{name}-rank-of-{tp}"
    SHAPES[rank] = (arch, kw)
    return rank


def hf_config(name: str):
    """The transformers config of shape ``name``, its ``architectures`` set."""
    import transformers

    arch, kw = SHAPES[name]
    config = getattr(transformers, arch.replace("ForCausalLM", "Config").replace("LMHeadModel", "Config"))(**kw)
    config.architectures = [arch]
    return config


def build(name: str, root: Path, dtype: torch.dtype = torch.float16):
    """Random-init HF model on the GPU, saved (once) as a checkpoint our engine loads.
    Returns (checkpoint dir, the HF model on the GPU)."""
    import transformers
    from tests.tiny_models import make_tokenizer

    config = hf_config(name)
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = getattr(transformers, config.architectures[0])(config).to(dtype).eval()
    out = root / name
    if not (out / "config.json").is_file():
        model.save_pretrained(out, safe_serialization=True)
        # prompts are token ids, but generated ids are detokenized as a server does: each must be a token
        make_tokenizer(out, config.vocab_size)
    return out, model


def kv_bytes_per_step(spec, ctx: int) -> int:
    """fp16 K and V bytes one sequence's decode step reads at context ``ctx``."""
    return 2 * spec.num_layers * ctx * spec.num_kv_heads * spec.head_dim * 2


def weight_bytes(model) -> int:
    """Weight bytes a decode step streams: every parameter once, except the tables a step only
    looks rows up in (token and learned position embeddings), unless tied to the LM head."""
    head = model.get_output_embeddings()
    lookups = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    lookups.discard(head.weight.data_ptr() if head is not None else None)
    seen, n = set(lookups), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    return n
