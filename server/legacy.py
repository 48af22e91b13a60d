"""The legacy MII REST route: ``POST /mii/{deployment}`` with
``{"request": {"query": [...]}, "kwargs": {...}}``; kwargs are ``mii.SamplingParams``
fields (plus MII's ``max_tokens`` and ``do_sample``). ``"stream": true`` (one prompt or
several) answers with Server-Sent Events, one per generated token. With ``logprobs`` (and
``prompt_logprobs``) each prompt's details carry the tokens' log-probabilities and their
top alternatives, as the engine's ``RequestOutput`` does."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from server.errors import RESPONSES, GatewayError
from server.wire import finish_reason_name, prompt_to_proto, sampling_to_proto

if TYPE_CHECKING:
    from server.gateway import Gateway


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LegacyQuery(_Request):
    query: str | list[str] = Field(description="One prompt or a batch of prompts")


class LegacyKwargs(_Request):
    """Sampling settings; unset ones take the engine's defaults."""

    max_new_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="Alias of max_new_tokens")
    min_new_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, description="0 = greedy")
    do_sample: bool | None = Field(None, description="false = greedy")
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = Field(None, description="Token id -> bias in [-100, 100]")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=20, description="Top alternatives per generated token")
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="Score the prompt: top alternatives "
                                        "per prompt token")
    skip_special_tokens: bool | None = None


class LegacyRequest(_Request):
    request: LegacyQuery
    kwargs: LegacyKwargs = Field(default_factory=LegacyKwargs)
    stream: bool = False


class LegacyTop(BaseModel):
    token_id: int
    token: str
    logprob: float


class LegacyLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float | None = Field(description="null only for a prompt's first token: nothing predicts it")
    top: list[LegacyTop] = Field(description="The likeliest tokens, best first")


def _logprobs(entries) -> list[LegacyLogprob]:
    return [LegacyLogprob(token_id=e.token_id, token=e.token, logprob=e.logprob if e.HasField("logprob") else None,
                          top=[LegacyTop(token_id=t.token_id, token=t.token, logprob=t.logprob) for t in e.top])
            for e in entries]


class LegacyDetail(BaseModel):
    generated_text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    generated_tokens: int
    logprobs: list[LegacyLogprob] | None = Field(None, description="Per generated token, with kwargs.logprobs")
    prompt_logprobs: list[LegacyLogprob] | None = Field(None, description="Per prompt token, with "
                                                        "kwargs.prompt_logprobs")


class LegacyResponse(BaseModel):
    response: list[str] = Field(description="Generated text per prompt (MII's result.response)")
    details: list[LegacyDetail]
    time_taken: float


class LegacyChunk(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    generated_tokens: int
    logprobs: list[LegacyLogprob] | None = None  # this event's tokens, with kwargs.logprobs
    prompt_logprobs: list[LegacyLogprob] | None = None  # on a prompt's first event, with kwargs.prompt_logprobs


def router(gw: Gateway) -> APIRouter:
    r = APIRouter(tags=["legacy MII"], responses=RESPONSES)

    @r.post("/mii/{deployment}", response_model=LegacyResponse, summary="Generate (legacy MII shape)",
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "JSON, or SSE of LegacyChunk when stream=true"}})
    async def query(deployment: str, body: LegacyRequest, request: Request):
        if deployment != gw.config.deployment:
            raise GatewayError(404, f"no deployment {deployment!r} here; this is {gw.config.deployment!r}",
                               param="deployment")
        prompts = [body.request.query] if isinstance(body.request.query, str) else body.request.query
        if not prompts:
            raise GatewayError(400, "request.query: at least one prompt is required", param="request.query")
        try:
            params = sampling_to_proto(**body.kwargs.model_dump())
        except ValueError as e:
            raise GatewayError(400, f"kwargs: {e}", param="kwargs") from None
        jobs = [(prompt_to_proto(p), params) for p in prompts]
        scored = body.kwargs.logprobs is not None, body.kwargs.prompt_logprobs is not None
        return await gw.respond(request, body.stream, lambda t: _chunks(gw, jobs, t, scored),
                                lambda t: _result(gw, jobs, t, scored))

    return r


def _scores(o, scored: tuple[bool, bool]) -> dict:
    """The logprob fields asked for. A prompt's scores come with its first event only (the
    worker sends them there), so later events leave the field null."""
    lps, prompt = scored
    return {"logprobs": _logprobs(o.logprobs) if lps else None,
            "prompt_logprobs": _logprobs(o.prompt_logprobs) if prompt and len(o.prompt_logprobs) else None}


async def _result(gw: Gateway, jobs, start: float, scored: tuple[bool, bool]) -> LegacyResponse:
    outs = await gw.pool.generate(jobs, start)
    details = [LegacyDetail(generated_text=o.text, token_ids=o.token_ids, finish_reason=finish_reason_name(
        o.finish_reason), prompt_tokens=o.prompt_tokens, generated_tokens=o.generated_tokens, **_scores(o, scored))
        for o in outs]
    return LegacyResponse(response=[o.text for o in outs], details=details, time_taken=time.monotonic() - start)


async def _chunks(gw: Gateway, jobs, start: float, scored: tuple[bool, bool]):
    async for i, d in gw.pool.streams(jobs, start):
        yield LegacyChunk(index=i, text=d.text, token_ids=list(d.token_ids), finished=d.finished,
                          finish_reason=finish_reason_name(d.finish_reason), prompt_tokens=d.prompt_tokens,
                          generated_tokens=d.generated_tokens, **_scores(d, scored))
