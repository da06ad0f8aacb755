"""The leader's pool of KV cache blocks: all or nothing, given back once."""

from __future__ import annotations

import pytest

from neurond.engine.blocks import BlockPool, blocks_for, default_blocks


def test_blocks_for_rounds_up():
    assert [blocks_for(n, 16) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    assert BlockPool(4, 16).blocks_for(17) == 2


def test_default_is_the_static_cache_of_before():
    # Every slot its context_len positions and the trash column: 2049 positions are 129 blocks of 16.
    assert default_blocks(8, 2048, 16) == 8 * 129
    assert default_blocks(1, 15, 16) == 1 and default_blocks(1, 16, 16) == 2


def test_take_is_all_or_nothing_and_give_returns_them():
    pool = BlockPool(4, 16)
    a = pool.take(3)
    assert a == [0, 1, 2] and pool.free == 1 and pool.used == 3
    assert pool.take(2) is None and pool.free == 1  # nothing taken
    assert pool.take(0) == []
    pool.give(a)
    assert pool.free == 4 and pool.used == 0
    assert sorted(pool.take(4) or []) == [0, 1, 2, 3]


def test_giving_a_block_not_in_use_is_refused():
    pool = BlockPool(4, 16)
    a = pool.take(2)
    assert a is not None
    pool.give(a)
    with pytest.raises(ValueError):
        pool.give(a)  # twice: two sequences would later share them
    with pytest.raises(ValueError):
        pool.give([7])
    b = pool.take(1)
    assert b is not None
    with pytest.raises(ValueError):
        pool.give(b + b)
    assert pool.free == 3


def test_a_pool_needs_blocks():
    with pytest.raises(ValueError):
        BlockPool(0, 16)


def test_a_shared_block_is_freed_when_its_last_holder_gives_it_back():
    pool = BlockPool(4, 16)
    a = pool.take(2)
    assert a is not None
    pool.share(a[:1])
    pool.give(a)
    assert pool.used == 1 and pool.free == 3  # the shared one is still held
    pool.give(a[:1])
    assert pool.used == 0 and pool.free == 4
    with pytest.raises(ValueError):
        pool.share([3])  # free: nothing to share


def test_a_published_block_is_cached_when_released_and_shared_again():
    pool = BlockPool(4, 16)
    a = pool.take(3)
    assert a is not None
    pool.publish(a[0], b"h0")
    pool.publish(a[1], b"h1")
    pool.publish(a[2], b"h0")  # a known name: a[2] stays unnamed (and goes back to the free list)
    pool.give(a)
    assert pool.cached == 2 and pool.used == 0 and pool.free == 4  # cached blocks can still be taken
    assert pool.match([b"h0", b"h1", b"h2"]) == a[:2] and pool.match([b"h1"]) == [a[1]]
    assert pool.match([b"hx", b"h1"]) == []  # a chain starts at its first block
    pool.share(a[:2])
    assert pool.cached == 0 and pool.used == 2
    assert pool.take(3) is None  # the shared blocks are not evicted for it
    pool.give(a[:2])
    assert pool.cached == 2


def test_take_evicts_cached_blocks_least_recently_used_first_when_the_free_ones_are_short():
    pool = BlockPool(4, 16)
    a, b = pool.take(2), pool.take(2)
    assert a is not None and b is not None
    for i, block in enumerate(a + b):
        pool.publish(block, bytes([i]))
    pool.give(a)
    pool.give(b)  # b's blocks are the most recently used
    assert pool.free == 4 and pool.cached == 4
    taken = pool.take(1)
    # The oldest: a sequence's later block before its first (a later block is no use without the first).
    assert taken == [a[1]] and pool.match([bytes([0]), bytes([1])]) == [a[0]]
    assert pool.take(1) == [a[0]] and pool.match([bytes([2]), bytes([3])]) == b
    pool.share(b[:1])  # b's first block is used again
    pool.give(b[:1])
    assert pool.take(1) == [b[1]] and pool.cached == 1


def test_dropping_the_cache_frees_every_cached_block_and_forgets_every_name():
    pool = BlockPool(4, 16)
    a = pool.take(2)
    assert a is not None
    pool.publish(a[0], b"h0")
    pool.give(a)
    assert pool.drop_cached() == 1
    assert pool.cached == 0 and pool.free == 4 and pool.match([b"h0"]) == []
    assert sorted(pool.take(4) or []) == [0, 1, 2, 3]
