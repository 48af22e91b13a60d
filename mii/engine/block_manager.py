"""Fixed-size KV blocks: reference-counted, with each sequence's block table, and an
automatic prefix cache.

Prefix caching (as vLLM's): once a block is full of computed tokens it is registered
under a hash of its tokens chained to the hash of the block before it, so a hash names
a whole prefix. A new (or preempted) sequence takes the registered blocks of its longest
cached prefix instead of computing them again: requests that share a system prompt or
a conversation's history skip that part of their prefill. A block whose last reference
goes stays registered among the free ones; new blocks are taken from the free ones
least recently released first, and taking a registered block unregisters it, so the
cache is the free blocks' LRU order and costs no memory of its own.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .sequence import Sequence

_ROOT = b"mii-prefix-root"  # the parent hash of a sequence's first block


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # refs 0, LRU first
        self.cached: dict[bytes, int] = {}  # prefix hash -> block
        self.key: dict[int, bytes] = {}  # registered block -> its prefix hash
        self.hit_tokens = 0  # prompt tokens taken from the cache, since start
        self.query_tokens = 0  # prompt tokens of every admission, since start

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold ``num_tokens`` tokens of K/V."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block, _ = self.free.popitem(last=False)
            key = self.key.pop(block, None)
            if key is not None:  # evicted: its prefix is no longer cached
                del self.cached[key]
            self.refs[block] = 1
            seq.block_table.append(block)

    def release(self, seq: Sequence) -> None:
        # Last block first, so a prefix's later blocks are evicted before its earlier ones,
        # which more sequences share.
        for block in reversed(seq.block_table):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
        seq.block_table.clear()
        seq.num_hashed = 0

    def match_prefix(self, seq: Sequence) -> int:
        """Give ``seq`` (holding no blocks) the cached blocks of its longest cached prefix;
        returns how many of its tokens they hold. The block with the last known token is
        never taken, so at least one token is computed and its logits sampled; nor is one
        holding prompt positions still to be scored for ``prompt_logprobs``, which need logits."""
        if not self.prefix_caching:
            return 0
        self.query_tokens += len(seq.token_ids)
        usable = (len(seq.token_ids) - 1) // self.block_size
        if seq.needs_prompt_scores:
            usable = min(usable, seq.prompt_scored // self.block_size)
        for i in range(usable):
            block = self.cached.get(self._hash(seq, i))
            if block is None:
                break
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
            seq.block_table.append(block)
        seq.num_hashed = len(seq.block_table)
        matched = len(seq.block_table) * self.block_size
        self.hit_tokens += matched
        return matched

    def unmatch(self, seq: Sequence) -> None:
        """Undo :meth:`match_prefix` for a sequence that was not admitted after all."""
        self.query_tokens -= len(seq.token_ids)
        self.hit_tokens -= len(seq.block_table) * self.block_size
        self.release(seq)

    def register(self, seq: Sequence) -> None:
        """Register ``seq``'s blocks that are now full of computed tokens known on the host
        (with asynchronous scheduling the last one may still be on the device). A block is
        registered when its step is launched: any step that reads it comes later on the
        same stream, after the K/V are written."""
        if not self.prefix_caching:
            return
        full = min(seq.num_computed, len(seq.token_ids)) // self.block_size
        for i in range(seq.num_hashed, full):
            h = self._hash(seq, i)
            block = seq.block_table[i]
            if h not in self.cached:  # else another sequence computed the same prefix first
                self.cached[h] = block
                self.key[block] = h
        seq.num_hashed = max(seq.num_hashed, full)

    def _hash(self, seq: Sequence, i: int) -> bytes:
        """The prefix hash of ``seq``'s block ``i``, remembered on the sequence (its tokens
        do not change, so neither do the hashes, also across preemption). SHA-256 rather
        than Python's hash: a collision would hand a request another prefix's K/V, and
        hash() of integers is easy to collide on purpose (vLLM moved to SHA-256 for that)."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) <= i:
            j = len(hashes)
            block = array("q", seq.token_ids[j * bs:(j + 1) * bs]).tobytes()
            hashes.append(hashlib.sha256((hashes[-1] if j else _ROOT) + block).digest())
        return hashes[i]

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks
