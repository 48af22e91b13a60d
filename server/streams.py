"""Async plumbing between gRPC streams and HTTP responses: merging the streams of several
choices, Server-Sent Events, and noticing that an HTTP client has gone away."""
from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.errors import GatewayError

T = TypeVar("T")
_DONE = object()
# JSON leaves these unescaped, but str.splitlines() (and so httpx's iter_lines, and other
# line-based SSE readers) breaks lines at them; generated text can contain any of them.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several streams as their items arrive, tagged with the stream's index.

    The first failure ends the merge with that error; leaving the merge early (or failing)
    cancels every stream, which closes each one's gRPC call.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    queue.put_nowait((i, item, None))
        except Exception as e:  # noqa: BLE001 -- handed to the consumer, raised there
            queue.put_nowait((i, None, e))
            return
        queue.put_nowait((i, _DONE, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, error = await queue.get()
            if error is not None:
                raise error
            if item is _DONE:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: BaseModel | dict | str) -> str:
    """One Server-Sent Event carrying a JSON payload (or the literal ``[DONE]``)."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    elif isinstance(payload, dict):
        data = json.dumps(payload, ensure_ascii=False)
    else:
        data = payload
    return f"data: {data.translate(_LINE_BREAKS)}\n\n"


async def _sse_events(events: AsyncIterator[Any]) -> AsyncIterator[str]:
    try:
        async with aclosing(events):
            async for event in events:
                yield sse(event)
        yield sse("[DONE]")
    except GatewayError as e:
        yield sse(e.body())


class SSEResponse(StreamingResponse):
    """``events`` as Server-Sent Events ending with ``data: [DONE]``. An error after the
    response has started cannot change the status code, so it becomes an ``error`` event.

    However the response ends (done, client gone, never started), ``release`` runs and the
    events are closed, which cancels their gRPC calls: cleanup never waits for the GC.
    """

    def __init__(self, events: AsyncIterator[Any], release: Callable[[], None]):
        super().__init__(_sse_events(events), media_type="text/event-stream")
        self._events, self._release = events, release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
            await self._events.aclose()


async def prime(events: AsyncIterator[T]) -> AsyncIterator[T]:
    """Wait for the first event, so that errors before any output (bad prompt, no replica,
    timeout) still become a proper HTTP status rather than a 200 stream with an error."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = _DONE
    except BaseException:
        await events.aclose()
        raise

    async def chained() -> AsyncIterator[T]:
        async with aclosing(events):
            if first is not _DONE:
                yield first
                async for event in events:
                    yield event
    return chained()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` but cancel it if the HTTP client disconnects first (non-streaming
    requests: Starlette only notices disconnects for streaming responses)."""
    task = asyncio.ensure_future(work)

    async def client_gone() -> None:
        while True:  # the body has been read, so the next message is the disconnect
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client left (or we were cancelled): stop generating
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise GatewayError(499, "client closed the request")
    return task.result()
