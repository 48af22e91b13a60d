"""The serving stack end to end: one real deployment (2 worker processes + gateway on
127.0.0.1, tiny Llama) shared by every test of this module."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import grpc
import httpx
import pytest

import mii
from mii import api
from protos import mii_pb2 as pb
from server.launcher import owned
from server.wire import prompt_to_proto, sampling_to_proto
from tests.server_helpers import model_info, sse_events, wait_idle, worker_stub

NAME = "tiny-api"
PROMPTS = ["DeepSpeed is", "Seattle is"]
MAX = 12


@pytest.fixture(scope="module")
def dep(tiny_model_dir, tmp_path_factory):
    model = str(tiny_model_dir("LlamaForCausalLM"))
    registry = tmp_path_factory.mktemp("registry") / "deployments.json"
    client = api.deploy(model, NAME, replica_num=2, num_kv_blocks=256, registry_path=registry,
                        startup_timeout=180)
    http = httpx.Client(base_url=client.url, timeout=60)
    yield SimpleNamespace(client=client, model=model, registry=registry, url=client.url, http=http,
                          workers=owned(NAME).worker_addresses)
    http.close()
    api.terminate(NAME, registry_path=registry)


@pytest.fixture(scope="module")
def reference(dep):
    """Greedy outputs of the in-process engine (mii.pipeline) on the same model."""
    pipe = mii.pipeline(dep.model, num_kv_blocks=64, show_progress=False)
    chat_ids = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}],
                                                  add_generation_prompt=True, tokenize=True)["input_ids"]
    outs = pipe(PROMPTS + [list(chat_ids)], max_new_tokens=MAX, temperature=0)
    # OpenAI's penalties and a bias that bans the greedy first token
    penalties = dict(presence_penalty=0.5, frequency_penalty=0.8, logit_bias={outs[0].token_ids[0]: -100.0})
    penalized = pipe(PROMPTS[:1], max_new_tokens=MAX, temperature=0, **penalties)[0]
    pipe.destroy()
    return SimpleNamespace(texts=[o.generated_text for o in outs[:2]], ids=[o.token_ids for o in outs[:2]],
                           chat=outs[2].generated_text, penalties=penalties, penalized=penalized)


def _sse(response: httpx.Response) -> list:
    events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    return events[:-1]


def test_greedy_identical_on_every_path(dep, reference):
    greedy = {"max_new_tokens": MAX, "temperature": 0}
    # legacy REST
    body = dep.http.post(f"/mii/{NAME}", json={"request": {"query": PROMPTS}, "kwargs": greedy}).json()
    assert body["response"] == reference.texts
    assert [d["token_ids"] for d in body["details"]] == reference.ids
    chunks = _sse(dep.http.post(f"/mii/{NAME}", json={"request": {"query": PROMPTS[0]}, "kwargs": greedy,
                                                       "stream": True}))
    assert "".join(c["text"] for c in chunks) == reference.texts[0]
    assert sum((c["token_ids"] for c in chunks), []) == reference.ids[0]
    # OpenAI completions, both prompts in one request, then streamed
    oa = {"model": NAME, "max_tokens": MAX, "temperature": 0}
    body = dep.http.post("/v1/completions", json={**oa, "prompt": PROMPTS}).json()
    assert [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])] == reference.texts
    with dep.http.stream("POST", "/v1/completions", json={**oa, "prompt": PROMPTS, "stream": True}) as r:
        chunks = _sse(r)
    for i, text in enumerate(reference.texts):
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) == text
    # OpenAI chat equals the pipeline on the chat-templated prompt
    chat = {**oa, "messages": [{"role": "user", "content": "Hello"}]}
    body = dep.http.post("/v1/chat/completions", json=chat).json()
    assert body["choices"][0]["message"]["content"] == reference.chat
    with dep.http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
        chunks = _sse(r)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == reference.chat
    # gRPC, unary and streaming, on each replica
    params = sampling_to_proto(**greedy)
    for address in dep.workers:
        stub = worker_stub(address)
        reply = stub.Generate(pb.GenerateRequest(prompts=[prompt_to_proto(p) for p in PROMPTS], params=params))
        assert [c.text for c in reply.completions] == reference.texts
        assert [list(c.token_ids) for c in reply.completions] == reference.ids
        deltas = list(stub.GenerateStream(pb.GenerateRequest(prompts=[prompt_to_proto(PROMPTS[1])], params=params)))
        assert "".join(d.text for d in deltas) == reference.texts[1]
        assert deltas[-1].finished and deltas[-1].generated_tokens == len(reference.ids[1])
    # the Python handle, found by name
    handle = mii.api.mii_query_handle(NAME, registry_path=dep.registry)
    assert handle.query({"query": PROMPTS}, max_new_tokens=MAX, do_sample=False).response == reference.texts
    assert "".join(handle.stream(PROMPTS[0], max_new_tokens=MAX, do_sample=False)) == reference.texts[0]
    assert [r.token_ids for r in handle.generate(PROMPTS, max_new_tokens=MAX, temperature=0)] == reference.ids


def test_penalties_and_logit_bias_on_every_path(dep, reference):
    """presence/frequency penalties and logit_bias reach the engine from each API unchanged."""
    want, pen = reference.penalized, reference.penalties
    assert want.token_ids != reference.ids[0]
    oa = {"model": NAME, "max_tokens": MAX, "temperature": 0, "presence_penalty": pen["presence_penalty"],
          "frequency_penalty": pen["frequency_penalty"],
          "logit_bias": {str(t): b for t, b in pen["logit_bias"].items()}}  # JSON keys are strings
    body = dep.http.post("/v1/completions", json={**oa, "prompt": PROMPTS[0]}).json()
    assert body["choices"][0]["text"] == want.generated_text
    legacy = {"max_new_tokens": MAX, "temperature": 0, **oa, "max_tokens": None, "model": None}
    legacy = {k: v for k, v in legacy.items() if v is not None}
    body = dep.http.post(f"/mii/{NAME}", json={"request": {"query": [PROMPTS[0]]}, "kwargs": legacy}).json()
    assert body["details"][0]["token_ids"] == want.token_ids
    reply = worker_stub(dep.workers[0]).Generate(pb.GenerateRequest(
        prompts=[prompt_to_proto(PROMPTS[0])], params=sampling_to_proto(max_new_tokens=MAX, temperature=0, **pen)))
    assert list(reply.completions[0].token_ids) == want.token_ids


def test_echo_logprobs_score_the_prompt_as_transformers(dep):
    """lm-eval's loglikelihood request (local-completions: echo, logprobs, max_tokens 0 or 1,
    text or token-id prompts) gets the prompt tokens' log-probabilities as transformers
    computes them, on every path: OpenAI JSON, OpenAI SSE, and gRPC."""
    import torch
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(dep.model, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(dep.model)
    text = "DeepSpeed is a library for training large models"
    ids = tok.encode(text)
    with torch.no_grad():
        lp = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    oa = {"model": NAME, "echo": True, "logprobs": 1, "temperature": 0}

    def check_prompt(lps: dict, n_generated: int) -> None:
        assert len(lps["token_logprobs"]) == len(ids) + n_generated
        assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
        for j in range(1, len(ids)):
            assert abs(lps["token_logprobs"][j] - lp[j - 1, ids[j]].item()) < 1e-4, j
            assert abs(max(lps["top_logprobs"][j].values()) - lp[j - 1].max().item()) < 1e-4, j
        assert "".join(lps["tokens"][:len(ids)]) == tok.decode(ids)

    for prompt, echoed in ((text, text), (ids, tok.decode(ids))):
        body = dep.http.post("/v1/completions", json={**oa, "prompt": prompt, "max_tokens": 0}).json()
        c = body["choices"][0]
        assert c["text"] == echoed and c["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == len(ids)
        check_prompt(c["logprobs"], 0)
    # max_tokens 1: the prompt's scores, then the greedy token's
    body = dep.http.post("/v1/completions", json={**oa, "prompt": text, "max_tokens": 1}).json()
    c = body["choices"][0]
    check_prompt(c["logprobs"], 1)
    greedy = lp[-1].argmax().item()
    assert c["text"] == text + tok.decode([greedy]) and c["logprobs"]["tokens"][-1] == tok.decode([greedy])
    assert abs(c["logprobs"]["token_logprobs"][-1] - lp[-1, greedy].item()) < 1e-4
    assert c["logprobs"]["text_offset"][len(ids)] == len(text)
    # streamed: the first chunk carries the prompt, and the chunks add up to the same answer
    with dep.http.stream("POST", "/v1/completions", json={**oa, "prompt": text, "max_tokens": 3,
                                                          "stream": True}) as r:
        chunks = [e["choices"][0] for e in _sse(r)]
    assert chunks[0]["text"].startswith(text)
    full = dep.http.post("/v1/completions", json={**oa, "prompt": text, "max_tokens": 3}).json()["choices"][0]
    assert "".join(ch["text"] for ch in chunks) == full["text"]
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert sum((ch["logprobs"][key] for ch in chunks), []) == full["logprobs"][key]
    # echo alone: the prompt's text, no scores asked for
    plain = {"model": NAME, "prompt": text, "max_tokens": 2, "temperature": 0}
    generated = dep.http.post("/v1/completions", json=plain).json()["choices"][0]["text"]
    body = dep.http.post("/v1/completions", json={**plain, "echo": True}).json()
    assert body["choices"][0]["text"] == text + generated and body["choices"][0]["logprobs"] is None
    # gRPC: prompt_logprobs as a sampling field, the first token unscored
    reply = worker_stub(dep.workers[0]).Generate(pb.GenerateRequest(
        prompts=[prompt_to_proto(ids)], params=sampling_to_proto(max_new_tokens=1, prompt_logprobs=0), echo=True))
    done = reply.completions[0]
    assert [e.token_id for e in done.prompt_logprobs] == ids and done.prompt_text == tok.decode(ids)
    assert not done.prompt_logprobs[0].HasField("logprob") and not done.prompt_logprobs[1].top
    assert abs(done.prompt_logprobs[-1].logprob - lp[-2, ids[-1]].item()) < 1e-4


def test_legacy_route_returns_logprobs_as_transformers(dep):
    """MII's legacy route with kwargs logprobs and prompt_logprobs: each prompt's details
    carry the scores transformers computes, and the SSE events add up to the same."""
    import torch
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(dep.model, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(dep.model)
    kwargs = {"max_new_tokens": 3, "temperature": 0, "logprobs": 2, "prompt_logprobs": 1}
    body = dep.http.post(f"/mii/{NAME}", json={"request": {"query": PROMPTS}, "kwargs": kwargs}).json()
    for prompt, d in zip(PROMPTS, body["details"]):
        ids = tok.encode(prompt) + d["token_ids"]
        with torch.no_grad():
            lp = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        n = len(ids) - len(d["token_ids"])
        assert [e["token_id"] for e in d["prompt_logprobs"]] == ids[:n]
        assert d["prompt_logprobs"][0]["logprob"] is None and d["prompt_logprobs"][0]["top"] == []
        for j in range(1, len(ids)):
            e = d["prompt_logprobs"][j] if j < n else d["logprobs"][j - n]
            assert e["token_id"] == ids[j] and abs(e["logprob"] - lp[j - 1, ids[j]].item()) < 1e-4, j
            assert len(e["top"]) == (1 if j < n else 2)
            best = lp[j - 1].topk(len(e["top"]))
            assert [t["token_id"] for t in e["top"]] == best.indices.tolist(), j
            assert max(abs(t["logprob"] - v) for t, v in zip(e["top"], best.values.tolist())) < 1e-4
    chunks = _sse(dep.http.post(f"/mii/{NAME}", json={"request": {"query": PROMPTS[0]}, "kwargs": kwargs,
                                                       "stream": True}))
    assert chunks[0]["prompt_logprobs"] == body["details"][0]["prompt_logprobs"]
    assert all(c["prompt_logprobs"] is None for c in chunks[1:])
    assert sum((c["logprobs"] for c in chunks), []) == body["details"][0]["logprobs"]
    # the Python handle hands them on
    handle = mii.api.mii_query_handle(NAME, registry_path=dep.registry)
    got = handle.generate(PROMPTS, **kwargs)
    assert [(r.logprobs, r.prompt_logprobs) for r in got] == [(d["logprobs"], d["prompt_logprobs"])
                                                              for d in body["details"]]
    # without them asked for, no scores
    plain = dep.http.post(f"/mii/{NAME}", json={"request": {"query": PROMPTS[0]}, "kwargs": {"max_new_tokens": 2}})
    assert plain.json()["details"][0]["logprobs"] is None and plain.json()["details"][0]["prompt_logprobs"] is None


def test_official_openai_client(dep, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{dep.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data][0] == NAME
    c = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX, temperature=0)
    assert c.choices[0].text == reference.texts[0] and c.usage.completion_tokens == len(reference.ids[0])
    stream = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=MAX, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == reference.texts[1]
    messages = [{"role": "user", "content": "Hello"}]
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX, temperature=0)
    assert chat.choices[0].message.content == reference.chat and chat.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == reference.chat
    assert chunks[-1].usage.completion_tokens == sum(1 for ch in chunks if ch.choices)
    # n, seed, stop list, logprobs
    c = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, n=2, seed=7, temperature=1.0,
                                  logprobs=2, stop=["\n", "zzz"])
    assert len(c.choices) == 2 and c.usage.prompt_tokens == 3
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) and all(len(t) <= 3 for t in lp.top_logprobs)
    again = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, n=2, seed=7, temperature=1.0)
    assert [ch.text for ch in again.choices] == [ch.text for ch in c.choices]  # seeded: reproducible
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=NAME, prompt="x", top_p=3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


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


BAD = [  # (route, body, status, words the message must contain)
    ("/v1/completions", {"model": NAME, "prompt": "x", "bogus": 1}, 400, ["bogus", "unknown field"]),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "many"}, 400, ["max_tokens"]),
    ("/v1/completions", {"model": NAME, "prompt": "x", "temperature": -1}, 400, ["temperature"]),
    ("/v1/completions", {"model": NAME, "prompt": "x", "top_p": 0}, 400, ["top_p"]),
    ("/v1/completions", {"model": NAME, "prompt": "x", "n": 0}, 400, ["n:"]),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 99}, 400, ["logprobs"]),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 0}, 400, ["max_tokens", "echo"]),
    ("/v1/completions", {"model": NAME, "prompt": "x", "echo": True, "logprobs": 21}, 400, ["logprobs"]),
    ("/v1/completions", {"model": NAME, "prompt": "Seattle is a city. " * 60}, 400, ["prompt", "max_model_len"]),
    ("/v1/completions", {"model": NAME, "prompt": [1, 2, 100000]}, 400, ["prompt"]),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stream": True, "presence_penalty": 3}, 400, ["presence_penalty"]),
    ("/v1/completions", {"model": NAME, "prompt": "x", "frequency_penalty": -2.5}, 400, ["frequency_penalty"]),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logit_bias": {"5": 200}}, 400, ["logit_bias"]),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logit_bias": {"dog": 1}}, 400, ["logit_bias"]),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logit_bias": {"100000": 1}}, 400, ["logit_bias", "vocabulary"]),
    ("/v1/completions", {"prompt": "x"}, 400, ["model", "required"]),
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, ["model"]),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, ["messages"]),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, ["role"]),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": []}, 400,
     ["tools"]),
    (f"/mii/{NAME}", {"request": {"query": ["x"]}, "kwargs": {"max_length": 5}}, 400, ["max_length"]),
    (f"/mii/{NAME}", {"request": {"query": ["x"]}, "kwargs": {"top_k": -1}}, 400, ["top_k"]),
    (f"/mii/{NAME}", {"request": {"query": ["x"]}, "kwargs": {"prompt_logprobs": 21}}, 400, ["prompt_logprobs"]),
    (f"/mii/{NAME}", {"request": {"query": ["x"]}, "kwargs": {"logit_bias": {"7": -101}}}, 400, ["logit_bias"]),
    (f"/mii/{NAME}", {"request": {"query": [""]}}, 400, ["prompt"]),
    (f"/mii/{NAME}", {"request": {"query": ["x"]}, "kwargs": {"min_new_tokens": 50, "max_new_tokens": 5}}, 400,
     ["min_new_tokens"]),
    (f"/mii/{NAME}", {"query": ["x"]}, 400, ["request"]),
    ("/mii/other", {"request": {"query": ["x"]}}, 404, ["deployment"]),
]


@pytest.mark.parametrize("route,body,status,words", BAD, ids=[f"{r}-{'-'.join(w)}" for r, _, _, w in BAD])
def test_bad_input_is_4xx_naming_the_field(dep, route, body, status, words):
    r = dep.http.post(route, json=body)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message


def test_malformed_json_and_server_keeps_serving(dep):
    for raw in (b'{"model": "x", "prompt": ', b"[1, 2]", b"\xff\xfe"):
        r = dep.http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"]
    r = dep.http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


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


def test_grpc_errors_health_and_reflection(dep):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    channel = grpc.insecure_channel(dep.workers[0])
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="mii.Worker"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "mii.Worker" in {s.name for s in reply.list_services_response.service}
    stub = worker_stub(dep.workers[0])
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(prompts=[prompt_to_proto("x")], params=pb.SamplingParams(top_p=2.0)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GenerateStream(pb.GenerateRequest(prompts=[])))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompts" in e.value.details()
    # Abort by id ends a running stream with finish_reason ABORT
    stream = stub.GenerateStream(pb.GenerateRequest(prompts=[prompt_to_proto("x")], request_id="abort-me",
                                                    params=sampling_to_proto(max_new_tokens=240, ignore_eos=True)))
    next(stream)
    assert stub.Abort(pb.AbortRequest(request_id="abort-me")).found
    last = list(stream)[-1]
    assert last.finished and last.finish_reason == pb.ABORT and last.generated_tokens < 240
    assert not stub.Abort(pb.AbortRequest(request_id="abort-me")).found
    info = model_info(dep.workers[1])
    assert info.replica_id == 1 and info.max_model_len == 256 and info.kv_blocks_total == 256


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
