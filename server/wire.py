"""Translation between the typed gRPC messages and plain Python values.

The gateway and the worker both speak ``protos/mii.proto``; this module is the one place
that knows how a keyword argument becomes a proto field and back. It imports no torch, so
the gateway stays light.
"""
from __future__ import annotations

from typing import Any

from protos import mii_pb2 as pb

SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)
_REPEATED = {"stop", "stop_token_ids"}
_BIAS = "logit_bias"  # {token id: bias}, a list of TokenBias on the wire
FINISH_REASONS = {pb.STOP: "stop", pb.LENGTH: "length", pb.ABORT: "abort"}
_FINISH_CODES = {v: k for k, v in FINISH_REASONS.items()}


def sampling_to_proto(**kwargs: Any) -> pb.SamplingParams:
    """SamplingParams fields (None = leave unset, engine default) -> the proto message.

    Accepts the aliases ``max_tokens`` (max_new_tokens) and ``do_sample=False`` (greedy),
    like ``mii.SamplingParams.from_kwargs``; values are range-checked by the engine.
    """
    if kwargs.get("max_tokens") is not None:
        kwargs["max_new_tokens"] = kwargs.pop("max_tokens")
    kwargs.pop("max_tokens", None)
    if kwargs.pop("do_sample", None) is False and kwargs.get("temperature") is None:
        kwargs["temperature"] = 0.0
    unknown = sorted(set(kwargs) - set(SAMPLING_FIELDS))
    if unknown:
        raise ValueError(f"unknown sampling argument(s) {unknown}; known: {sorted(SAMPLING_FIELDS)}")
    msg = pb.SamplingParams()
    for name, value in kwargs.items():
        if value is None:
            continue
        try:
            if name in _REPEATED:
                getattr(msg, name).extend([value] if isinstance(value, str) else value)
            elif name == _BIAS:
                msg.logit_bias.extend(pb.TokenBias(token_id=t, bias=b) for t, b in value.items())
            else:
                setattr(msg, name, value)
        except (TypeError, ValueError, AttributeError) as e:  # AttributeError: a logit_bias that is no dict
            raise ValueError(f"{name}: invalid value {value!r} ({e})") from None
    return msg


def sampling_from_proto(msg: pb.SamplingParams) -> dict[str, Any]:
    """The fields that were set, as keyword arguments for ``mii.SamplingParams``."""
    kwargs: dict[str, Any] = {}
    for name in SAMPLING_FIELDS:
        if name in _REPEATED:
            values = list(getattr(msg, name))
            if values:
                kwargs[name] = values
        elif name == _BIAS:
            if msg.logit_bias:
                kwargs[name] = {e.token_id: e.bias for e in msg.logit_bias}
        elif msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    return kwargs


def prompt_to_proto(prompt: str | list[int] | list[dict]) -> pb.Prompt:
    """A text prompt, a list of token ids, or a chat (list of {role, content} dicts)."""
    if isinstance(prompt, str):
        return pb.Prompt(text=prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        return pb.Prompt(chat=pb.Chat(messages=[pb.ChatMessage(role=m["role"], content=m["content"])
                                                for m in prompt]))
    return pb.Prompt(token_ids=pb.TokenIds(ids=list(prompt)))


def finish_reason_code(reason: str | None) -> int:
    return _FINISH_CODES.get(reason, pb.FINISH_REASON_UNSPECIFIED)


def finish_reason_name(code: int) -> str | None:
    return FINISH_REASONS.get(code)
