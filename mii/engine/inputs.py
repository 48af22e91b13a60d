"""A step's model inputs, packed on the host into one flat int64 tensor: a header of
the sizes, the per-token and per-row values (int64), then the block tables and
per-sequence values (int32, two to a word). Reaching the device costs one asynchronous
copy, reaching another tensor-parallel rank one message, and a CUDA graph reads the
whole step, sizes included, from one fixed buffer (``kernels/step_inputs.py``)."""
from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from kernels.step_inputs import HEADER  # T tokens, B sequences, W table width, S logits rows, F fed ids
from mii.model.decoder import BatchContext
from .prompt_logprobs import PromptRows
from .scheduler import ScheduledSeq


@dataclass(slots=True)
class StepInputs:
    # int64 words: header [5] | ids [T] | positions [T] | slots [T] | logits rows [S] | feed dst [F]
    # | feed src [F], then int32 pairs: block tables [B, W] | cu_seqlens [B + 1] | context lens [B]
    data: torch.Tensor
    sizes: tuple[int, int, int, int, int]  # T, B, W, S, F as in the header
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
        return cls.of(ids, positions, slots, logits_idx, feed_dst, feed_src, tables, cu, ctx_lens, width, pin, prompt)

    @classmethod
    def of(cls, ids: list[int], positions: list[int], slots: list[int], rows: list[int], feed_dst: list[int],
           feed_src: list[int], tables: list[int], cu: list[int], ctx_lens: list[int], width: int, pin: bool,
           prompt: PromptRows | None = None) -> StepInputs:
        """Pack a step given field by field (``tables`` flat, ``width`` entries a sequence)."""
        sizes = (len(ids), len(ctx_lens), width, len(rows), len(feed_dst))
        words = array("q", sizes)
        words += array("q", ids + positions + slots + rows + feed_dst + feed_src)
        ints = array("i", tables + cu + ctx_lens)
        if len(ints) % 2:
            ints.append(0)
        words.frombytes(ints.tobytes())  # C conversions, about 2.5x faster than torch.tensor
        data = torch.frombuffer(words, dtype=torch.long)
        return cls(data.pin_memory() if pin else data, sizes, prompt)

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
        """Copy without blocking (pinned memory) and split. The fed ids are gathered from
        ``last_tokens`` (the last step's tokens by row) on the device, so the host never
        waits for the last step."""
        T, B, W, S, F = self.sizes
        data = self.data.to(device, non_blocking=True)
        n = HEADER + 3 * T + S + 2 * F
        ids, pos, slots, rows, dst, src = data[HEADER:n].split([T, T, T, S, F, F])
        tables, cu, ctx_lens = data[n:].view(torch.int32)[:B * W + 2 * B + 1].split([B * W, B + 1, B])
        if F:
            if last_tokens is None:
                raise RuntimeError(f"the step feeds {F} input ids from the last step, which sampled none")
            ids[dst] = last_tokens[src]
        ctx = BatchContext(positions=pos, slot_mapping=slots, block_tables=tables.view(B, W),
                           cu_seqlens_q=cu, context_lens=ctx_lens, logits_indices=rows)
        return ids, ctx

    # -- the wire between tensor-parallel ranks ---------------------------------------
    def header(self) -> torch.Tensor:
        return torch.tensor(self.sizes, dtype=torch.long)

    @staticmethod
    def words(sizes: list[int] | tuple[int, ...]) -> int:
        """int64 words of a step of these sizes (header included)."""
        T, B, W, S, F = sizes
        return HEADER + 3 * T + S + 2 * F + (B * W + 2 * B + 2) // 2

    @classmethod
    def from_wire(cls, header: list[int], data: torch.Tensor) -> StepInputs:
        return cls(data, tuple(header))
