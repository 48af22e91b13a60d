"""A step's model inputs: packed on the host into two flat tensors (one per dtype), so
that reaching the device costs two asynchronous copies, not one per field, and
reaching another tensor-parallel rank costs one message."""
from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from mii.model.decoder import BatchContext
from .prompt_logprobs import PromptRows
from .scheduler import ScheduledSeq


@dataclass(slots=True)
class StepInputs:
    longs: torch.Tensor  # int64: ids | positions | slots | logits rows | feed dst | feed src
    ints: torch.Tensor   # int32: block tables [B, W] | cu_seqlens [B + 1] | context lens [B]
    sizes: tuple[int, int, int, int, int]  # T tokens, B sequences, W table width, S logits rows, F fed
    prompt: PromptRows | None = None  # rank 0 only: set when some rows score prompt positions

    @classmethod
    def pack(cls, batch: list[ScheduledSeq], block_size: int, last_rows: dict, pin: bool) -> StepInputs:
        """``last_rows`` maps each sequence sampled by the step still in flight to its row
        of that step's tokens: an input token not yet on the host is fed from there
        ("feed"), on the device.

        This runs on the host for every step, and at large decode batches the host bounds
        the step (Llama-1B at bs=128 on an H100), so a decode, the common row, takes a short
        path and the lists become tensors through ``array`` rather than ``torch.tensor``,
        which inspects every element."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        ctx_lens: list[int] = []
        logits_idx: list[int] = []
        feed_dst: list[int] = []
        feed_src: list[int] = []
        tables: list[int] = []
        score_rows: list[int] = []  # prompt_logprobs: indices into logits_idx that score a position,
        scored: list = []           # and (sequence, position) of each
        bs = block_size
        width = max(len(item.seq.block_table) for item in batch)
        pad = [0] * width
        t = 0  # tokens packed so far
        for item in batch:
            seq, n = item.seq, item.num_tokens
            start, table, tokens = seq.num_computed, seq.block_table, seq.token_ids
            end = start + n
            if n == 1:  # a decode (or a one-token chunk): one id, position and slot
                if start < len(tokens):
                    ids.append(tokens[start])
                else:
                    cls._feed(seq, start, last_rows, t, feed_dst, feed_src)
                    ids.append(0)
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                known = tokens[start:end]
                ids.extend(known)
                if len(known) < n:  # the last token is in flight from the previous step
                    if n - len(known) != 1:
                        raise RuntimeError(f"{seq.request_id}: input tokens {start + len(known)}..{end - 1} "
                                           f"are not known on the host")
                    cls._feed(seq, end - 1, last_rows, t + n - 1, feed_dst, feed_src)
                    ids.append(0)
                positions.extend(range(start, end))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if seq.params.prompt_logprobs is not None and (rows := seq.prompt_rows(start, end)):
                # before the sequence's sampling row, if any: the rows stay in token order
                score_rows.extend(range(len(logits_idx), len(logits_idx) + len(rows)))
                logits_idx.extend(range(t + rows.start - start, t + rows.stop - start))
                scored.extend((seq, p) for p in rows)
            t += n
            cu.append(t)
            ctx_lens.append(end)
            if end == seq.num_tokens:  # it catches up: its next token is sampled
                logits_idx.append(t - 1)
            tables += table
            if len(table) < width:
                tables += pad[len(table):]
        prompt = PromptRows.of(len(logits_idx), score_rows, scored) if scored else None
        longs = _tensor("q", ids + positions + slots + logits_idx + feed_dst + feed_src, pin)
        ints = _tensor("i", tables + cu + ctx_lens, pin)
        return cls(longs, ints, (t, len(batch), width, len(logits_idx), len(feed_dst)), prompt)

    @staticmethod
    def _feed(seq, index: int, last_rows: dict, row: int, feed_dst: list[int], feed_src: list[int]) -> None:
        """Input ``row`` takes the token the step in flight samples for ``seq``."""
        if seq not in last_rows:
            raise RuntimeError(f"{seq.request_id}: input token {index} is neither known "
                               f"nor sampled by the previous step")
        feed_dst.append(row)
        feed_src.append(last_rows[seq])

    @property
    def num_fed(self) -> int:
        return self.sizes[4]

    def to_device(self, device: torch.device, last_tokens: torch.Tensor | None) -> tuple[torch.Tensor, BatchContext]:
        """Copy without blocking (pinned memory) and split. With ``last_tokens`` the fed ids
        are gathered from it on the device, so the host never waits for the last step;
        without, they stay 0 for the caller to fill (tensor-parallel peers receive them)."""
        ids, ctx, feed = self.to_device_deferred(device, last_tokens)
        if feed is not None:
            dst, src, last = feed
            ids[dst] = last[src]
        return ids, ctx

    def to_device_deferred(self, device: torch.device, last_tokens: torch.Tensor | None
                           ) -> tuple[torch.Tensor, BatchContext, tuple | None]:
        """As :meth:`to_device`, but the feed is returned, as (dst, src, last_tokens), for the
        consumer to apply (``ids[dst] = last_tokens[src]``): a CUDA-graph step does it in the
        same launch that fills the graph's buffers."""
        T, B, W, S, F = self.sizes
        longs = self.longs.to(device, non_blocking=True)
        ints = self.ints.to(device, non_blocking=True)
        ids, pos, slots, rows, dst, src = longs.split([T, T, T, S, F, F])
        tables, cu, ctx_lens = ints.split([B * W, B + 1, B])
        ctx = BatchContext(positions=pos, slot_mapping=slots, block_tables=tables.view(B, W),
                           cu_seqlens_q=cu, context_lens=ctx_lens, logits_indices=rows)
        return ids, ctx, (dst, src, last_tokens) if F and last_tokens is not None else None

    # -- the wire between tensor-parallel ranks ---------------------------------------
    def header(self) -> torch.Tensor:
        return torch.tensor(self.sizes, dtype=torch.long)

    def payload(self) -> torch.Tensor:
        return torch.cat([self.longs, self.ints.long()])

    @classmethod
    def payload_size(cls, header: list[int]) -> int:
        T, B, W, S, F = header
        return 3 * T + S + 2 * F + B * W + 2 * B + 1

    @classmethod
    def from_wire(cls, header: list[int], payload: torch.Tensor) -> StepInputs:
        T, B, W, S, F = header
        n = 3 * T + S + 2 * F
        return cls(payload[:n], payload[n:].int(), tuple(header))


def _tensor(code: str, values: list[int], pin: bool) -> torch.Tensor:
    """int64 ("q") or int32 ("i") values as a CPU tensor, pinned for an asynchronous copy
    with ``pin``: the C conversion of ``array``, about 2.5x faster than ``torch.tensor``."""
    t = torch.frombuffer(array(code, values), dtype=torch.long if code == "q" else torch.int32)
    return t.pin_memory() if pin else t
