"""An outside yardstick for our decode step: a Llama decoder written the way gpt-fast writes
one, to be compiled whole by ``torch.compile`` (``benchmarks/compiled_ref.py`` times it).

It takes a transformers ``LlamaForCausalLM``'s weights. Each layer runs four linears, as our
engine does: q/k/v fused, o, gate/up fused and down. The KV cache is static, and a step
attends over the whole cache under a mask. :class:`Int8Linear` is gpt-fast's weight-only
int8 linear: ``F.linear(x, W_int8.to(x.dtype))`` times the scales. For a one-row x, inductor
turns that matmul into a multiply and a sum (``coordinate_descent_tuning``), and the
int8-to-float conversion fuses into it, so the int8 weight is streamed once, as ours is.
Only the step of one token per sequence is written: the benchmark stages the cache
itself, and the CPU test feeds a prompt token by token against transformers' logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_int8(w: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of w [N, K]: per output row (``group`` None, gpt-fast's choice) or per
    ``group`` columns (ours). Returns (q [N, K] int8, scales [N, K / group] in w's dtype)."""
    N, K = w.shape
    g = K if group is None else group
    if K % g:
        raise ValueError(f"group {group} does not divide K={K}")
    wg = w.float().view(N, K // g, g)
    s = wg.abs().amax(-1).clamp(min=1e-8) / 127
    q = torch.round(wg / s[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(N, K), s.to(w.dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y = x dequant(q, s)^T for :func:`quantize_int8`'s output, the dequant written as plain
    torch for inductor to fuse."""
    N, K = q.shape
    if s.shape[1] == 1:  # one scale a row: it comes after the sum
        return F.linear(x, q.to(x.dtype)) * s[:, 0]
    return F.linear(x, (q.view(N, s.shape[1], -1).to(x.dtype) * s[..., None]).view(N, K))


class Int8Linear(nn.Module):
    """gpt-fast's weight-only int8 linear (:func:`int8_linear`)."""

    def __init__(self, w: torch.Tensor, group: int | None):
        super().__init__()
        q, s = quantize_int8(w, group)
        self.register_buffer("q", q)
        self.register_buffer("s", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.q, self.s)


def _linear(w: torch.Tensor, int8: bool, group: int | None) -> nn.Module:
    if int8:
        return Int8Linear(w, group)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class _Layer(nn.Module):
    def __init__(self, hf_layer, int8: bool, group: int | None):
        super().__init__()
        a, m = hf_layer.self_attn, hf_layer.mlp
        self.wqkv = _linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(), int8, group)
        self.wo = _linear(a.o_proj.weight.detach(), int8, group)
        self.w13 = _linear(torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(), int8, group)
        self.w2 = _linear(m.down_proj.weight.detach(), int8, group)
        self.ln1 = hf_layer.input_layernorm.weight.detach()
        self.ln2 = hf_layer.post_attention_layernorm.weight.detach()


class CompiledLlama(nn.Module):
    """The decode step of ``hf`` (a LlamaForCausalLM) for ``batch`` sequences, each with a
    static cache of ``max_len`` positions. ``int8``: the layers' linears as :class:`Int8Linear`
    (the LM head stays in float, as our policy keeps it)."""

    def __init__(self, hf, max_len: int, batch: int = 1, int8: bool = False, group: int | None = None):
        super().__init__()
        c = hf.config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.heads
        self.eps = c.rms_norm_eps
        w = hf.model.embed_tokens.weight.detach()
        self.embed, self.norm = w, hf.model.norm.weight.detach()
        self.lm_head = hf.lm_head.weight.detach()
        self.layers = nn.ModuleList(_Layer(layer, int8, group) for layer in hf.model.layers)
        shape = (len(self.layers), batch, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v_cache = torch.zeros_like(self.k_cache)
        pos = torch.arange(max_len, device=w.device)
        cos, sin = hf.model.rotary_emb(w[:1], pos[None])  # transformers' own table (rope scaling included)
        self.cos, self.sin = cos[0].to(w.dtype), sin[0].to(w.dtype)
        self.positions = pos

    def streamed_bytes(self) -> int:
        """Bytes one step reads: every weight but the embedding table (one row of it), and
        the whole K/V cache (the step attends over all of it, masked)."""
        n = sum(t.numel() * t.element_size() for layer in self.layers
                for t in list(layer.parameters()) + list(layer.buffers()) + [layer.ln1, layer.ln2])
        n += sum(t.numel() * t.element_size() for t in (self.norm, self.lm_head, self.k_cache, self.v_cache))
        return n

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1] at position ``pos`` ([1] int64, the same for every sequence) -> logits [B, vocab]."""
        B = tokens.shape[0]
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[pos], self.sin[pos]
        mask = (self.positions <= pos)[None]  # [1 query, max_len keys]
        for i, layer in enumerate(self.layers):
            q, k, v = layer.wqkv(_rms(x, layer.ln1, self.eps)).split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = _rotate(q.view(B, 1, H, D).transpose(1, 2), cos, sin)
            k = _rotate(k.view(B, 1, Hkv, D).transpose(1, 2), cos, sin)
            self.k_cache[i].index_copy_(2, pos, k)
            self.v_cache[i].index_copy_(2, pos, v.view(B, 1, Hkv, D).transpose(1, 2))
            o = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask,
                                               enable_gqa=Hkv != H)
            x = x + layer.wo(o.transpose(1, 2).reshape(B, 1, H * D))
            gate, up = layer.w13(_rms(x, layer.ln2, self.eps)).chunk(2, dim=-1)
            x = x + layer.w2(F.silu(gate) * up)
        return F.linear(_rms(x, self.norm, self.eps), self.lm_head)[:, 0]
