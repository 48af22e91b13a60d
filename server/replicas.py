"""The gateway's view of its worker replicas: health, least-outstanding-requests
balancing, and what happens when a replica dies.

Every generation is one ``GenerateStream`` call for one prompt. A call that fails with
UNAVAILABLE before its first token never started, so it is retried on another replica;
one that fails after tokens have flowed ends with an error that names the replica. A
replica that fails a call or a health check leaves the rotation until its ModelInfo
answers again.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from protos import mii_pb2 as pb
from protos import mii_pb2_grpc as pb_grpc
from server.errors import GatewayError
from server.metrics import Metrics
from server.streams import merge

log = logging.getLogger("mii.gateway")
HEALTH_INTERVAL_S = 1.0
# Engine errors start with the field they are about; these are the ones a client can fix.
_FIELDS = set(pb.SamplingParams.DESCRIPTOR.fields_by_name) | {"prompt", "prompts", "messages"}


@dataclass(eq=False)
class Replica:
    replica_id: int
    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.WorkerStub
    outstanding: int = 0
    healthy: bool = True
    info: pb.ModelInfoResponse | None = None
    last_error: str = ""


@dataclass
class Generation:
    """A finished generation, assembled from its stream."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[pb.TokenLogprob] = field(default_factory=list)  # when asked for
    prompt_text: str = ""  # with echo
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
    prompt_tokens: int = 0
    generated_tokens: int = 0


class ReplicaPool:
    def __init__(self, addresses: list[str], metrics: Metrics, request_timeout: float | None = None):
        if not addresses:
            raise ValueError("a gateway needs at least one worker address")
        self.addresses = addresses
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.replicas: list[Replica] = []
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        for i, address in enumerate(self.addresses):
            channel = grpc.aio.insecure_channel(address)
            self.replicas.append(Replica(i, address, channel, pb_grpc.WorkerStub(channel)))
        await self.refresh()
        self._watcher = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for r in self.replicas:
            await r.channel.close()

    @property
    def model_info(self) -> pb.ModelInfoResponse | None:
        return next((r.info for r in self.replicas if r.info is not None), None)

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    async def refresh(self) -> None:
        """Ask every replica for its ModelInfo: the health check and the engine metrics at once."""
        async def probe(r: Replica) -> None:
            try:
                r.info = await r.stub.ModelInfo(pb.ModelInfoRequest(), timeout=2.0)
                if not r.healthy:
                    log.warning("replica %d (%s) is back", r.replica_id, r.address)
                r.healthy = True
            except grpc.aio.AioRpcError as e:
                self._mark_down(r, f"{e.code().name}: {e.details()}")
            self.metrics.observe_replica(r.replica_id, r.healthy, r.outstanding, r.info)
        await asyncio.gather(*(probe(r) for r in self.replicas))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                await self.refresh()
            except Exception:  # never let the watcher die
                log.exception("health check failed")

    def _mark_down(self, r: Replica, reason: str) -> None:
        if r.healthy:
            log.warning("replica %d (%s) out of rotation: %s", r.replica_id, r.address, reason)
        r.healthy, r.last_error = False, reason

    def pick(self, exclude: set[int]) -> Replica:
        """The healthy replica with the fewest open generations."""
        candidates = [r for r in self.replicas if r.healthy and r.replica_id not in exclude]
        if not candidates:
            errors = "; ".join(f"replica {r.replica_id}: {r.last_error or 'failed'}" for r in self.replicas
                               if not r.healthy or r.replica_id in exclude)
            raise GatewayError(503, f"no healthy replica available ({errors})", headers={"Retry-After": "1"})
        return min(candidates, key=lambda r: r.outstanding)

    async def stream(self, prompt: pb.Prompt, params: pb.SamplingParams, arrival: float | None = None,
                     echo: bool = False) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Generate one prompt, yielding each step's delta (the first also carries the
        prompt's text with ``echo``). Closing the iterator early (the HTTP client went
        away) cancels the gRPC call, and the worker aborts the request."""
        arrival = arrival if arrival is not None else time.monotonic()
        request = pb.GenerateRequest(prompts=[prompt], params=params, request_id=uuid.uuid4().hex, echo=echo)
        tried: set[int] = set()
        while True:
            replica = self.pick(tried)
            label = str(replica.replica_id)
            replica.outstanding += 1
            call = replica.stub.GenerateStream(request, timeout=self.request_timeout)
            started, last = False, arrival
            try:
                async for delta in call:
                    now = time.monotonic()
                    if delta.token_ids:
                        (self.metrics.itl if started else self.metrics.ttft).labels(label).observe(now - last)
                        self.metrics.generation_tokens.labels(label).inc(len(delta.token_ids))
                        started, last = True, now
                    if delta.finished:
                        self.metrics.prompt_tokens.labels(label).inc(delta.prompt_tokens)
                        self.metrics.replica_requests.labels(label, "ok").inc()
                    yield delta
                return
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._mark_down(replica, f"UNAVAILABLE: {e.details()}")
                    if not started:  # never reached the engine, or died before a token: retry
                        self.metrics.replica_requests.labels(label, "retried").inc()
                        tried.add(replica.replica_id)
                        continue
                self.metrics.replica_requests.labels(label, "error").inc()
                raise _http_error(code, e.details(), replica, started, self.request_timeout) from None
            finally:
                replica.outstanding -= 1
                call.cancel()  # a no-op once the call is done; otherwise tells the worker to abort

    def streams(self, jobs: list[tuple[pb.Prompt, pb.SamplingParams]], arrival: float, echo: bool = False
                ) -> AsyncIterator[tuple[int, pb.GenerateStreamResponse]]:
        """All jobs at once, their deltas interleaved and tagged with the job's index."""
        return merge([self.stream(prompt, params, arrival, echo) for prompt, params in jobs])

    async def generate(self, jobs: list[tuple[pb.Prompt, pb.SamplingParams]], arrival: float, echo: bool = False
                       ) -> list[Generation]:
        """Run all jobs to completion, results in job order."""
        outs = [Generation() for _ in jobs]
        async for i, delta in self.streams(jobs, arrival, echo):
            out = outs[i]
            out.prompt_logprobs += delta.prompt_logprobs
            out.prompt_text += delta.prompt_text
            out.text += delta.text
            out.token_ids += delta.token_ids
            out.logprobs += delta.logprobs
            if delta.finished:
                out.finish_reason, out.prompt_tokens = delta.finish_reason, delta.prompt_tokens
                out.generated_tokens = delta.generated_tokens
        return outs


def _http_error(code: grpc.StatusCode, details: str, replica: Replica, started: bool,
                timeout: float | None) -> GatewayError:
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        first = details.split(" ", 1)[0].rstrip(":")
        return GatewayError(400, details, param=first if first in _FIELDS else None)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayError(504, f"request timed out after {timeout}s (per-request timeout)")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return GatewayError(429, f"replica {replica.replica_id} is out of capacity: {details}",
                            headers={"Retry-After": "1"})
    where = "while generating" if started else "before starting"
    return GatewayError(502, f"replica {replica.replica_id} ({replica.address}) failed {where}: "
                             f"{code.name}: {details}")
