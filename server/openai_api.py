"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Each (prompt, choice) pair is one generation on some replica; choice j of a seeded
request uses seed + j so that n > 1 gives n different samples. Streams send one chunk per
generated token, so the streamed chunks and ``usage.completion_tokens`` always agree.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import APIRouter, Request

from protos import mii_pb2 as pb
from server.errors import RESPONSES, GatewayError
from server.openai_schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                   ChatCompletionRequest, ChatCompletionResponse, ChoiceLogprobs,
                                   CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                   Delta, ModelCard, ModelList, TokenLogprob, TopLogprob, Usage)
from server.replicas import Generation
from server.wire import finish_reason_name, prompt_to_proto, sampling_to_proto

if TYPE_CHECKING:
    from server.gateway import Gateway

_SSE = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream=true, "
                                                                    "ending with `data: [DONE]`"}}
Jobs = list[tuple[pb.Prompt, pb.SamplingParams]]


@dataclass
class _Reply:
    """What every chunk of one response repeats."""

    id: str
    created: int
    model: str
    n: int


def _jobs(prompts: list[pb.Prompt], kwargs: dict, n: int) -> Jobs:
    jobs = []
    for prompt in prompts:
        for j in range(n):
            kw = dict(kwargs)
            if j and kw.get("seed") is not None:
                kw["seed"] += j
            try:
                jobs.append((prompt, sampling_to_proto(**kw)))
            except ValueError as e:
                raise GatewayError(400, str(e)) from None
    return jobs


class _Usage:
    """Token counts of a response; the prompt counts once however many choices it has."""

    def __init__(self, n: int):
        self.n, self.prompt, self.completion = n, 0, 0

    def add(self, index: int, prompt_tokens: int, generated_tokens: int) -> None:
        self.prompt += prompt_tokens if index % self.n == 0 else 0
        self.completion += generated_tokens

    @classmethod
    def of(cls, outs: list[Generation], n: int) -> Usage:
        usage = cls(n)
        for k, o in enumerate(outs):
            usage.add(k, o.prompt_tokens, o.generated_tokens)
        return usage.usage()

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt, completion_tokens=self.completion,
                     total_tokens=self.prompt + self.completion)


def _completion_logprobs(lps: list[pb.TokenLogprob], offset: int) -> CompletionLogprobs:
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.token)
    return CompletionLogprobs(tokens=[lp.token for lp in lps], token_logprobs=[lp.logprob for lp in lps],
                              top_logprobs=[{t.token: t.logprob for t in lp.top} for lp in lps],
                              text_offset=offsets)


def _chat_logprobs(lps: list[pb.TokenLogprob]) -> ChoiceLogprobs:
    def top(t) -> TopLogprob:
        return TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()))
    return ChoiceLogprobs(content=[TokenLogprob(**top(lp).model_dump(), top_logprobs=[top(t) for t in lp.top])
                                   for lp in lps])


def router(gw: Gateway) -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["OpenAI"], responses=RESPONSES)
    created = int(time.time())

    @r.get("/models", response_model=ModelList, summary="The model names this deployment answers to")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=created) for name in gw.model_names])

    @r.post("/completions", response_model=CompletionResponse, responses=_SSE, summary="Text completion")
    async def completions(body: CompletionRequest, request: Request):
        gw.check_model(body.model)
        if body.best_of not in (None, body.n):
            raise GatewayError(400, "best_of: only null or equal to n is supported", param="best_of")
        jobs = _jobs([prompt_to_proto(p) for p in body.prompts()],
                     body.sampling_kwargs(body.max_tokens, body.logprobs), body.n)
        reply = _Reply(f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model, body.n)
        return await gw.respond(request, body.stream, lambda t: _completion_chunks(gw, jobs, t, body, reply),
                                lambda t: _completion(gw, jobs, t, body, reply))

    @r.post("/chat/completions", response_model=ChatCompletionResponse, responses=_SSE, summary="Chat completion")
    async def chat(body: ChatCompletionRequest, request: Request):
        gw.check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        jobs = _jobs([prompt_to_proto(messages)],
                     body.sampling_kwargs(body.max_completion_tokens or body.max_tokens, logprobs), body.n)
        reply = _Reply(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model, body.n)
        return await gw.respond(request, body.stream, lambda t: _chat_chunks(gw, jobs, t, body, reply),
                                lambda t: _chat(gw, jobs, t, body, reply))

    return r


async def _completion(gw: Gateway, jobs: Jobs, arrival: float, body: CompletionRequest,
                      reply: _Reply) -> CompletionResponse:
    outs = await gw.pool.generate(jobs, arrival)
    choices = [CompletionChoice(index=k, text=o.text, finish_reason=finish_reason_name(o.finish_reason),
                                logprobs=_completion_logprobs(o.logprobs, 0) if body.logprobs is not None else None)
               for k, o in enumerate(outs)]
    return CompletionResponse(id=reply.id, created=reply.created, model=reply.model, choices=choices,
                              usage=_Usage.of(outs, reply.n))


async def _completion_chunks(gw: Gateway, jobs: Jobs, arrival: float, body: CompletionRequest,
                             reply: _Reply) -> AsyncIterator[CompletionResponse]:
    usage, offsets = _Usage(reply.n), [0] * len(jobs)
    async for k, d in gw.pool.streams(jobs, arrival):
        logprobs = _completion_logprobs(d.logprobs, offsets[k]) if body.logprobs is not None else None
        offsets[k] += len(d.text)
        if d.finished:
            usage.add(k, d.prompt_tokens, d.generated_tokens)
        choice = CompletionChoice(index=k, text=d.text, logprobs=logprobs,
                                  finish_reason=finish_reason_name(d.finish_reason) if d.finished else None)
        yield CompletionResponse(id=reply.id, created=reply.created, model=reply.model, choices=[choice])
    if body.include_usage:
        yield CompletionResponse(id=reply.id, created=reply.created, model=reply.model, choices=[],
                                 usage=usage.usage())


async def _chat(gw: Gateway, jobs: Jobs, arrival: float, body: ChatCompletionRequest,
                reply: _Reply) -> ChatCompletionResponse:
    outs = await gw.pool.generate(jobs, arrival)
    choices = [ChatChoice(index=k, message=AssistantMessage(content=o.text),
                          finish_reason=finish_reason_name(o.finish_reason),
                          logprobs=_chat_logprobs(o.logprobs) if body.logprobs else None)
               for k, o in enumerate(outs)]
    return ChatCompletionResponse(id=reply.id, created=reply.created, model=reply.model, choices=choices,
                                  usage=_Usage.of(outs, reply.n))


async def _chat_chunks(gw: Gateway, jobs: Jobs, arrival: float, body: ChatCompletionRequest,
                       reply: _Reply) -> AsyncIterator[ChatCompletionChunk]:
    usage, started = _Usage(reply.n), [False] * len(jobs)
    async for k, d in gw.pool.streams(jobs, arrival):
        if d.finished:
            usage.add(k, d.prompt_tokens, d.generated_tokens)
        delta = Delta(role=None if started[k] else "assistant", content=d.text)
        started[k] = True
        choice = ChatChunkChoice(index=k, delta=delta, logprobs=_chat_logprobs(d.logprobs) if body.logprobs else None,
                                 finish_reason=finish_reason_name(d.finish_reason) if d.finished else None)
        yield ChatCompletionChunk(id=reply.id, created=reply.created, model=reply.model, choices=[choice])
    if body.include_usage:
        yield ChatCompletionChunk(id=reply.id, created=reply.created, model=reply.model, choices=[],
                                  usage=usage.usage())
