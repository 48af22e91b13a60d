"""The incremental detokenizer against the tokenizer's own full decode, on the real
default model's byte-level BPE, through both paths (DecodeStream and the window)."""
import pytest
from transformers import AutoTokenizer

from mii.engine.output import Detokenizer

TEXT = "Hello, streaming world! The café costs 5€ — naïve 日本語 🙂 test.\n  Spaces   here, and   more."


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def _stream(tok, prompt: list[int], ids: list[int], window: bool, stop=()) -> tuple[str, list[str], bool]:
    d = Detokenizer(tok, prompt, list(stop), skip_special_tokens=True)
    if window:  # what a tokenizer without a Rust backend gets
        d.backend = None
        d.ids, d.prefix_offset, d.read_offset = list(prompt), max(len(prompt) - 5, 0), len(prompt)
    pieces, hit = [], False
    for t in ids:
        hit = d.add(t)
        pieces.append(d.take(hit))
        if hit:
            break
    return d.text, pieces, hit


@pytest.mark.parametrize("window", [False, True])
def test_streamed_text_equals_full_decode(tok, window):
    prompt = tok.encode("Say something:")
    ids = tok.encode(TEXT)
    text, pieces, _ = _stream(tok, prompt, ids, window)
    assert text == tok.decode(ids, skip_special_tokens=True) == "".join(pieces)
    assert all("\ufffd" not in p for p in pieces), "a partial UTF-8 character leaked into a piece"


@pytest.mark.parametrize("window", [False, True])
def test_stop_string_is_trimmed_and_never_streamed(tok, window):
    ids = tok.encode(TEXT)
    text, pieces, hit = _stream(tok, tok.encode("Go:"), ids, window, stop=["naïve"])
    assert hit and text == TEXT[:TEXT.index("naïve")] and "".join(pieces) == text
    assert not any("na" in p and "ï" in p for p in pieces)
