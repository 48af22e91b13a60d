"""The HTTP gateway: FastAPI in front of the gRPC worker replicas.

    python -m server.gateway GATEWAY_CONFIG.json [--ready-file F]

It translates and routes; the engine holds the logic. Routes: the legacy MII route
(server/legacy.py), the OpenAI API (server/openai_api.py), and here /health, /metrics,
/openapi.json and /docs. Every route but /health takes the optional API key.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer

from server.errors import GatewayError, install as install_errors
from server.metrics import Metrics
from server.registry import announce
from server.replicas import ReplicaPool
from server.streams import SSEResponse, prime, unless_disconnected

log = logging.getLogger("mii.gateway")
T = TypeVar("T")


@dataclass(slots=True)
class GatewayConfig:
    """What one gateway serves and its limits.

    deployment: the deployment's name; the legacy route is /mii/{deployment} and the
        OpenAI ``model`` field accepts it (and any of model_names).
    workers: host:port of each worker replica, in replica-id order.
    port: 0 = any free port (reported in the ready file).
    api_key: when set, every route but /health needs ``Authorization: Bearer <api_key>``.
    max_queued_requests: requests admitted at once; more get 429 with Retry-After.
    request_timeout: seconds a generation may take before it is aborted with 504.
    """

    deployment: str
    workers: list[str]
    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None
    max_queued_requests: int = 1024
    request_timeout: float | None = 600.0
    model_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.deployment or not isinstance(self.deployment, str):
            raise ValueError(f"deployment must be a non-empty string, got {self.deployment!r}")
        if not self.workers:
            raise ValueError("workers must list at least one host:port")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        if not isinstance(self.max_queued_requests, int) or self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be a positive integer, got {self.max_queued_requests!r}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be positive or None, got {self.request_timeout!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class Gateway:
    """State the routes share: the replica pool, metrics, and admission control."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.metrics = Metrics()
        self.pool = ReplicaPool(config.workers, self.metrics, config.request_timeout)
        self.in_flight = 0

    @property
    def model_names(self) -> list[str]:
        return list(dict.fromkeys([self.config.deployment, *self.config.model_names]))

    def check_model(self, model: str) -> None:
        if model not in self.model_names:
            raise GatewayError(404, f"model {model!r} is not served here; use one of {self.model_names}",
                               param="model")

    def admit(self) -> Callable[[], None]:
        """Take a slot for one request, or refuse with 429. Returns the (idempotent) release."""
        if self.in_flight >= self.config.max_queued_requests:
            self.metrics.rejected.inc()
            raise GatewayError(429, f"too many requests in flight (max_queued_requests="
                                    f"{self.config.max_queued_requests}); retry later",
                               headers={"Retry-After": "1"})
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self.metrics.in_flight.set(self.in_flight)
        return release

    async def respond(self, request: Request, stream: bool, events: Callable[[float], AsyncIterator],
                      result: Callable[[float], Awaitable[T]]) -> T | SSEResponse:
        """Admit one request, then either stream ``events(arrival)`` as SSE or await
        ``result(arrival)``; both stop (and abort in the engine) if the client leaves."""
        release, arrival = self.admit(), time.monotonic()
        if stream:
            try:
                first_ready = await prime(events(arrival))
            except BaseException:
                release()
                raise
            return SSEResponse(first_ready, release)
        try:
            return await unless_disconnected(request, result(arrival))
        finally:
            release()


_ROUTES = {"/health", "/metrics", "/openapi.json", "/docs", "/v1/models", "/v1/completions",
           "/v1/chat/completions"}


def _route_label(path: str) -> str:
    if path in _ROUTES:
        return path
    return "/mii/{deployment}" if path.startswith("/mii/") else "other"


class EdgeMiddleware:
    """Checks the API key and counts responses by route and status (a plain ASGI
    middleware, so streaming responses and client disconnects pass through untouched)."""

    def __init__(self, app, gateway: Gateway):
        self.app, self.gateway = app, gateway
        key = gateway.config.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_counting(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        if scope["method"] == "POST":
            # Every POST route takes JSON; curl -d sends a form content-type, which would
            # make FastAPI skip JSON parsing and report a confusing type error.
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        try:
            if self.expected and scope["path"] != "/health" and not self._authorized(scope):
                await GatewayError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                                   headers={"WWW-Authenticate": "Bearer"}).response()(scope, receive, send_counting)
            else:
                await self.app(scope, receive, send_counting)
        finally:
            self.gateway.metrics.requests.labels(_route_label(scope["path"]), str(status)).inc()

    def _authorized(self, scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self.expected)


def create_app(config: GatewayConfig, ready_file: str | None = None, port: int | None = None) -> FastAPI:
    from server import legacy, openai_api

    gw = Gateway(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.pool.start()
        if ready_file:
            announce(ready_file, port=port, pid=os.getpid())
        yield
        await gw.pool.close()

    app = FastAPI(title="mii-serve gateway", version="0.1.0", lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None,
                  description="Legacy MII route and an OpenAI-compatible API over gRPC engine replicas.")
    app.state.gateway = gw
    install_errors(app)
    # Declares the bearer scheme in the OpenAPI spec; EdgeMiddleware does the checking.
    deps = [Depends(HTTPBearer(auto_error=False))] if config.api_key else []
    protected = APIRouter(dependencies=deps)

    @app.get("/health", summary="Liveness: 200 while at least one replica is up")
    async def health() -> JSONResponse:
        up = len(gw.pool.healthy())
        body = {"status": "ok" if up else "unavailable", "replicas_up": up, "replicas": len(gw.pool.replicas)}
        return JSONResponse(body, status_code=200 if up else 503)

    @protected.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        await gw.pool.refresh()  # fresh engine state (KV use, queue) per scrape
        return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4")

    @protected.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @protected.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="mii-serve")

    app.include_router(protected)
    app.include_router(legacy.router(gw), dependencies=deps)
    app.include_router(openai_api.router(gw), dependencies=deps)
    app.add_middleware(EdgeMiddleware, gateway=gw)
    return app


def bind(host: str, port: int) -> socket.socket:
    """Bind (and listen on) host:port ourselves, so port 0 yields the OS's free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m server.gateway", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="JSON file of GatewayConfig fields")
    ap.add_argument("--ready-file", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")
    config = GatewayConfig(**json.loads(Path(args.config).read_text()))
    sock = bind(config.host, config.port)
    port = sock.getsockname()[1]
    app = create_app(config, args.ready_file, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
    log.info("gateway for %r on http://%s:%d", config.deployment, config.host, port)
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    main()
