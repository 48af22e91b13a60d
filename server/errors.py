"""HTTP errors of the gateway, all in OpenAI's envelope:
``{"error": {"message", "type", "param", "code"}}``, which the official client parses."""
from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


# What the OpenAPI spec lists for every generation route (validation errors are 400, not 422).
RESPONSES: dict = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "Invalid request: unknown field, wrong type, value out of range, prompt too long, malformed JSON",
    401: "Missing or wrong API key", 404: "Unknown model or deployment",
    429: "Too many requests in flight (see Retry-After)", 502: "A replica failed while generating",
    503: "No healthy replica", 504: "The per-request timeout passed"}.items()}


class GatewayError(Exception):
    """An error with its HTTP status; ``param`` names the offending request field."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _field(loc: tuple) -> str:
    # FastAPI prefixes body fields with "body"; pydantic adds the union member tried
    # ("str", "list[int]"...), which says nothing to a client.
    parts = [str(p) for p in loc if p != "body" and not str(p).startswith(("list[", "str", "int", "function-"))]
    return ".".join(parts) or "body"


def validation_error(exc: RequestValidationError) -> GatewayError:
    """FastAPI's 422 becomes a 400 whose message names each bad field."""
    messages, params = [], []
    for err in exc.errors():
        field = _field(tuple(err.get("loc", ())))
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx", {}).get("error", "")
            messages.append(f"malformed JSON body: {ctx}".rstrip(": "))
            field = "body"
        elif err.get("type") == "extra_forbidden":
            messages.append(f"{field}: unknown field")
        elif err.get("type") == "missing":
            messages.append(f"{field}: field required")
        else:
            messages.append(f"{field}: {err.get('msg')} (got {err.get('input')!r})")
        if field not in params:
            params.append(field)
    return GatewayError(400, "; ".join(dict.fromkeys(messages)) or "invalid request", ",".join(params) or None)


def install(app) -> None:
    """Route every error the app can raise through the one envelope, and say so in the
    OpenAPI spec (FastAPI would document its 422, which the gateway never sends)."""
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = default_openapi()
            for operations in spec.get("paths", {}).values():
                for op in operations.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema
    app.openapi = openapi

    @app.exception_handler(GatewayError)
    async def _gateway(request: Request, exc: GatewayError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return GatewayError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()
