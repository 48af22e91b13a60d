"""A background thread that steps an engine, and per-request token streams.

The engine itself is single-threaded. ``EngineLoop`` owns it on one thread; other
threads (or an asyncio loop) submit requests and abort them through a command queue
that the loop drains before every step. Each request's outputs arrive on its
``RequestStream``, iterable both synchronously and with ``async for``.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from typing import AsyncIterator, Iterator

from mii.config import SamplingParams
from .engine import LLMEngine
from .output import RequestOutput

_END = object()


class RequestStream:
    """Per-token outputs of one request, ending after the finished output (or an error)."""

    def __init__(self, request_id: str, owner: "EngineLoop", loop: asyncio.AbstractEventLoop | None):
        self.request_id = request_id
        self._owner = owner
        self._loop = loop
        self._async_q: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._sync_q: queue.Queue | None = None if loop is not None else queue.Queue()
        self.finished = False

    def _put(self, item) -> None:  # called on the engine thread
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_q.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is gone: nobody is listening
                self._owner.abort(self.request_id)
        else:
            self._sync_q.put(item)

    def _unpack(self, item) -> RequestOutput | None:
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self.finished = True
        return item

    def __iter__(self) -> Iterator[RequestOutput]:
        if self._sync_q is None:
            raise TypeError("this stream was opened from asyncio; use `async for`")
        while not self.finished:
            out = self._unpack(self._sync_q.get())
            if out is None:
                return
            yield out

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        if self._async_q is None:
            raise TypeError("this stream was opened outside asyncio; use `for`")
        try:
            while not self.finished:
                out = self._unpack(await self._async_q.get())
                if out is None:
                    return
                yield out
        finally:
            if not self.finished:  # consumer went away (cancelled, disconnected): free the KV
                self._owner.abort(self.request_id)

    def abort(self) -> None:
        self._owner.abort(self.request_id)


class EngineLoop:
    """Runs ``engine.step()`` on a daemon thread while requests are pending."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stop = False
        self.failed: BaseException | None = None  # set when the engine can run no more steps
        self._thread = threading.Thread(target=self._run, name="mii-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> RequestStream:
        """Queue a request; bad prompts raise ValueError here, in the caller's thread."""
        if self.failed is not None:
            raise RuntimeError(f"engine is down: {self.failed}")
        if isinstance(prompt, str) and not prompt:
            raise ValueError("prompt must not be empty")
        ids = self.engine.encode(prompt)
        if len(ids) >= self.engine.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len={self.engine.max_model_len} "
                             f"leaves no room to generate")
        rid = request_id or uuid.uuid4().hex
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        stream = RequestStream(rid, self, loop)
        self._cmds.put(("add", rid, ids, params, stream))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _drain(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params, stream = cmd
                try:
                    self.engine.add_request(ids, params, rid)
                    self._streams[rid] = stream
                except Exception as e:  # surfaces in the consumer, not on this thread
                    stream._put(e)
            else:
                out = self.engine.abort(cmd[1])
                stream = self._streams.pop(cmd[1], None)
                if stream is not None and out is not None:
                    stream._put(out)

    def _run(self) -> None:
        while not self._stop:
            try:
                self._drain()
            except Exception as e:  # a fault here would end the thread silently and strand every request
                self.failed = e
                break
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step fails every request in flight, loudly
                for rid, stream in list(self._streams.items()):
                    self.engine.abort(rid)
                    stream._put(RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
                self._streams.clear()
                if getattr(e, "fatal", False):  # e.g. a dead tensor-parallel rank: stop for good
                    self.failed = e
                    break
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream._put(out)
                    if out.finished:
                        del self._streams[out.request_id]
        self._drain_after_stop()

    def _drain_after_stop(self) -> None:
        reason = RuntimeError(f"engine is down: {self.failed}" if self.failed else "engine shut down")
        for stream in self._streams.values():
            stream._put(reason)
        self._streams.clear()
        while True:  # requests queued but never admitted end too, instead of waiting forever
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                cmd[4]._put(reason)
