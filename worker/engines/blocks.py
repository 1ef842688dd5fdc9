"""Paged KV bookkeeping: which cache blocks each sequence holds, and the prefix cache. Plain Python.

The cache is `num_blocks` blocks of `block_size` token slots, allocated once. A sequence
holds a block table (block ids in position order); token `p` of a sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`.

Prefix cache: once a block is full and its tokens are computed, it is keyed by a hash of
the sequence's whole token prefix up to its end (chained: hash(parent hash, block tokens)),
so a later request whose prompt starts with the same tokens reuses it instead of
recomputing it. A block is never written once full, so sharing it cannot change anyone's
output. Unreferenced blocks go to a free list in LRU order; a cached block stays findable
there until it is handed out again (eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from worker.request import Sequence


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered in the prefix cache
    parent_hash: int | None = None
    tokens: tuple[int | str, ...] = ()  # its tokens and image digests (checked on a hit: a hash could collide)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need num_blocks >= 1 and block_size >= 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self._cached: dict[int, int] = {}  # prefix hash -> block id
        self.num_hit_tokens = 0  # prompt tokens served from the prefix cache, over the manager's life
        self.num_evicted_blocks = 0  # cached blocks handed out again (their prefix forgotten)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------ admission and growth

    def admit(self, seq: Sequence, max_new_tokens: int) -> int | None:
        """Give a sequence without blocks its cached prefix plus room for up to max_new_tokens more.

        Returns how many tokens it will compute in this step (the rest of its prompt after the
        cached prefix, capped by max_new_tokens), or None when the free blocks do not suffice
        (nothing is taken then). Sets seq.num_computed to the cached prefix length.
        """
        hits = self._match_prefix(seq)
        num_cached = len(hits) * self.block_size
        take = seq.chunk_end(num_cached, num_cached + min(seq.num_tokens - num_cached, max_new_tokens)) - num_cached
        if take <= 0:
            return None  # the budget left would cut an image: next step
        num_new_blocks = self.blocks_for(num_cached + take) - len(hits)
        num_hits_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # taking them shrinks the free list
        if num_new_blocks + num_hits_free > len(self._free):
            return None
        for block_id in hits:
            self._acquire(block_id)
        seq.block_table = list(hits)
        seq.num_computed = num_cached
        seq.num_cached_tokens = num_cached
        self.num_hit_tokens += num_cached
        for _ in range(num_new_blocks):
            seq.block_table.append(self._take_free())
        return take

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make the sequence's blocks hold num_tokens; False (nothing taken) when the free blocks do not suffice."""
        missing = self.blocks_for(num_tokens) - len(seq.block_table)
        if missing > len(self._free):
            return False
        for _ in range(missing):
            seq.block_table.append(self._take_free())
        return True

    def room(self, seq: Sequence) -> int:
        """How many more tokens the sequence could compute with its own blocks plus every free one."""
        return (len(seq.block_table) + len(self._free)) * self.block_size - seq.num_computed

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks (finished, aborted or preempted).

        The tail goes to the free list first, so under pressure a prompt's later blocks are
        evicted before its first ones, which more requests share."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"KV block {block_id} released twice")  # would hand one block to two sequences
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []

    def register_computed(self, seq: Sequence) -> None:
        """Put the sequence's newly full and computed blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed // self.block_size, len(seq.block_table))
        hashes = self._prefix_hashes(seq, num_full)
        for index in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[index]]
            if block.hash is None and hashes[index] not in self._cached:
                block.hash = hashes[index]
                block.parent_hash = hashes[index - 1] if index else None
                block.tokens = self._block_tokens(seq, index)
                self._cached[block.hash] = block.block_id
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    # ------------------------------------------------------------ internals

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks covering the longest prefix of the sequence's tokens, never its last token
        (that one's logits are needed, so at least one token is always computed)."""
        if not self.enable_prefix_caching:
            return []
        num_usable = (seq.num_tokens - 1) // self.block_size
        hashes = self._prefix_hashes(seq, num_usable)
        hits: list[int] = []
        for index in range(num_usable):
            block_id = self._cached.get(hashes[index])
            if block_id is None:
                break
            block = self.blocks[block_id]
            parent = hashes[index - 1] if index else None
            if block.parent_hash != parent or block.tokens != self._block_tokens(seq, index):
                break  # a hash collision: treat as a miss
            hits.append(block_id)
        return hits

    def _prefix_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Chained hashes of the sequence's first num_blocks full blocks (memoized on the sequence)."""
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            parent = hashes[-1] if hashes else None
            hashes.append(hash((parent, self._block_tokens(seq, len(hashes)))))
        return hashes

    def _block_tokens(self, seq: Sequence, index: int) -> tuple[int | str, ...]:
        """The block's tokens, then the pixel digest of every image whose tokens it holds: image placeholder
        tokens are all the same id, so without the digests two different images would share KV."""
        start = index * self.block_size
        end = start + self.block_size
        tokens = tuple(seq.token_slice(start, end))
        images = tuple(digest for first, last, digest in seq.image_spans if first < end and last > start)
        return tokens + images if images else tokens

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        """The least recently freed block; a cached one is evicted from the prefix cache."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
                self.num_evicted_blocks += 1
            block.hash, block.parent_hash, block.tokens = None, None, ()
        block.ref_count = 1
        return block_id
