"""The same answers on every path into the shared deployment (the session fixture `dep` in
conftest.py): legacy REST, OpenAI JSON and SSE, the official OpenAI client, gRPC on each
replica and the Python handle all give the in-process engine's greedy text, penalties
and logprobs."""
from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

import mii
from protos import mii_pb2 as pb
from server.wire import prompt_to_proto, sampling_to_proto
from tests.server_helpers import NAME, PROMPTS, sse_events, worker_stub

MAX = 12


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
