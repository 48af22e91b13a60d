"""A step's packed inputs against a plain per-token construction: decodes whose token is
known or still in flight (fed from the last step's tokens on the device), prefill chunks
from any offset, padded block tables, and the rows that sample."""
import random

import pytest
import torch

from kernels.step_inputs import fill_step_inputs_ref
from mii.config import SamplingParams
from mii.engine.inputs import StepInputs
from mii.engine.scheduler import ScheduledSeq
from mii.engine.sequence import Sequence

BS = 4


def make_seq(rng: random.Random, name: str, known: int, in_flight: bool, computed: int) -> Sequence:
    s = Sequence(name, [rng.randrange(5, 999) for _ in range(known)], max(1, known // 2), SamplingParams())
    s.num_pending = int(in_flight)
    s.num_computed = computed
    blocks = -(-s.num_tokens // BS)
    s.block_table = rng.sample(range(100), blocks)
    return s


def reference(batch: list[ScheduledSeq], last_rows: dict, last: torch.Tensor):
    ids, pos, slots, cu, ctx, rows = [], [], [], [0], [], []
    for item in batch:
        s = item.seq
        for p in range(s.num_computed, s.num_computed + item.num_tokens):
            ids.append(s.token_ids[p] if p < len(s.token_ids) else int(last[last_rows[s]]))
            pos.append(p)
            slots.append(s.block_table[p // BS] * BS + p % BS)
        cu.append(len(ids))
        ctx.append(s.num_computed + item.num_tokens)
        if item.samples:
            rows.append(len(ids) - 1)
    width = max(len(item.seq.block_table) for item in batch)
    tables = [item.seq.block_table + [0] * (width - len(item.seq.block_table)) for item in batch]
    return ids, pos, slots, cu, ctx, rows, tables


@pytest.mark.parametrize("seed", range(5))
def test_pack_matches_a_per_token_construction(seed):
    rng = random.Random(seed)
    batch, last_rows = [], {}
    for i in range(12):
        kind = rng.choice(["decode", "fed", "prefill", "chunk", "fed-chunk"])
        known = rng.randint(2, 30)
        if kind == "decode":  # its newest token is on the host and not yet computed
            s = make_seq(rng, f"s{i}", known, False, known - 1)
            n = 1
        elif kind == "fed":  # its newest token is still on the device
            s = make_seq(rng, f"s{i}", known, True, known)
            n = 1
        elif kind == "prefill":  # the whole prompt at once
            s = make_seq(rng, f"s{i}", known, False, 0)
            n = known
        elif kind == "chunk":  # a middle chunk: it does not sample
            s = make_seq(rng, f"s{i}", known, False, rng.randint(0, known - 2))
            n = rng.randint(1, known - s.num_computed - 1)
        else:  # catches up over known tokens and the one in flight
            s = make_seq(rng, f"s{i}", known, True, rng.randint(0, known - 1))
            n = s.num_tokens - s.num_computed
        if s.num_pending:
            last_rows[s] = rng.randrange(16)
        batch.append(ScheduledSeq(s, n))
    last = torch.randint(1000, 2000, (16,))
    inputs = StepInputs.pack(batch, BS, last_rows, pin=False)
    ids, ctx = inputs.to_device(torch.device("cpu"), last)
    want = reference(batch, last_rows, last)
    got = (ids.tolist(), ctx.positions.tolist(), ctx.slot_mapping.tolist(), ctx.cu_seqlens_q.tolist(),
           ctx.context_lens.tolist(), ctx.logits_indices.tolist(), ctx.block_tables.tolist())
    assert got == want
    assert inputs.num_fed == sum(1 for item in batch if item.seq.num_pending)
    assert ids.dtype == torch.long and ctx.block_tables.dtype == torch.int32
    # a CUDA graph's fill (its torch reference here) reads the same packed step alike
    T, B, W = len(want[0]), len(batch), len(want[6][0])
    out = dict(input_ids=torch.zeros(T, dtype=torch.long), positions=torch.zeros(T, dtype=torch.long),
               slots=torch.zeros(T, dtype=torch.long), tables=torch.zeros(B, W + 3, dtype=torch.int32),
               ctx_lens=torch.zeros(B, dtype=torch.int32), cu=torch.zeros(B + 1, dtype=torch.int32))
    fill_step_inputs_ref(out, inputs.data, last, T, B, mixed=True)
    assert (out["input_ids"].tolist(), out["positions"].tolist(), out["slots"].tolist(), out["cu"].tolist(),
            out["ctx_lens"].tolist(), out["tables"][:, :W].tolist()) == want[:5] + want[6:]
    wire = StepInputs.from_wire(inputs.header().tolist(), inputs.data.clone())
    assert inputs.data.numel() == StepInputs.words(inputs.sizes) and wire.sizes == inputs.sizes


def test_a_token_neither_known_nor_in_flight_is_an_error():
    rng = random.Random(0)
    s = make_seq(rng, "lost", 5, True, 5)  # pending, but the last step did not sample it
    with pytest.raises(RuntimeError, match="lost: input token 5"):
        StepInputs.pack([ScheduledSeq(s, 1)], BS, {}, pin=False)
    s.num_computed = 2
    with pytest.raises(RuntimeError, match="lost: input token 5"):
        StepInputs.pack([ScheduledSeq(s, 4)], BS, {}, pin=False)
