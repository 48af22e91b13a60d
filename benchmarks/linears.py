"""The decoder linears the GEMV benchmarks time: their (N, K) shapes, random weights in our
quantized storage format, and the bytes a call reads."""
from __future__ import annotations

import torch

from .models import hf_config


def linear_shapes(model: str = "llama-7b", lm_head: bool = False) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of the decoder's linears (q/k/v and gate/up fused, as we run them), and
    with ``lm_head`` the LM head's. Read from the transformers config, whose attribute map
    gives every architecture the same names (GPT-2's n_embd is its hidden_size)."""
    c = hf_config(model)
    h, heads = c.hidden_size, c.num_attention_heads
    head = getattr(c, "head_dim", None) or h // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    shapes = {"qkv": ((heads + 2 * kv) * head, h), "o": (h, heads * head)}
    if hasattr(c, "intermediate_size"):  # gated MLP (Llama): gate and up fused
        shapes |= {"gate_up": (2 * c.intermediate_size, h), "down": (h, c.intermediate_size)}
    else:  # OPT's ffn_dim, GPT-2's n_inner (None: 4 h)
        inter = getattr(c, "ffn_dim", None) or getattr(c, "n_inner", None) or 4 * h
        shapes |= {"fc1": (inter, h), "fc2": (h, inter)}
    if lm_head:
        shapes["lm_head"] = (c.vocab_size, h)
    return shapes


SCALES_T = False  # --scales-t: scales laid out group-major ([K/group, N] in memory)


def quantized(N: int, K: int, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (qweight, scales) in our storage format (the kernels' speed does not depend on values)."""
    if bits == 8:
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    else:
        q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
    s = torch.rand(N, K // group, device="cuda") * 0.01 + 1e-3
    return q, (s.t().contiguous().t() if SCALES_T else s)


def weight_bytes(N: int, K: int, bits: int, group: int) -> int:
    if bits == 16:
        return 2 * N * K
    return N * K * bits // 8 + 4 * N * (K // group)
