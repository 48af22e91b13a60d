"""Calibration: run a text through a :class:`DecoderModel` block by block and watch what
its linears are fed.

SmoothQuant (``mii.model.smooth``) and GPTQ (``mii.model.gptq``) both learn from the
inputs a layer really sees; this is the one place that produces them. The text
(``mii/data/calib_text.txt``, never the eval text) is cut into sequences of ``seq_len``
tokens that run as one packed prefill batch. Blocks hand on (x, residual) exactly as
``DecoderModel.forward`` does, so a caller can quantize block i and feed block i + 1
from the quantized block's output, as GPTQ's sequential recipe wants.

Attention uses one scratch KV cache that every layer shares: each layer writes the K/V
of all calibration tokens before it reads any, so nothing of another layer is ever seen.
Calibration is offline (``mii.quantize``) and runs at tensor_parallel=1.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .decoder import BatchContext, DecoderModel
from .ops import ops_for
from .quant_linear import Int8Act

CALIB_TEXT = "calib_text.txt"
CALIB_TOKENS = 2048  # enough for stable statistics of a 135M model; about 10 s of CPU per pass
SEQ_LEN = 512
_BLOCK = 16  # scratch KV-cache block size


def calib_text() -> str:
    """The shipped calibration text: English prose written for this repository, on other
    subjects than ``eval_text.txt`` so that the perplexity report is not fit to its own test."""
    return (resources.files("mii") / "data" / CALIB_TEXT).read_text(encoding="utf-8")


def calibration_ids(tokenizer, text: str | None = None, max_tokens: int = CALIB_TOKENS) -> list[int]:
    """Token ids of ``text`` (default: the shipped calibration text), at most ``max_tokens``."""
    ids = tokenizer.encode(calib_text() if text is None else text)[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"the calibration text has {len(ids)} tokens; calibration needs at least 2")
    return ids


class Calibrator:
    """Runs fixed calibration tokens through ``model``: ``embed()``, then ``block(i, ...)``
    for each layer in turn (or ``logits()`` for the whole forward)."""

    def __init__(self, model: DecoderModel, ids: list[int], seq_len: int = SEQ_LEN):
        if not ids:
            raise ValueError("calibration needs at least one token")
        self.model = model
        dev = model.final_norm.weight.device
        L = min(seq_len, len(ids), model.spec.max_positions)
        B = len(ids) // L  # the ragged tail is dropped: equal sequences keep the batch simple
        nb = -(-L // _BLOCK)
        self.input_ids = torch.tensor(ids[:B * L], device=dev)
        pos = torch.arange(L, device=dev)
        tables = torch.arange(B * nb, device=dev, dtype=torch.int32).view(B, nb)
        self.ctx = BatchContext(
            positions=pos.repeat(B),
            slot_mapping=(tables[:, :1].long() * _BLOCK + pos).flatten(),  # sequence b owns blocks b*nb ...
            block_tables=tables,
            cu_seqlens_q=torch.arange(0, B * L + 1, L, device=dev, dtype=torch.int32),
            context_lens=torch.full((B,), L, device=dev, dtype=torch.int32),
            logits_indices=torch.arange(B * L, device=dev))
        attn = model.layers[0].attn
        self.kv = torch.zeros(2, B * nb, _BLOCK, attn.kv_heads, attn.head_dim, dtype=model.dtype, device=dev)
        self.ops = ops_for(dev)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @contextmanager
    def _scratch_cache(self) -> Iterator[None]:
        attns = [layer.attn for layer in self.model.layers]
        saved = [(a.k_cache, a.v_cache) for a in attns]
        for a in attns:
            a.k_cache, a.v_cache = self.kv[0], self.kv[1]
        try:
            yield
        finally:
            for a, (k, v) in zip(attns, saved):
                a.k_cache, a.v_cache = k, v

    @torch.no_grad()
    def embed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, residual) entering the first block."""
        return self.model.embed_input(self.input_ids, self.ctx.positions, self.ops), None

    @torch.no_grad()
    def block(self, i: int, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) leaving block ``i``, given what entered it."""
        m = self.model
        with self._scratch_cache():
            return m.layers[i](x, residual, self.ctx, self.ops, m.cos_sin, m.alibi)

    @torch.no_grad()
    def run(self, progress: str | None = None) -> None:
        """One pass through every block (for hooks that observe it), with a progress bar
        titled ``progress`` if given."""
        x, residual = self.embed()
        for i in tqdm(range(len(self.model.layers)), desc=progress, unit="block", disable=progress is None):
            x, residual = self.block(i, x, residual)

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """[tokens, vocab] float32 logits of the whole model at every calibration token."""
        with self._scratch_cache():
            return self.model(self.input_ids, self.ctx, self.ops)


@contextmanager
def observe_inputs(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, x)`` with each module's input as a float [tokens, in_features] tensor
    whenever it runs, for as long as the context lasts."""
    def hook(name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if isinstance(x, Int8Act):  # only fp linears are observed: their norm hands them floats
                raise TypeError(f"{name}: calibration observes fp linears, got an int8 activation")
            fn(name, x.reshape(-1, x.shape[-1]).float())
        return pre
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
