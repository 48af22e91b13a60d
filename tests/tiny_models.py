"""Tiny random transformers models of every supported architecture, saved as real HF
checkpoints (config.json + safetensors + a byte-level BPE tokenizer) for tests."""
from __future__ import annotations

import os
from pathlib import Path

import torch

VOCAB = 384  # 256 bytes + merges + specials; small so the tests stay fast

_TEXT = ("DeepSpeed is a deep learning optimization library. Hello, my name is Ada and I like "
         "tensors. The quick brown fox jumps over the lazy dog. Seattle is a city in Washington. "
         "Continuous batching mixes prefill and decode steps in one forward pass. ") * 20


def _configs():
    from transformers import (BloomConfig, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig,
                              MistralConfig, OPTConfig, Qwen2Config)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "GPT2LMHeadModel": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common),
        "OPTForCausalLM": OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                    max_position_embeddings=256, word_embed_proj_dim=64, **common),
        "BloomForCausalLM": BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common),
        "GPTNeoXForCausalLM": GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=128, max_position_embeddings=256,
                                            rotary_pct=0.5, partial_rotary_factor=0.5, **common),
        "GPTJForCausalLM": GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256, **common),
        "LlamaForCausalLM": LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256, **common),
        "MistralForCausalLM": MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=1, sliding_window=4096,
                                            max_position_embeddings=256, **common),
        "Qwen2ForCausalLM": Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256, tie_word_embeddings=True, **common),
    }


ARCHITECTURES = sorted(_configs())


def make_tokenizer(out: Path, vocab_size: int = VOCAB):
    """A byte-level BPE trained on a few sentences: any id decodes, text round-trips. A
    ``vocab_size`` beyond what that text trains is filled with made-up merges of tokens
    already there, so that every id a model of that vocabulary samples is a real token
    (the benchmarks' models; an unknown id costs the incremental decoder ten times as much)."""
    import json
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TEXT], trainer)
    if vocab_size > tok.get_vocab_size():
        bpe = json.loads(tok.to_str())["model"]
        vocab, merges = dict(bpe["vocab"]), [tuple(m) for m in bpe["merges"]]
        pieces = [t for t in vocab if not t.startswith("<")]
        rng = random.Random(0)
        while len(vocab) < vocab_size:
            a, b = rng.choice(pieces), rng.choice(pieces)
            if len(a) + len(b) <= 12 and a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
                pieces.append(a + b)
        tok.model = models.BPE(vocab=vocab, merges=merges)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    fast.save_pretrained(out)
    return fast


def make_tiny_model(arch: str, out: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Save a random-init model of ``arch`` with our tiny tokenizer under ``out``."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    config = _configs()[arch]
    for k, v in overrides.items():  # e.g. tie_word_embeddings=False
        setattr(config, k, v)
    return save_random_model(config, arch, out, seed)


def save_random_model(config, arch: str, out: str | os.PathLike, seed: int = 0) -> Path:
    """Save a random-init ``arch`` model of ``config`` with our tiny tokenizer under ``out``."""
    import transformers

    out = Path(out)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # random biases and norm weights too, so nothing is trivially zero/one
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    make_tokenizer(out)
    return out
