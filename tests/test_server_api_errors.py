"""Bad requests to the shared deployment (the session fixture `dep` in conftest.py) get a
clear error naming the field, over HTTP and gRPC, and the server keeps serving; the
workers' gRPC health, reflection and abort."""
from __future__ import annotations

import grpc
import pytest

from protos import mii_pb2 as pb
from server.wire import prompt_to_proto, sampling_to_proto
from tests.server_helpers import NAME, model_info, worker_stub

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
