"""Operating the shared deployment (the session fixture `dep` in conftest.py): concurrent
streams across replicas, client disconnects that abort and free the KV cache, prefix-cache
hits, health, metrics and OpenAPI, API key, queue limit and request timeout on a second
gateway, and the CLI."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pytest

from tests.server_helpers import NAME, PROMPTS, model_info, sse_events, wait_idle


def test_64_concurrent_streams_usage_matches(dep):
    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, int, str]:
        body = {"model": NAME, "prompt": f"Request {i} is", "max_tokens": 4 + i % 13, "temperature": 0.8,
                "seed": i, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = sse_events([line async for line in r.aiter_lines()])
        assert events[-1] == "[DONE]"
        token_chunks = [e for e in events[:-1] if e["choices"]]
        return len(token_chunks), events[-2]["usage"]["completion_tokens"], token_chunks[-1]["choices"][0]["finish_reason"]

    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=dep.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    for streamed, usage, reason in results:
        assert streamed == usage and reason in ("stop", "length")
    metrics = dep.http.get("/metrics").text
    for replica in ("0", "1"):  # least-outstanding balancing used both replicas
        assert f'mii_generation_tokens_total{{replica="{replica}"}}' in metrics


def test_client_disconnect_aborts_and_frees_kv(dep):
    before = [model_info(a).num_aborted for a in dep.workers]
    body = {"model": NAME, "prompt": "DeepSpeed is", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=dep.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [line for _, line in zip(range(6), lines)]
            assert any(line.startswith("data: ") for line in got)
            mid = [model_info(a) for a in dep.workers]
            assert sum(i.num_running for i in mid) == 1 and any(i.kv_blocks_free < i.kv_blocks_total for i in mid)
    # the connection is closed here: gateway -> cancel gRPC -> worker aborts -> blocks freed
    infos = wait_idle(dep.workers)
    assert all(i.kv_blocks_free == i.kv_blocks_total and i.num_running == 0 for i in infos)
    assert sum(i.num_aborted for i in infos) == sum(before) + 1  # aborted, not run to its 240 tokens
    metrics = dep.http.get("/metrics").text
    assert 'mii_kv_cache_usage_ratio{replica="0"} 0.0' in metrics and "mii_num_aborted" in metrics
    # a non-streaming client that gives up is noticed too: 8 x 240 tokens aborted, not finished
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{dep.url}/v1/completions", json={**body, "stream": False, "n": 8}, timeout=0.3)
    infos = wait_idle(dep.workers)
    assert all(i.num_running == 0 for i in infos) and sum(i.num_aborted for i in infos) == sum(before) + 9


def test_repeated_prompt_hits_the_prefix_cache(dep):
    prompt = "Seattle is a city on the west coast of the United States, known for its coffee. " * 2
    before = sum(model_info(a).prefix_cache_hit_tokens for a in dep.workers)
    texts = set()
    for _ in range(3):  # two replicas: at least two of three land on the same one
        r = dep.http.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
        texts.add(r.json()["choices"][0]["text"])
    assert sum(model_info(a).prefix_cache_hit_tokens for a in dep.workers) - before >= 16
    assert len(texts) == 1  # cached or not, the same greedy answer


def test_health_metrics_openapi(dep):
    assert dep.http.get("/health").json() == {"status": "ok", "replicas_up": 2, "replicas": 2}
    dep.http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 3})  # some samples
    dep.http.post("/v1/completions", json={"model": NAME, "prompt": "x", "bogus": 1})
    metrics = dep.http.get("/metrics").text
    for name in ("mii_requests_total", "mii_prompt_tokens_total", "mii_generation_tokens_total",
                 "mii_time_to_first_token_seconds_bucket", "mii_inter_token_latency_seconds_bucket",
                 "mii_queue_depth", "mii_kv_cache_usage_ratio", "mii_replica_up", "mii_replica_outstanding_requests",
                 "mii_prefix_cache_hit_tokens", "mii_prefix_cache_query_tokens"):
        assert name in metrics, name
    assert 'mii_replica_up{replica="1"} 1.0' in metrics
    assert 'mii_requests_total{route="/v1/completions",status="400"}' in metrics
    spec = dep.http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/mii/{deployment}", "/health",
            "/metrics"} <= set(spec["paths"])
    props = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "stop", "n", "logprobs", "seed"} <= set(props)
    assert spec["components"]["schemas"]["CompletionRequest"]["additionalProperties"] is False
    responses = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in responses and {"200", "400", "429", "504"} <= set(responses)
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


@contextmanager
def _second_gateway(dep, tmp_path, **config):
    """Another gateway process on the same workers, with its own settings; yields its URL."""
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps({"deployment": NAME, "workers": dep.workers, **config}))
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "server.gateway", str(path), "--ready-file", str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.is_file():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        yield f"http://127.0.0.1:{json.loads(ready.read_text())['port']}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_api_key_and_queue_limit(dep, tmp_path):
    with _second_gateway(dep, tmp_path, api_key="sekret", max_queued_requests=1) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        auth = {"Authorization": "Bearer sekret"}
        assert http.get("/health").status_code == 200  # no key needed
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for path in ("/v1/models", "/metrics", "/openapi.json"):
                r = http.get(path, headers=headers)
                assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert http.get("/v1/models", headers=auth).status_code == 200
        spec = http.get("/openapi.json", headers=auth).json()
        assert "HTTPBearer" in spec["components"]["securitySchemes"]
        # one admission, 16 x 240 tokens holds the only slot; a second request meanwhile gets 429.
        # On an idle machine the holder can finish first, so a 200 only counts as a race
        # if the holder was already done by then; we retry until the overlap is observed.
        slow = {"model": NAME, "prompt": "x", "max_tokens": 240, "ignore_eos": True, "n": 16, "stream": True}
        busy = None
        for _ in range(5):
            with http.stream("POST", "/v1/completions", json=slow, headers=auth) as r:
                lines = r.iter_lines()
                next(lines)  # admitted and generating: the one slot is taken
                busy = http.post("/v1/completions", json={"model": NAME, "prompt": "x"}, headers=auth)
                if busy.status_code == 429:
                    break  # leave the stream unread: dropping it must free the slot (below)
                holder_done = "data: [DONE]" in list(lines)
            assert busy.status_code == 200 and holder_done, busy.text
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "1", busy.text
        # the dropped stream gives its slot back as soon as the gateway notices the disconnect
        deadline = time.monotonic() + 10
        while (r := http.post("/v1/completions", json={"model": NAME, "prompt": "x"}, headers=auth)).status_code == 429:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.status_code == 200


def test_request_timeout(dep, tmp_path):
    with _second_gateway(dep, tmp_path, request_timeout=0.05) as url, httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 240, "ignore_eos": True})
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
    infos = wait_idle(dep.workers)  # the timed-out request was aborted in the engine
    assert all(i.num_running == 0 and i.kv_blocks_free == i.kv_blocks_total for i in infos)


def test_cli_query(dep):
    out = subprocess.run([sys.executable, "-m", "mii.cli", "query", NAME, PROMPTS[0], "--max-tokens", "4",
                          "--registry", str(dep.registry)], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    expected = dep.client.generate(PROMPTS[0], max_new_tokens=4, temperature=0)[0].generated_text
    assert out.stdout.decode() == expected + "\n"
    listed = subprocess.run([sys.executable, "-m", "mii.cli", "list", "--registry", str(dep.registry)],
                            capture_output=True, text=True, timeout=60)
    assert NAME in listed.stdout and dep.url in listed.stdout
