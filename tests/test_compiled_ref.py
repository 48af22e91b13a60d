"""The gpt-fast-style reference decoder that ``benchmarks.compiled_ref`` times against our engine:
its decode step, fed a prompt token by token, must give transformers' own logits, and its
weight-only int8 linears the float linear of the dequantized weight."""
import pytest
import torch
import transformers

from benchmarks.compiled_llama import CompiledLlama, Int8Linear, quantize_int8


def _tiny_llama(kv_heads: int, seed: int = 0):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=97,
                                      max_position_embeddings=64, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA as the 7B shape, and GQA
def test_decode_steps_match_transformers_logits(kv_heads):
    hf = _tiny_llama(kv_heads)
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        want = hf(tokens).logits
        ref = CompiledLlama(hf, max_len=16, batch=2)
        got = torch.stack([ref(tokens[:, t:t + 1], torch.tensor([t])) for t in range(tokens.shape[1])], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group", [None, 32])
def test_int8_linear_is_the_float_linear_of_its_dequantized_weight(group):
    torch.manual_seed(1)
    w, x = torch.randn(48, 64), torch.randn(3, 64)
    q, s = quantize_int8(w, group)
    deq = (q.view(48, s.shape[1], -1).float() * s[..., None]).view(48, 64)
    assert (deq - w).abs().max() <= s.max() / 2 + 1e-6  # rounding to the nearest step
    torch.testing.assert_close(Int8Linear(w, group)(x), x @ deq.t(), rtol=1e-5, atol=1e-5)


def test_int8_model_follows_the_float_model_on_dequantized_weights():
    hf = _tiny_llama(2)
    tokens = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        ref8 = CompiledLlama(hf, max_len=8, int8=True, group=32)
        for layer, hl in zip(ref8.layers, hf.model.layers):  # put the int8 model's weights into transformers'
            for lin, mods in ((layer.wqkv, (hl.self_attn.q_proj, hl.self_attn.k_proj, hl.self_attn.v_proj)),
                              (layer.wo, (hl.self_attn.o_proj,)), (layer.w13, (hl.mlp.gate_proj, hl.mlp.up_proj)),
                              (layer.w2, (hl.mlp.down_proj,))):
                deq = (lin.q.view(lin.q.shape[0], lin.s.shape[1], -1).float() * lin.s[..., None]).view(lin.q.shape)
                for m, part in zip(mods, deq.split([m.weight.shape[0] for m in mods])):
                    m.weight.copy_(part)
        want = hf(tokens).logits
        got = torch.stack([ref8(tokens[:, t:t + 1], torch.tensor([t])) for t in range(6)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_group_is_a_value_error():
    with pytest.raises(ValueError, match="group 48"):
        quantize_int8(torch.randn(4, 64), 48)
