"""Architecture registry: HF ``architectures`` entry -> (policy module, policy name).

Imported lazily, as in vLLM's registry. Adding an architecture means a policy file,
one line here and a tiny-model parity test.
"""
from __future__ import annotations

import importlib

from .base import Policy

REGISTRY: dict[str, tuple[str, str]] = {
    "GPT2LMHeadModel": ("gpt2", "GPT2"),
    "OPTForCausalLM": ("opt", "OPT"),
    "BloomForCausalLM": ("bloom", "BLOOM"),
    "GPTNeoXForCausalLM": ("gpt_neox", "GPT_NEOX"),
    "GPTJForCausalLM": ("gptj", "GPTJ"),
    "LlamaForCausalLM": ("llama", "LLAMA"),
    "MistralForCausalLM": ("llama", "MISTRAL"),
    "Qwen2ForCausalLM": ("llama", "QWEN2"),
}


def policy_for(config) -> tuple[str, Policy]:
    """The policy for an HF config, by its first supported ``architectures`` entry."""
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in REGISTRY:
            module, name = REGISTRY[arch]
            return arch, getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise ValueError(f"unsupported architecture {archs or getattr(config, 'model_type', None)!r}; "
                     f"supported: {sorted(REGISTRY)}")
