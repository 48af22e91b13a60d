"""A request as the engine tracks it: tokens, progress through them, and its KV blocks."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from mii.config import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass(eq=False, slots=True)
class Sequence:
    """One request. ``num_computed`` counts tokens whose K/V sit in the cache; the
    scheduler feeds ``token_ids[num_computed:]`` in chunks until it catches up, and only
    then is a new token sampled. Preemption resets ``num_computed`` to 0 (recompute).

    With asynchronous scheduling a step is launched before the previous step's tokens
    reach the host: ``num_pending`` counts tokens sampled on the device but not yet in
    ``token_ids``. Scheduling counts them (``num_tokens``); outputs do not."""

    request_id: str
    token_ids: list[int]
    num_prompt: int
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    num_pending: int = 0
    capped: bool = False  # its last token is in flight: the length limit is reached
    block_hashes: list[bytes] = field(default_factory=list, repr=False)  # prefix hashes of its full blocks (BlockManager)
    num_hashed: int = 0  # leading blocks of block_table registered in (or taken from) the prefix cache
    # prompt_logprobs: positions below prompt_scored have been scored (or are in flight);
    # their scores, for prompt tokens 1.., gather in prompt_scores until the first output.
    prompt_scored: int = 0
    prompt_scores: list[TokenLogprob] = field(default_factory=list, repr=False)

    @property
    def num_tokens(self) -> int:
        """Known tokens plus those in flight: what the KV cache and the scheduler see."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_generated(self) -> int:
        """Generated tokens on the host."""
        return len(self.token_ids) - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    def prompt_rows(self, start: int, end: int) -> range:
        """Positions in [start, end) whose logits score the next prompt token and are still
        unscored: each is scored once, even if preemption makes the prompt run again."""
        if self.params.prompt_logprobs is None:
            return range(0)
        return range(max(start, self.prompt_scored), min(end, self.num_prompt - 1))

    @property
    def needs_prompt_scores(self) -> bool:
        """Whether prompt positions remain to be scored (their K/V cannot come from the prefix cache)."""
        return self.params.prompt_logprobs is not None and self.prompt_scored < self.num_prompt - 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
