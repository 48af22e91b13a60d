"""The Python client of a deployment: MII's legacy query handle and FastGen's client in one.

    handle = mii.mii_query_handle("name")
    handle.query({"query": ["DeepSpeed is", "Seattle is"]}, max_new_tokens=32).response
    for text in handle.stream("Hello", max_new_tokens=32): ...
    handle.generate(["a", "b"], max_new_tokens=8)       # -> [Response, ...]
    handle.terminate_server()

It speaks the gateway's legacy route over HTTP, so requests share the gateway's load
balancing, limits and metrics with every other client.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx


@dataclass(slots=True)
class Response:
    """One generated completion (FastGen's ``Response``)."""

    generated_text: str
    prompt_length: int
    generated_length: int
    finish_reason: str | None
    token_ids: list[int] = field(default_factory=list)
    # with kwargs logprobs / prompt_logprobs: per token {token_id, token, logprob, top: [...]}
    logprobs: list[dict] | None = None
    prompt_logprobs: list[dict] | None = None

    def __str__(self) -> str:
        return self.generated_text


@dataclass(slots=True)
class QueryResult:
    """What the legacy ``query`` returns: ``response`` holds one text per prompt."""

    response: list[str]
    details: list[Response]
    time_taken: float


class MIIServerError(RuntimeError):
    """The gateway answered with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class MIIClient:
    def __init__(self, url: str, deployment: str, api_key: str | None = None, timeout: float | None = 600.0,
                 registry_path: Path | None = None):
        self.url, self.deployment, self.registry_path = url.rstrip("/"), deployment, registry_path
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._route = f"/mii/{deployment}"

    def __repr__(self) -> str:
        return f"MIIClient({self.deployment!r}, url={self.url!r})"

    # -- generation --------------------------------------------------------------------
    def query(self, request: dict, **kwargs) -> QueryResult:
        """MII's legacy call: ``request = {"query": prompt or [prompts]}``; kwargs are
        sampling settings (max_new_tokens, temperature, top_p, do_sample, stop, ...)."""
        if not isinstance(request, dict) or "query" not in request:
            raise ValueError(f'request must be a dict like {{"query": [...]}}, got {request!r}')
        r = self._http.post(self._route, json={"request": {"query": request["query"]}, "kwargs": kwargs})
        body = _checked(r).json()
        details = [Response(d["generated_text"], d["prompt_tokens"], d["generated_tokens"], d["finish_reason"],
                            d["token_ids"], d.get("logprobs"), d.get("prompt_logprobs")) for d in body["details"]]
        return QueryResult(body["response"], details, body["time_taken"])

    def generate(self, prompts: str | list[str], **kwargs) -> list[Response]:
        """FastGen's call: one Response per prompt."""
        return self.query({"query": [prompts] if isinstance(prompts, str) else list(prompts)}, **kwargs).details

    __call__ = generate

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        """Yield the generated text piece by piece as the replica produces it."""
        body = {"request": {"query": prompt}, "kwargs": kwargs, "stream": True}
        with self._http.stream("POST", self._route, json=body) as r:
            if r.status_code >= 400:
                r.read()
                _checked(r)
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise MIIServerError(event["error"].get("code", 500), event["error"]["message"])
                yield event["text"]

    # -- lifecycle ---------------------------------------------------------------------
    def health(self) -> dict:
        return self._http.get("/health").json()

    def terminate_server(self) -> None:
        """Shut the deployment down (all its processes) and close this client."""
        from server.launcher import terminate
        self.close()
        terminate(self.deployment, self.registry_path)

    def close(self) -> None:
        self._http.close()


def _checked(r: httpx.Response) -> httpx.Response:
    if r.status_code < 400:
        return r
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text
    if r.status_code == 400:
        raise ValueError(message)
    raise MIIServerError(r.status_code, message)
