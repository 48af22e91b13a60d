"""In-process inference: ``mii.pipeline`` returns this engine-in-a-callable."""
from __future__ import annotations

import gc

from mii.config import EngineConfig, SamplingParams
from mii.engine.engine import LLMEngine
from mii.engine.output import Completion


class Pipeline:
    """Batch text generation on one engine replica in the calling process."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.engine: LLMEngine | None = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer

    def __call__(self, prompts: str | list[str] | list[list[int]], **kwargs) -> list[Completion]:
        """Generate for each prompt. kwargs are SamplingParams fields (max_new_tokens,
        temperature, top_p, top_k, stop, seed, ...; max_tokens is accepted too)."""
        if self.engine is None:
            raise RuntimeError("this pipeline was destroyed")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts must be a non-empty string or list")
        params = SamplingParams.from_kwargs(**kwargs)
        return self.engine.generate(list(prompts), params)

    def destroy(self) -> None:
        """Release the model and KV cache, and stop any tensor-parallel ranks."""
        if self.engine is not None:
            self.engine.shutdown()
        self.engine = None
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass
