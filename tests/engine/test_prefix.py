"""Names of full KV cache blocks: a hash chain, so a block's name covers everything before it."""

from __future__ import annotations

import pytest

from neurond.engine.prefix import chain


def test_the_same_prefix_gets_the_same_names_and_an_earlier_difference_changes_every_later_one():
    a = chain(list(range(12)), 4, [], 3)
    assert len(a) == 3 and len(set(a)) == 3
    assert chain(list(range(12)) + [99, 98], 4, [], 3) == a  # what follows the blocks does not matter
    b = chain([100] + list(range(1, 12)), 4, [], 3)  # the first token differs
    assert all(x != y for x, y in zip(a, b, strict=True))
    c = chain(list(range(8)) + [0, 9, 10, 11], 4, [], 3)  # only the last block differs
    assert c[:2] == a[:2] and c[2] != a[2]


def test_a_block_s_name_depends_on_its_position_in_the_chain():
    same = [7] * 8
    first, second = chain(same, 4, [], 2)
    assert first != second  # the same tokens after a different prefix


def test_names_are_extended_in_place_and_only_whole_blocks_are_named():
    hashes: list[bytes] = []
    chain(list(range(6)), 4, hashes, 1)
    assert len(hashes) == 1
    assert chain(list(range(8)), 4, hashes, 2) is hashes and hashes == chain(list(range(8)), 4, [], 2)
    with pytest.raises(ValueError):
        chain(list(range(6)), 4, [], 2)  # the second block is not whole
