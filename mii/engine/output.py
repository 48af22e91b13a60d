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

    def __str__(self) -> str:
        return self.generated_text


class Detokenizer:
    """Turns one sequence's tokens into text a piece at a time.

    It decodes a short window of tokens before the new ones (as TGI and vLLM do), so
    that byte-level and sentencepiece pieces join with the right spacing, and waits
    while the tail is an incomplete UTF-8 character. Text that could still become a
    stop string is held back, so a stop string never reaches a stream.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], skip_special_tokens: bool):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.prefix_offset = max(len(prompt_ids) - 5, 0)
        self.read_offset = len(prompt_ids)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""      # all generated text, stop string trimmed
        self.emitted = 0    # chars of self.text already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, all_ids: list[int]) -> bool:
        """Take the sequence's full token list after a new token; True if a stop string hit."""
        prefix = self._decode(all_ids[self.prefix_offset:self.read_offset])
        full = self._decode(all_ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        start = max(0, len(self.text) - self.holdback)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(all_ids)
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
