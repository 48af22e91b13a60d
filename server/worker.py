"""One engine replica behind an asyncio gRPC server.

    python -m server.worker ENGINE_CONFIG.json [--replica-id N] [--host H] [--port P] [--ready-file F]

ENGINE_CONFIG.json holds ``mii.EngineConfig`` fields. The server binds port 0 unless told
otherwise and, once the model is loaded and the server is up, writes ``{"port", "pid",
"replica_id"}`` to the ready file so the launcher learns the port the OS picked.

The engine runs on its own thread (``EngineLoop``); each RPC consumes a ``RequestStream``
with ``async for``. When a caller cancels (or its deadline passes) gRPC cancels the
handler's task, the stream stops being consumed, and ``RequestStream`` aborts the request
in the engine, which frees its KV blocks.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mii.config import EngineConfig, SamplingParams
from mii.engine.engine import LLMEngine
from mii.engine.output import RequestOutput
from mii.engine.sequence import TokenLogprob
from mii.engine.stream import EngineLoop, RequestStream
from protos import mii_pb2 as pb
from protos import mii_pb2_grpc as pb_grpc
from server.registry import announce
from server.wire import finish_reason_code, sampling_from_proto

log = logging.getLogger("mii.worker")
SERVICE = pb.DESCRIPTOR.services_by_name["Worker"].full_name


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, loop: EngineLoop, replica_id: int):
        self.loop = loop
        self.engine: LLMEngine = loop.engine
        self.replica_id = replica_id
        self.in_flight: set[str] = set()
        self.num_aborted = 0
        self._token_text: dict[int, str] = {}

    # -- RPCs ---------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        rid = request.request_id or uuid.uuid4().hex
        streams: list[RequestStream] = []
        try:
            if not request.prompts:
                raise ValueError("prompts: at least one prompt is required")
            params = _params(request)
            for i, prompt in enumerate(request.prompts):
                streams.append(self._submit(prompt, params, f"{rid}-{i}"))
            completions = await asyncio.gather(*(self._collect(s, p, request.echo)
                                                 for s, p in zip(streams, request.prompts)))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        finally:  # cancelled, failed or done: nothing of this call stays in the engine
            for s in streams:
                self._release(s)
        return pb.GenerateResponse(completions=completions, replica_id=self.replica_id)

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        stream = None
        try:
            if len(request.prompts) != 1:
                raise ValueError(f"prompts: GenerateStream takes exactly one prompt, got {len(request.prompts)}")
            prompt = request.prompts[0]
            stream = self._submit(prompt, _params(request), request.request_id or uuid.uuid4().hex)
            async for out in stream:
                yield self._delta(out, prompt, request.echo)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        finally:
            if stream is not None:
                self._release(stream)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        e, stats = self.engine, self.engine.stats
        return pb.ModelInfoResponse(
            model=e.path, architecture=e.architecture, max_model_len=e.max_model_len, vocab_size=e.spec.vocab,
            replica_id=self.replica_id, device=str(e.device), dtype=str(e.dtype).removeprefix("torch."),
            tensor_parallel=e.config.tensor_parallel, kv_blocks_total=stats["kv_blocks_total"],
            kv_blocks_free=stats["kv_blocks_free"], kv_cache_usage=stats["kv_cache_usage"],
            num_running=stats["num_running"], num_waiting=stats["num_waiting"],
            num_preemptions=stats["num_preemptions"], num_aborted=self.num_aborted,
            requests_in_flight=len(self.in_flight), prefix_cache_hit_tokens=stats["prefix_cache_hit_tokens"],
            prefix_cache_query_tokens=stats["prefix_cache_query_tokens"])

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        ids = [r for r in self.in_flight if r == request.request_id or r.startswith(request.request_id + "-")]
        for rid in ids:
            self.loop.abort(rid)
        return pb.AbortResponse(found=bool(ids))

    # -- helpers ------------------------------------------------------------------------
    def _submit(self, prompt: pb.Prompt, params: SamplingParams, rid: str) -> RequestStream:
        stream = self.loop.submit(self._prompt(prompt), params, rid)
        self.in_flight.add(rid)
        return stream

    def _release(self, stream: RequestStream) -> None:
        self.in_flight.discard(stream.request_id)
        if not stream.finished:  # the caller went away or a sibling failed: free its KV now
            stream.abort()
            self.num_aborted += 1

    def _prompt(self, prompt: pb.Prompt) -> str | list[int]:
        kind = prompt.WhichOneof("kind")
        if kind == "text":
            if not prompt.text:
                raise ValueError("prompt: must not be empty")
            return prompt.text
        if kind == "token_ids":
            return list(prompt.token_ids.ids)
        if kind == "chat":
            tok = self.engine.tokenizer
            if not getattr(tok, "chat_template", None):
                raise ValueError("messages: this model has no chat template; use a plain prompt")
            messages = [{"role": m.role, "content": m.content} for m in prompt.chat.messages]
            if not messages:
                raise ValueError("messages: at least one message is required")
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        raise ValueError("prompt: set one of text, token_ids or chat")

    async def _collect(self, stream: RequestStream, prompt: pb.Prompt, echo: bool) -> pb.Completion:
        done = pb.Completion()
        async for out in stream:
            if out.prompt_token_ids is not None:  # the first output: what it says of the prompt
                done.MergeFrom(pb.Completion(**self._prompt_fields(out, prompt, echo)))
            done.token_ids.extend(out.token_ids)
            done.logprobs.extend(self._logprobs(out.logprobs))
            if out.finished:
                done.text, done.finish_reason = out.generated_text, finish_reason_code(out.finish_reason)
                done.prompt_tokens, done.generated_tokens = out.prompt_tokens, out.generated_tokens
        return done

    def _delta(self, out: RequestOutput, prompt: pb.Prompt, echo: bool) -> pb.GenerateStreamResponse:
        return pb.GenerateStreamResponse(
            text=out.text, token_ids=out.token_ids, logprobs=self._logprobs(out.logprobs), finished=out.finished,
            finish_reason=finish_reason_code(out.finish_reason), prompt_tokens=out.prompt_tokens,
            generated_tokens=out.generated_tokens, replica_id=self.replica_id,
            **self._prompt_fields(out, prompt, echo))

    def _prompt_fields(self, out: RequestOutput, prompt: pb.Prompt, echo: bool) -> dict:
        """What a request's first output says of its prompt: the prompt's scores, when
        asked for (the first token's without a logprob), and with echo its text."""
        ids = out.prompt_token_ids
        if ids is None:
            return {}
        fields = {}
        if out.prompt_logprobs is not None:
            first = pb.TokenLogprob(token_id=ids[0], token=self._text(ids[0]))
            fields["prompt_logprobs"] = [first, *self._logprobs(out.prompt_logprobs[1:])]
        if echo:
            fields["prompt_text"] = prompt.text if prompt.WhichOneof("kind") == "text" else \
                self.engine.tokenizer.decode(ids)
        return fields

    def _logprobs(self, lps: list[TokenLogprob]) -> list[pb.TokenLogprob]:
        return [pb.TokenLogprob(token_id=lp.token_id, token=self._text(lp.token_id), logprob=lp.logprob,
                                top=[pb.TopLogprob(token_id=t, token=self._text(t), logprob=v) for t, v in lp.top])
                for lp in lps]

    def _text(self, token_id: int) -> str:
        if token_id not in self._token_text:
            self._token_text[token_id] = self.engine.tokenizer.decode([token_id])
        return self._token_text[token_id]


def _params(request: pb.GenerateRequest) -> SamplingParams:
    try:
        return SamplingParams(**sampling_from_proto(request.params))
    except TypeError as e:
        raise ValueError(str(e)) from None


async def serve(config: EngineConfig, replica_id: int = 0, host: str = "127.0.0.1", port: int = 0,
                ready_file: str | None = None) -> None:
    """Load the engine, serve until SIGTERM/SIGINT, then drain briefly and stop."""
    engine = LLMEngine(config)
    loop = EngineLoop(engine)
    # so_reuseport off: a second server on a taken port must fail, not share it silently.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_WorkerServicer_to_server(WorkerServicer(loop, replica_id), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("replica %d serving %s on %s:%d", replica_id, engine.path, host, bound)
    if ready_file:
        announce(ready_file, port=bound, pid=os.getpid(), replica_id=replica_id)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)

    async def watch_engine() -> None:  # an engine that can step no more takes the replica down
        while not stop.is_set():
            if loop.failed is not None:
                log.error("replica %d: engine failed, shutting down: %s", replica_id, loop.failed)
                stop.set()
            elif (why := engine.runner.dead_peer()) is not None:
                # Seen here, not only by the next step: an idle replica must not stay up, and on
                # GPUs a step in flight may never return (rank 0 spins on a flag of the peer-memory
                # all-reduce that the dead rank will not raise).
                log.error("replica %d: %s; shutting down", replica_id, why)
                stop.set()
            await asyncio.sleep(0.25)

    watchdog = asyncio.create_task(watch_engine())
    await stop.wait()
    watchdog.cancel()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if engine.runner.dead_peer() is not None:
        # Whichever noticed first, the engine thread or the watch: a step may still wait on the
        # device for the dead rank, and an orderly shutdown would wait with it. Leave at once.
        await server.stop(grace=0)
        engine.runner.kill_peers()
        logging.shutdown()
        os._exit(3)
    await server.stop(grace=2)
    loop.shutdown()
    engine.shutdown()
    if loop.failed is not None:
        raise SystemExit(3)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m server.worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="JSON file of mii.EngineConfig fields")
    ap.add_argument("--replica-id", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = any free port (reported in the ready file)")
    ap.add_argument("--ready-file", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s replica-{args.replica_id} %(levelname)s %(message)s")
    config = EngineConfig(**json.loads(Path(args.config).read_text()))
    asyncio.run(serve(config, args.replica_id, args.host, args.port, args.ready_file))


if __name__ == "__main__":
    main()
