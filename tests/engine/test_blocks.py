"""The leader's pool of KV cache blocks: all or nothing, given back once."""

from __future__ import annotations

import pytest

from neurond.engine.blocks import BlockPool, blocks_for, default_blocks


def test_blocks_for_rounds_up():
    assert [blocks_for(n, 16) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    assert BlockPool(4, 16).blocks_for(17) == 2


def test_default_is_the_static_cache_of_before():
    # Every slot its max_len positions and the trash column: 2049 positions are 129 blocks of 16.
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
