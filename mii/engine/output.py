"""What the engine hands back per step, and the incremental detokenizer with stop strings."""
from __future__ import annotations

from dataclasses import dataclass, field

from .sequence import TokenLogprob


@dataclass(slots=True)
class RequestOutput:
    """One step's progress of one request. ``text``/``token_ids`` are this step's delta;
    ``generated_text`` is everything so far (stop strings trimmed once finished)."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    generated_tokens: int
    generated_text: str = ""
    # With SamplingParams.prompt_logprobs, on the output carrying the first generated token:
    # one entry per prompt token, None for the first (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_token_ids: list[int] | None = None  # on a request's first output only


@dataclass(slots=True)
class Completion:
    """A finished request, as ``pipeline`` returns it."""

    request_id: str
    prompt: str | list[int]
    generated_text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # see RequestOutput

    def __str__(self) -> str:
        return self.generated_text


class Detokenizer:
    """Turns one sequence's tokens into text a piece at a time.

    Fast tokenizers use ``tokenizers``' own ``DecodeStream`` (one Rust call per token).
    Others decode a short window of tokens before the new ones (as TGI and vLLM do).
    Either way the first token is decoded after the prompt's tail, so that byte-level
    and sentencepiece pieces join with the right spacing, and nothing is emitted while
    the tail is an incomplete UTF-8 character. Text that could still become a stop
    string is held back, so a stop string never reaches a stream.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], skip_special_tokens: bool):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""      # all generated text, stop string trimmed
        self.emitted = 0    # chars of self.text already handed out
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is not None:
            from tokenizers.decoders import DecodeStream
            self.stream = DecodeStream(ids=prompt_ids[-6:], skip_special_tokens=skip_special_tokens)
        else:
            self.ids = list(prompt_ids)
            self.prefix_offset = max(len(prompt_ids) - 5, 0)
            self.read_offset = len(prompt_ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def _piece(self, token: int) -> str:
        """The text this token completes ("" while a character is still partial)."""
        if self.backend is not None:
            return self.stream.step(self.backend, token) or ""
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def add(self, token: int) -> bool:
        """Take the next generated token; True if a stop string hit."""
        piece = self._piece(token)
        if not piece:
            return False
        start = max(0, len(self.text) - self.holdback)
        self.text += piece
        if not self.stop:
            return False
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def take(self, finished: bool) -> str:
        """New text safe to emit: all of it once finished, else all but the hold-back."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
