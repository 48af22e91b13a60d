"""Checkpoint formats and sources: safetensors, pytorch_model.bin, GGUF, hub ids."""
import shutil

import pytest
import torch
import transformers

import mii
from mii.model.loader import WeightRouter
from mii.policies import policy_for
from mii.policies.gpt2 import GPT2


def test_pytorch_bin_checkpoint_loads_like_safetensors(tiny_model_dir, tmp_path):
    src = tiny_model_dir("OPTForCausalLM")
    dst = tmp_path / "bin"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    torch.save(model.state_dict(), dst / "pytorch_model.bin")
    kw = dict(max_new_tokens=12, temperature=0, ignore_eos=True)
    a = mii.pipeline(str(src), device="cpu", show_progress=False)(["Hello, my name is"], **kw)[0]
    b = mii.pipeline(str(dst), device="cpu", show_progress=False)(["Hello, my name is"], **kw)[0]
    assert a.token_ids == b.token_ids


def test_gguf_file_is_converted_once_and_reused(default_model_dir, tmp_path):
    from mii.model.source import convert_gguf, default_model_gguf
    gguf = default_model_gguf()
    assert convert_gguf(gguf, default_model_dir.parent) == default_model_dir  # cached: no second conversion
    assert (default_model_dir / "model.safetensors").stat().st_size > 100e6
    assert (default_model_dir / "config.json").is_file()


def test_gguf_cache_key_follows_content_not_path(default_model_dir, tmp_path):
    # A reinstall puts the same file at a new path with a new mtime: it must reuse the
    # conversion (each copy is 0.5 GB), while a file with other weights must not.
    import os
    from mii.model.source import convert_gguf, default_model_gguf, gguf_fingerprint
    copy = tmp_path / default_model_gguf().name
    shutil.copyfile(default_model_gguf(), copy)
    os.utime(copy, (1e9, 1e9))
    assert convert_gguf(copy, default_model_dir.parent) == default_model_dir
    with open(copy, "r+b") as f:  # other values in the last tensor's data
        f.seek(-4096, os.SEEK_END)
        tail = f.read(4096)
        f.seek(-4096, os.SEEK_END)
        f.write(bytes(b ^ 0x5A for b in tail))
    assert gguf_fingerprint(copy) != gguf_fingerprint(default_model_gguf())


def test_router_accepts_checkpoints_saved_without_the_base_prefix():
    # openai-community/gpt2 names its tensors "h.0.attn.c_attn.weight", without "transformer."
    r = WeightRouter(GPT2)
    assert r.route("h.3.attn.c_attn.weight")[:2] == ("layers.3.attn.qkv", "weight")
    assert r.route("transformer.h.3.mlp.c_proj.bias")[:2] == ("layers.3.mlp.down", "bias")
    assert r.route("h.0.attn.masked_bias") is None


def test_every_registered_architecture_resolves(tiny_model_dir):
    from tests.tiny_models import ARCHITECTURES
    from transformers import AutoConfig
    for arch in ARCHITECTURES:
        cfg = AutoConfig.from_pretrained(tiny_model_dir(arch))
        assert policy_for(cfg)[0] == arch


def test_hub_id_without_network_fails_clearly():
    with pytest.raises(ValueError) as e:
        mii.pipeline("bigscience/bloom-560m")
    msg = str(e.value)
    assert "bigscience/bloom-560m" in msg and "not a local directory" in msg and "hub" in msg
