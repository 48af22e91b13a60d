"""mii-serve: DeepSpeed-MII-style serving with injection policies, one fused decoder,
paged KV cache and continuous batching."""
from __future__ import annotations

from .config import EngineConfig, SamplingParams

__version__ = "0.1.0"


def pipeline(model: str | None = None, **kwargs):
    """Load ``model`` (HF directory, .gguf file, hub id; None = the embedded default
    SmolLM2-135M-Instruct) into an in-process engine and return a callable pipeline.

    kwargs are EngineConfig fields: device, dtype, max_model_len, tensor_parallel, ...
    """
    from .local import Pipeline
    return Pipeline(EngineConfig(model=model, **kwargs))


_API = ("deploy", "mii_query_handle", "terminate", "serve", "client")


def __getattr__(name: str):
    # the serving API pulls in grpc; load it only when asked for
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'mii' has no attribute {name!r}")


__all__ = ["EngineConfig", "SamplingParams", "pipeline", "__version__", *_API]
