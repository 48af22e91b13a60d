"""The gRPC protocol: generated from the .proto, typed, and translated faithfully."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest

import protos
from mii.config import SamplingParams
from protos import mii_pb2 as pb
from server.wire import prompt_to_proto, sampling_from_proto, sampling_to_proto


def test_generated_code_builds_from_the_proto(tmp_path):
    out = protos.build(tmp_path, force=True)
    assert {p.name for p in out.iterdir()} >= {"mii_pb2.py", "mii_pb2_grpc.py"}
    spec = importlib.util.spec_from_file_location("fresh_mii_pb2", out / "mii_pb2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.DESCRIPTOR.services_by_name["Worker"].methods_by_name) == {
        "Generate", "GenerateStream", "ModelInfo", "Abort"}
    assert protos.build(tmp_path) == out  # fresh: not rebuilt


def test_messages_are_typed_no_generic_maps():
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        for f in message.fields:
            assert not (f.message_type and f.message_type.GetOptions().map_entry), f"{message.name}.{f.name}"
            assert not (f.message_type and f.message_type.full_name.startswith("google.protobuf")), f.full_name
    stream = pb.DESCRIPTOR.services_by_name["Worker"].methods_by_name["GenerateStream"]
    assert stream.server_streaming and not stream.client_streaming


def test_sampling_params_mirror_the_engine():
    engine_fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(pb.SamplingParams.DESCRIPTOR.fields_by_name) == engine_fields


def test_sampling_round_trip():
    msg = sampling_to_proto(max_tokens=7, do_sample=False, top_p=0.5, stop="\n", stop_token_ids=[2], seed=3,
                            logprobs=None)
    kwargs = sampling_from_proto(msg)
    assert kwargs == {"max_new_tokens": 7, "temperature": 0.0, "top_p": 0.5, "stop": ["\n"],
                      "stop_token_ids": [2], "seed": 3}
    assert SamplingParams(**kwargs).greedy
    msg = sampling_to_proto(presence_penalty=0.5, frequency_penalty=-1.0, logit_bias={7: -100.0, 3: 2.5})
    assert sampling_from_proto(msg) == {"presence_penalty": 0.5, "frequency_penalty": -1.0,
                                        "logit_bias": {7: -100.0, 3: 2.5}}
    assert sampling_from_proto(sampling_to_proto(presence_penalty=0.0)) == {"presence_penalty": 0.0}
    assert sampling_from_proto(sampling_to_proto(prompt_logprobs=0)) == {"prompt_logprobs": 0}  # 0 is not unset
    with pytest.raises(ValueError, match="logit_bias"):
        sampling_to_proto(logit_bias=[(7, 1.0)])
    assert sampling_from_proto(pb.SamplingParams()) == {}  # unset = the engine's defaults
    with pytest.raises(ValueError, match="unknown sampling"):
        sampling_to_proto(max_length=3)
    with pytest.raises(ValueError, match="top_k"):
        sampling_to_proto(top_k="three")


def test_prompt_kinds():
    assert prompt_to_proto("hi").WhichOneof("kind") == "text"
    assert list(prompt_to_proto([1, 2]).token_ids.ids) == [1, 2]
    chat = prompt_to_proto([{"role": "user", "content": "hi"}])
    assert chat.chat.messages[0].role == "user"


def test_sse_events_survive_line_based_readers():
    """Generated text may hold U+2028, U+0085...: str.splitlines() (httpx.iter_lines) must
    still see one line per event."""
    import json

    from server.streams import sse
    event = sse({"text": "a\u2028b\x85c\u2029d\ne"})
    lines = [line for line in event.splitlines() if line]
    assert len(lines) == 1 and json.loads(lines[0][len("data: "):]) == {"text": "a\u2028b\x85c\u2029d\ne"}


def test_gateway_imports_no_torch():
    """The gateway process stays light: it never loads torch or transformers."""
    import subprocess
    code = "import sys, server.gateway, server.openai_api, server.legacy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
