"""The engine: add requests, step, abort. One step is schedule, launch, collect.

With ``async_scheduling`` (the default) a step launches the next batch before it
collects the previous one, so the host schedules, packs inputs and detokenizes while
the device computes, as in vLLM's async scheduling and SGLang's overlap scheduler. A
decode's input token then comes straight from the previous step's device tensor. The
cost: a sequence that stops (EOS, stop string) has already been scheduled once more,
and that token is dropped; the length limit is known ahead and wastes nothing.
"""
from __future__ import annotations

import itertools
import logging
import time

import torch
from transformers import AutoConfig, AutoTokenizer

from mii.config import EngineConfig, SamplingParams
from mii.model.source import resolve_model_path
from mii.policies import policy_for
from mii.policies.base import resolve
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .output import Completion, Detokenizer, RequestOutput
from .scheduler import ScheduledSeq, Scheduler
from .sequence import Sequence, TokenLogprob

log = logging.getLogger(__name__)


def default_dtype(device: torch.device, config) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    stored = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
    return torch.bfloat16 if str(stored).endswith("bfloat16") else torch.float16


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.path = str(resolve_model_path(config.model, show_progress=config.show_progress))
        hf_config = AutoConfig.from_pretrained(self.path, trust_remote_code=config.trust_remote_code)
        self.architecture, policy = policy_for(hf_config)
        self.spec = resolve(policy, hf_config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=config.trust_remote_code)
        self.device = config.resolved_device()
        self.dtype = config.dtype or default_dtype(self.device, hf_config)
        self.eos_token_ids = _eos_ids(hf_config, self.tokenizer, self.path)
        if config.tensor_parallel > 1:
            from .tensor_parallel import start_tensor_parallel
            self.runner = start_tensor_parallel(config, self.spec, self.path, self.dtype, self.eos_token_ids)
            self.device = self.runner.device
        else:
            self.runner = ModelRunner(config, self.spec, self.path, self.device, self.dtype, self.eos_token_ids)
        capacity = self.runner.num_blocks * config.block_size
        model_len = self.spec.max_positions
        if config.max_model_len is not None:
            if config.max_model_len > model_len and self.spec.policy.position == "learned":
                raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's "
                                 f"{model_len} learned positions")
            if config.max_model_len > capacity:
                raise ValueError(f"max_model_len={config.max_model_len} does not fit the KV cache "
                                 f"({capacity} tokens); raise the KV budget or lower max_model_len")
            model_len = config.max_model_len
        self.max_model_len = min(model_len, capacity)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.detok: dict[str, Detokenizer] = {}
        self._ids = itertools.count()
        self._inflight: tuple[object, list[Sequence]] | None = None  # launched, not yet collected
        self._sync_only: set[str] = set()  # requests whose sampling reads all tokens on the host

    # -- requests -------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not prompt or not all(isinstance(t, int) and 0 <= t < self.spec.vocab for t in prompt):
            raise ValueError(f"prompt token ids must be a non-empty list of ints in [0, {self.spec.vocab})")
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("prompt is empty after tokenization")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len={self.max_model_len} "
                             f"leaves no room to generate")
        bad = [t for t in params.logit_bias if t >= self.spec.vocab]
        if bad:
            raise ValueError(f"logit_bias token id(s) {bad} outside the vocabulary of {self.spec.vocab}")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, ids, len(ids), params)
        if params.seed is not None:
            seq.generator = self.runner.sampler.new_generator(params.seed)
        self.seqs[rid] = seq
        self.detok[rid] = Detokenizer(self.tokenizer, ids, params.stop, params.skip_special_tokens)
        if params.penalizes_history:  # the penalties need every earlier token on the host
            self._sync_only.add(rid)
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; its final output, or None if unknown."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return self._emit(seq, [], [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # -- the loop -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Launch the next step and return the outputs of the one before it (or, when
        steps run synchronously, of this one)."""
        outputs: list[RequestOutput] = []
        if self._inflight is not None and (self._sync_only or not self.config.async_scheduling):
            outputs += self._collect(*self._inflight)
            self._inflight = None
        batch = self.scheduler.schedule()
        previous, self._inflight = self._inflight, None
        if batch:
            launched = self.runner.launch(batch)
            self._inflight = (launched, self._advance(batch))
        if previous is not None:
            outputs += self._collect(*previous)
        if self._inflight is not None and not self.config.async_scheduling:
            outputs += self._collect(*self._inflight)
            self._inflight = None
        return outputs

    def postprocess(self, batch: list[ScheduledSeq], tokens: list[int],
                    logprobs: list[TokenLogprob | None]) -> list[RequestOutput]:
        """Apply the tokens of a step run by hand (``runner.logits(batch)`` and a choice of
        token per sampling row), as the parity tests drive the engine."""
        return self._apply(self._advance(batch), tokens, logprobs)

    def _advance(self, batch: list[ScheduledSeq]) -> list[Sequence]:
        """Move each sequence past this step's tokens; the sampling ones get a token in
        flight. Returns those, in the order of the step's samples."""
        sampling = []
        bs, caching = self.blocks.block_size, self.blocks.prefix_caching
        for item in batch:
            seq = item.seq
            samples = item.samples
            if seq.params.prompt_logprobs is not None:  # its scores for these positions are in flight
                seq.prompt_scored = max(seq.prompt_scored, min(seq.num_computed + item.num_tokens, seq.num_prompt - 1))
            seq.num_computed += item.num_tokens
            if caching and seq.num_computed >= (seq.num_hashed + 1) * bs:  # a block filled up: cache it
                self.blocks.register(seq)
            if samples:
                seq.num_pending += 1
                sampling.append(seq)
                if seq.num_tokens - seq.num_prompt >= seq.params.max_new_tokens or seq.num_tokens >= self.max_model_len:
                    seq.capped = True
        return sampling

    def _collect(self, launched, seqs: list[Sequence]) -> list[RequestOutput]:
        tokens, logprobs, scores = self.runner.collect(launched)
        for seq, score in scores:  # before the tokens: a prompt's last scores come with its first token
            seq.prompt_scores.append(score)
        return self._apply(seqs, tokens, logprobs)

    def _apply(self, seqs: list[Sequence], tokens: list[int], logprobs: list[TokenLogprob | None]
               ) -> list[RequestOutput]:
        # Runs for every sampled token; at large decode batches the host bounds the step.
        outputs = []
        now = time.monotonic()
        for seq, token, lp in zip(seqs, tokens, logprobs):
            seq.num_pending -= 1
            if seq.finished:  # stopped or aborted while this token was in flight
                continue
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            d = self.detok[seq.request_id]
            reason = self._check_finish(seq, token, d)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            outputs.append(self._emit(seq, [token], [lp] if lp is not None else [], d))
        return outputs

    def _check_finish(self, seq: Sequence, token: int, d: Detokenizer) -> str | None:
        p = seq.params
        if d.add(token):
            return "stop"
        if seq.num_generated >= p.min_new_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
                return "stop"
        if seq.num_generated >= p.max_new_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    def _emit(self, seq: Sequence, new_ids: list[int], lps: list[TokenLogprob],
              d: Detokenizer | None = None) -> RequestOutput:
        if d is None:
            d = self.detok[seq.request_id]
        text = d.take(seq.finished)
        if seq.finished:
            del self.seqs[seq.request_id], self.detok[seq.request_id]
            self._sync_only.discard(seq.request_id)
        prompt_ids = prompt_lps = None
        if new_ids and seq.num_generated == 1:  # the request's first output
            prompt_ids = seq.token_ids[:seq.num_prompt]
            if seq.params.prompt_logprobs is not None:
                prompt_lps = [None, *seq.prompt_scores]  # the first token has no prediction
        return RequestOutput(seq.request_id, text, new_ids, lps, seq.finished, seq.finish_reason,
                             seq.num_prompt, seq.num_generated, d.text if seq.finished else d.text[:d.emitted],
                             prompt_lps, prompt_ids)

    # -- blocking convenience ---------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[Completion]:
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        done: dict[str, Completion] = {}
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        lps: dict[str, list[TokenLogprob]] = {i: [] for i in ids}
        prompt_lps: dict[str, list[TokenLogprob | None] | None] = dict.fromkeys(ids)
        prompt_of = dict(zip(ids, prompts))
        while len(done) < len(ids):
            for out in self.step():
                tokens[out.request_id] += out.token_ids
                lps[out.request_id] += out.logprobs
                if out.prompt_logprobs is not None:
                    prompt_lps[out.request_id] = out.prompt_logprobs
                if out.finished:
                    done[out.request_id] = Completion(
                        out.request_id, prompt_of[out.request_id], out.generated_text, tokens[out.request_id],
                        out.finish_reason, out.prompt_tokens, out.generated_tokens, lps[out.request_id],
                        prompt_lps[out.request_id])
        return [done[i] for i in ids]

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks, if any."""
        self.runner.shutdown()

    @property
    def stats(self) -> dict:
        return {"kv_blocks_total": self.blocks.num_blocks, "kv_blocks_free": self.blocks.num_free,
                "kv_cache_usage": self.blocks.usage, "num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting), "num_preemptions": self.scheduler.num_preemptions,
                "prefix_cache_hit_tokens": self.blocks.hit_tokens, "prefix_cache_query_tokens": self.blocks.query_tokens}


def _eos_ids(config, tokenizer, path: str) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(src)
    try:  # generation_config.json often lists more end tokens (e.g. chat turn ends)
        from transformers import GenerationConfig
        gen = GenerationConfig.from_pretrained(path)
        e = gen.eos_token_id
        ids.update([e] if isinstance(e, int) else (e or []))
    except OSError:  # no generation_config.json
        pass
    return ids
