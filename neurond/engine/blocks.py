"""The paged KV cache's blocks, as the leader hands them out.

Every rank's KV cache is a pool of `num_blocks` blocks of `block_size` positions per layer, and a block table
with a row per slot (worker side). The leader owns the blocks: this pool says which are free, the scheduler
takes them for a request as its sequence grows and gives them back when it leaves its slot, and the engine
sends the rows that changed (protocol.BlockRow) with the next command, so every rank's table is the same. Pure
bookkeeping: no I/O, nothing about requests (a request keeps the list of blocks it holds, in position order,
which is what its row is). With a paged cache, full blocks are shared between requests with the same prefix
(`prefix.py` names them; the scheduler says when a block may be shared): blocks are reference counted, and one
nobody holds any more stays cached under its hash until `take` needs it.
"""

from __future__ import annotations

import collections


def blocks_for(positions: int, block_size: int) -> int:
    """Blocks that hold `positions` positions (a partly used last block counts)."""
    return -(-max(positions, 0) // block_size)


def default_blocks(max_batch_size: int, context_len: int, kv_block_size: int) -> int:
    """What `kv_cache_blocks = 0` means: as many as the static cache of before held (every slot its context_len
    positions and the trash column), so with the default every running request can always grow to its end."""
    return max_batch_size * blocks_for(context_len + 1, kv_block_size)


class BlockPool:
    """The blocks and who holds them. A block is free, held (by one or more requests: a reference count), or
    cached: held by nobody but still holding the keys/values of a full block of some context, under that
    block's hash (`prefix.py`), for a later request with the same prefix to take again instead of prefilling
    it. `take` hands out free blocks first and then evicts cached ones, least recently used first, so the
    prefix cache only ever uses blocks nobody else could."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Handed out lowest first and given back to the front: a small working set of blocks is reused while
        # the cache is lightly loaded (the order is not otherwise significant).
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest block on top
        self._refs: dict[int, int] = {}  # held blocks: how many requests hold each
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # held by none: LRU first
        self._hash: dict[int, bytes] = {}  # block -> the hash of the full block it holds (held or cached)
        self._block: dict[bytes, int] = {}  # hash -> block

    @property
    def free(self) -> int:
        """Blocks `take` can hand out: free ones and cached ones (evicted for it)."""
        return len(self._free) + len(self._cached)

    @property
    def used(self) -> int:
        """Blocks held by requests."""
        return len(self._refs)

    @property
    def cached(self) -> int:
        """Blocks held by nobody that keep a full block of some context for a later request."""
        return len(self._cached)

    def blocks_for(self, positions: int) -> int:
        return blocks_for(positions, self.block_size)

    def take(self, n: int) -> list[int] | None:
        """`n` blocks for one holder, or None (and nothing taken) if fewer are free or cached: a sequence gets
        all it needs or waits, never a part it could not run with. Cached blocks are evicted (their hash
        forgotten) only when the free ones are too few, least recently used first."""
        if n > self.free:
            return None
        taken = []
        for _ in range(n):
            if self._free:
                taken.append(self._free.pop())
            else:
                block, _ = self._cached.popitem(last=False)
                del self._block[self._hash.pop(block)]
                taken.append(block)
        for block in taken:
            self._refs[block] = 1
        return taken

    def give(self, blocks: list[int]) -> None:
        """Blocks a sequence no longer holds. One that nobody holds then is cached if it has a hash (the most
        recently used), else free. Giving one that is not held is a bookkeeping bug: two sequences would later
        write into it."""
        if len(set(blocks)) != len(blocks) or any(b not in self._refs for b in blocks):
            raise ValueError(f"blocks {sorted(set(blocks) - set(self._refs)) or blocks} are not in use")
        # The last block first: the first goes on top of the free stack, and is the most recently used of the
        # cached ones (a later block is no use without the ones before it, so it is evicted first).
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                del self._refs[block]
                if block in self._hash:
                    self._cached[block] = None
                    self._cached.move_to_end(block)
                else:
                    self._free.append(block)

    def publish(self, block: int, block_hash: bytes) -> None:
        """A held block is full, and written: it holds the block of context `block_hash` names, for others to
        share. A no-op if that hash is known already (another block holds the same) or the block has one."""
        if block not in self._refs:
            raise ValueError(f"block {block} is not in use")
        if block_hash not in self._block and block not in self._hash:
            self._block[block_hash] = block
            self._hash[block] = block_hash

    def match(self, hashes: list[bytes]) -> list[int]:
        """The blocks that hold the longest run of `hashes` (a context's chain, first block first)."""
        blocks = []
        for h in hashes:
            block = self._block.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more holder for each of `blocks` (held or cached ones, from `match`)."""
        for block in blocks:
            if block in self._cached:
                del self._cached[block]
                self._refs[block] = 1
            elif block in self._refs:
                self._refs[block] += 1
            else:
                raise ValueError(f"block {block} is free: nothing to share")

    def drop_cached(self) -> int:
        """Forget every hash and free every cached block (the ranks' caches can no longer be trusted to hold
        what the hashes say). Returns how many were cached."""
        dropped = len(self._cached)
        self._free.extend(sorted(self._cached, reverse=True))
        self._cached.clear()
        self._hash.clear()
        self._block.clear()
        return dropped
