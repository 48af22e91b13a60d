"""Typed configuration: what to load and how to run it, and how to sample.

Every field is checked in ``__post_init__`` and bad values raise ``ValueError``
naming the value. Nothing here reads the environment: launchers decide.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
QUANT_MODES = ("w8a16", "w8a8", "w4a16")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of fp32, fp16, bf16")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass(slots=True)
class EngineConfig:
    """How one engine replica loads and runs a model.

    model: a local HF directory, a .gguf file, a hub id, or None for the embedded default.
    device / dtype: None picks CUDA+fp16 (bf16 if the checkpoint is bf16) when a GPU exists,
        else CPU+fp32.
    max_model_len: prompt + generation limit per sequence; None takes the model's own.
    block_size: tokens per KV-cache block.
    kv_cache_fraction: on CUDA, share of the *free* device memory (after weights) given to KV.
    kv_cache_bytes: fixed KV budget; the default on CPU (512 MiB) and an override on CUDA.
    num_kv_blocks: exact block count; overrides both budgets (tests use it to force preemption).
    max_num_seqs: most sequences in one step.
    max_num_batched_tokens: token budget of one step; long prompts are prefilled in chunks of it.
    tensor_parallel: ranks the model is sliced over (processes on this host, or torchrun's).
    quantize: None or one of QUANT_MODES: ZeroQuant-style weight (and activation) quantization.
    quant_group_size: input channels sharing one scale (falls back per layer to a divisor).
    enable_cuda_graph: capture decode and mixed prefill+decode steps on CUDA.
    custom_all_reduce: with tensor_parallel on GPUs of one host, all-reduce decode-sized
        messages with a one-shot kernel over peer memory (kernels/allreduce.py) rather
        than NCCL; False keeps NCCL for everything.
    async_scheduling: schedule and launch step N+1 before step N's tokens reach the host,
        so host work (scheduling, input packing, detokenizing) overlaps the GPU's.
    enable_prefix_caching: reuse the K/V of a prompt's longest already-computed prefix
        (whole blocks; ``mii/engine/block_manager.py``), as vLLM does by default.
    fold_norms: at load, fold each block norm's weight into the linears it feeds, so that
        decode steps run the norms inside their GEMVs (``mii/model/fold.py``), where the
        model allows it (fp16/bf16 weights on one rank). False keeps the norms as kernels of
        their own: the arithmetic that tensor-parallel ranks, which cannot fold, also run.
    seed: seed for unseeded sampling.
    """

    model: str | None = None
    device: str | None = None
    dtype: str | torch.dtype | None = None
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_fraction: float = 0.9
    kv_cache_bytes: int | None = None
    num_kv_blocks: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    tensor_parallel: int = 1
    quantize: str | None = None
    quant_group_size: int = 128
    enable_cuda_graph: bool = True
    custom_all_reduce: bool = True
    async_scheduling: bool = True
    enable_prefix_caching: bool = True
    fold_norms: bool = True
    trust_remote_code: bool = False
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"invalid device {self.device!r}: {e}") from None
        if self.dtype is not None:
            self.dtype = parse_dtype(self.dtype)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks!r}")
        if self.quantize is not None and self.quantize not in QUANT_MODES:
            raise ValueError(f"quantize must be one of {QUANT_MODES} or None, got {self.quantize!r}")
        if self.quant_group_size < 1 or self.quant_group_size & (self.quant_group_size - 1):
            raise ValueError(f"quant_group_size must be a power of two, got {self.quant_group_size!r}")

    def resolved_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


@dataclass(slots=True)
class SamplingParams:
    """Per-request decoding settings (the shape of vLLM's, named as in HF/OpenAI).

    temperature 0 means greedy. top_k 0 means no top-k cut. seed makes the request's
    samples reproducible whatever else shares its batch. logprobs=N returns the chosen
    token's log-probability plus the N most likely alternatives (N=0: chosen only).
    presence_penalty and frequency_penalty are OpenAI's: each token's logit is lowered by
    presence_penalty once it has been generated and by frequency_penalty per time it has
    been generated (the prompt does not count; repetition_penalty's does). logit_bias maps
    token ids to values added to their logits (-100 bans a token, 100 all but forces it).
    prompt_logprobs=N scores the prompt as vLLM's does: each prompt token after the first gets
    its log-probability given the tokens before it, plus the N most likely alternatives.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        self.logit_bias = dict(self.logit_bias)
        for t, b in self.logit_bias.items():
            if not isinstance(t, int) or t < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {t!r}")
            if not isinstance(b, (int, float)) or not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b!r} for token {t}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 20):
                raise ValueError(f"{name} must be an integer in [0, 20], got {v!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizes_history(self) -> bool:
        """Whether sampling depends on the tokens seen so far (so they must be on the host)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingParams":
        """Build from user kwargs, accepting the common aliases (max_tokens, max_length-free)."""
        if "max_tokens" in kwargs:
            kwargs["max_new_tokens"] = kwargs.pop("max_tokens")
        if "do_sample" in kwargs:  # MII / HF legacy: do_sample=False means greedy
            if not kwargs.pop("do_sample"):
                kwargs["temperature"] = 0.0
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown sampling argument(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)
