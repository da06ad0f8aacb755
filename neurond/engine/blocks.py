"""The paged KV cache's blocks, as the leader hands them out.

Every rank's KV cache is a pool of `num_blocks` blocks of `block_size` positions per layer, and a block table
with a row per slot (worker side). The leader owns the blocks: this pool says which are free, the scheduler
takes them for a request as its sequence grows and gives them back when it leaves its slot, and the engine
sends the rows that changed (protocol.BlockRow) with the next command, so every rank's table is the same. Pure
bookkeeping: no I/O, nothing about requests (a request keeps the list of blocks it holds, in position order,
which is what its row is and what a later prefix cache would share).
"""

from __future__ import annotations


def blocks_for(positions: int, block_size: int) -> int:
    """Blocks that hold `positions` positions (a partly used last block counts)."""
    return -(-max(positions, 0) // block_size)


def default_blocks(max_batch: int, max_len: int, block_size: int) -> int:
    """What `kv_cache_blocks = 0` means: as many as the static cache of before held (every slot its max_len
    positions and the trash column), so with the default every running request can always grow to its end."""
    return max_batch * blocks_for(max_len + 1, block_size)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Handed out lowest first and given back to the front: a small working set of blocks is reused while
        # the cache is lightly loaded (the order is not otherwise significant).
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest block on top
        self._used: set[int] = set()

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, positions: int) -> int:
        return blocks_for(positions, self.block_size)

    def take(self, n: int) -> list[int] | None:
        """`n` free blocks, or None (and nothing taken) if fewer are free: a sequence gets all it needs or
        waits, never a part it could not run with."""
        if n > len(self._free):
            return None
        taken = [self._free.pop() for _ in range(n)]
        self._used.update(taken)
        return taken

    def give(self, blocks: list[int]) -> None:
        """Blocks a sequence no longer holds. Giving one that is already free is a bookkeeping bug: two
        sequences would later share it and overwrite each other's cache."""
        if len(set(blocks)) != len(blocks) or not self._used.issuperset(blocks):
            raise ValueError(f"blocks {sorted(set(blocks) - self._used) or blocks} are not in use")
        self._used.difference_update(blocks)
        self._free.extend(reversed(blocks))
