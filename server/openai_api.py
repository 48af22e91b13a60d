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
    def of(cls, outs: list[Generation], n: int, generated: bool = True) -> Usage:
        """``generated`` False: the tokens run only to score an echoed prompt do not count."""
        usage = cls(n)
        for k, o in enumerate(outs):
            usage.add(k, o.prompt_tokens, o.generated_tokens if generated else 0)
        return usage.usage()

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt, completion_tokens=self.completion,
                     total_tokens=self.prompt + self.completion)


def _completion_logprobs(lps: list[pb.TokenLogprob], offset: int, prompt_lps: list[pb.TokenLogprob] = (),
                         prompt_text: str = "") -> CompletionLogprobs:
    """The generated tokens' logprobs, their text offsets counted from ``offset``; with echo
    the prompt's come first (offsets from 0) and the generated ones' follow ``prompt_text``.
    The prompt's first token has no logprob: null, as OpenAI's."""
    entries, offsets = [], []
    for group, at in ((prompt_lps, 0), (lps, offset + len(prompt_text))):
        for lp in group:
            entries.append(lp)
            offsets.append(at)
            at += len(lp.token)
    scored = [lp.HasField("logprob") for lp in entries]
    return CompletionLogprobs(tokens=[lp.token for lp in entries],
                              token_logprobs=[lp.logprob if s else None for lp, s in zip(entries, scored)],
                              top_logprobs=[{t.token: t.logprob for t in lp.top} if s else None
                                            for lp, s in zip(entries, scored)],
                              text_offset=offsets)


def _completion_parts(body: CompletionRequest, d: Generation | pb.GenerateStreamResponse, offset: int
                      ) -> tuple[str, CompletionLogprobs | None]:
    """A choice's text and logprobs from a finished generation or a stream delta: the
    echoed prompt first, and nothing generated when max_tokens is 0 (the one token run to
    score the prompt is dropped)."""
    prompt_text, prompt_lps = (d.prompt_text, d.prompt_logprobs) if body.echo else ("", [])
    text, lps = (d.text, d.logprobs) if body.max_tokens else ("", [])
    logprobs = None
    if body.logprobs is not None:
        logprobs = _completion_logprobs(lps, offset, prompt_lps, prompt_text)
    return prompt_text + text, logprobs


def _completion_finish(body: CompletionRequest, reason: int) -> str | None:
    return "length" if not body.max_tokens and reason else finish_reason_name(reason)


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
        kwargs = body.sampling_kwargs(max(body.max_tokens, 1), body.logprobs)
        if body.echo and body.logprobs is not None:
            kwargs["prompt_logprobs"] = body.logprobs  # lm-eval's loglikelihood: score the prompt
        jobs = _jobs([prompt_to_proto(p) for p in body.prompts()], kwargs, body.n)
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
    outs = await gw.pool.generate(jobs, arrival, body.echo)
    choices = [CompletionChoice(index=k, text=text, logprobs=logprobs,
                                finish_reason=_completion_finish(body, o.finish_reason))
               for k, o in enumerate(outs) for text, logprobs in [_completion_parts(body, o, 0)]]
    return CompletionResponse(id=reply.id, created=reply.created, model=reply.model, choices=choices,
                              usage=_Usage.of(outs, reply.n, generated=bool(body.max_tokens)))


async def _completion_chunks(gw: Gateway, jobs: Jobs, arrival: float, body: CompletionRequest,
                             reply: _Reply) -> AsyncIterator[CompletionResponse]:
    usage, offsets = _Usage(reply.n), [0] * len(jobs)
    async for k, d in gw.pool.streams(jobs, arrival, body.echo):
        text, logprobs = _completion_parts(body, d, offsets[k])
        offsets[k] += len(text)
        if d.finished:
            usage.add(k, d.prompt_tokens, d.generated_tokens if body.max_tokens else 0)
        choice = CompletionChoice(index=k, text=text, logprobs=logprobs,
                                  finish_reason=_completion_finish(body, d.finish_reason) if d.finished else None)
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
