"""The paged KV cache: block tables from the leader give the same attention inputs and the same tokens as the
static slot cache, and rows that do not fit are refused."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from neurond.protocol import BlockRow, PrefillChunk, SamplingParams  # noqa: E402
from neurond.worker.kv_cache import PagedKVCache, SlotKVCache  # noqa: E402
from neurond.worker.runner import ModelRunner  # noqa: E402
from tests.harness import ranks  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
BS = 4


def _cache(blocks: int, slots: int = 3, max_len: int = 21) -> PagedKVCache | SlotKVCache:
    if blocks == 0:
        return SlotKVCache(1, slots, max_len, 2, 3, torch.float32, torch.device("cpu"))
    return PagedKVCache(1, slots, max_len, 2, 3, torch.float32, torch.device("cpu"), BS, blocks)


def _write_all(cache, keys: torch.Tensor) -> None:
    """keys [slots, positions, heads, dim] written into every slot at positions 0.., as a prefill does."""
    slots, n = keys.shape[:2]
    rows = torch.arange(slots).view(slots, 1)
    pos = torch.arange(n).view(1, n).expand(slots, n)
    cache.bind(torch.arange(slots), rows, pos, cache.round_up(n))
    cache.write(0, keys, -keys)


def test_shuffled_blocks_read_what_the_slot_cache_reads():
    identity, paged = _cache(0), _cache(40)
    cols = paged.cols
    shuffled = random.Random(3).sample(range(40), 3 * cols)
    paged.apply(tuple(BlockRow(s, 0, tuple(shuffled[s * cols:(s + 1) * cols])) for s in range(3)))
    keys = torch.randn(3, 18, 2, 3)
    _write_all(identity, keys)
    _write_all(paged, keys)
    for rows in (slice(0, 3), torch.tensor([2, 0])):
        a = identity.k[0][rows, :, :20]
        b = paged.read(paged.k[0], rows, 20)
        assert a.shape == b.shape == (a.shape[0], 2, 20, 3)
        assert torch.equal(a[:, :, :18], b[:, :, :18])
    assert torch.equal(paged.read(paged.v[0], slice(0, 3), 20)[:, :, :18], -keys.transpose(1, 2))


def test_a_row_grows_by_columns_and_a_new_sequence_clears_the_rest():
    cache = _cache(40)
    cache.apply((BlockRow(1, 0, (7, 8)),))
    cache.apply((BlockRow(1, 2, (9,)),))
    assert cache.table[1, :4].tolist() == [7, 8, 9, cache.trash_block]
    cache.apply((BlockRow(1, 0, (3,)),))
    assert cache.table[1].tolist() == [3] + [cache.trash_block] * (cache.cols - 1)


@pytest.mark.parametrize("row", [BlockRow(3, 0, (1,)), BlockRow(0, 0, (40,)), BlockRow(0, 5, (1, 2)),
                                 BlockRow(0, -1, (1,))])
def test_rows_out_of_range_are_refused_before_anything_changes(row):
    cache = _cache(40)
    cache.apply((BlockRow(0, 0, (5,)),))
    before = cache.table.clone()
    with pytest.raises(ValueError, match="do not fit"):
        cache.apply((BlockRow(1, 0, (6,)), row))
    assert torch.equal(cache.table, before)


def test_the_slot_cache_takes_no_rows_and_block_sizes_are_powers_of_two():
    with pytest.raises(ValueError, match="static KV cache"):
        _cache(0).apply((BlockRow(0, 0, (1,)),))
    with pytest.raises(ValueError, match="power of two"):
        PagedKVCache(1, 2, 16, 1, 1, torch.float32, torch.device("cpu"), 12, 10)


def _run(runner: ModelRunner, prompts: dict[int, list[int]], steps: int, rows=None, grow=None) -> dict[int, list]:
    """Prefill each slot's prompt (in two chunks) and decode them together; `rows(slot, prompt)` gives the
    BlockRow sent with the prefill, `grow()` the rows sent with the decode."""
    out: dict[int, list[int]] = {s: [] for s in prompts}
    for s, prompt in prompts.items():
        half = len(prompt) // 2
        tables = (rows(s, prompt),) if rows else ()
        runner.apply_tables(tables)
        runner.prefill([PrefillChunk(s, tuple(prompt[:half]), 0, False, GREEDY, 0)])
        out[s].append(runner.prefill([PrefillChunk(s, tuple(prompt[half:]), half, True, GREEDY, 0)])[0])
    runner.apply_tables(grow() if grow else ())
    slots = tuple(sorted(prompts))
    tokens = runner.decode(slots, steps)
    for i, t in enumerate(tokens):
        out[slots[i % len(slots)]].append(t)
    return out


def test_runner_on_scattered_blocks_draws_the_slot_caches_tokens(shard):
    prompts = {0: list(range(5, 40)), 1: [9, 8, 7, 6, 5, 4, 3], 2: list(range(100, 123))}
    steps = 12
    identity = ranks.runner(shard, slots=3, max_len=96, kv_block_size=8)
    expected = _run(identity, prompts, steps)

    paged = ranks.runner(shard, slots=3, max_len=96, kv_block_size=8, kv_cache_blocks=30)
    free = random.Random(5).sample(range(30), 30)
    held: dict[int, list[int]] = {}

    def rows(slot, prompt):  # the prompt's blocks, and one for the first decode step if it starts a block
        held[slot] = [free.pop() for _ in range(-(-(len(prompt) + 1) // 8))]
        return BlockRow(slot, 0, tuple(held[slot]))

    def grow():  # blocks for every position the decode call writes
        out = []
        for slot, prompt in prompts.items():
            need = -(-(len(prompt) + steps) // 8) - len(held[slot])
            new = [free.pop() for _ in range(max(0, need))]
            if new:
                out.append(BlockRow(slot, len(held[slot]), tuple(new)))
                held[slot] += new
        return tuple(out)

    assert _run(paged, prompts, steps, rows, grow) == expected
    assert paged.info()["kv_layout"] == "paged" and identity.info()["kv_layout"] == "slots"


def test_copy_prefix_copies_into_the_destinations_blocks(shard):
    prompt = list(range(3, 30))
    runner = ranks.runner(shard, slots=3, max_len=64, kv_block_size=8, kv_cache_blocks=24)
    runner.apply_tables((BlockRow(0, 0, (20, 3, 11, 7)), BlockRow(2, 0, (1, 22, 5, 9))))
    runner.prefill([PrefillChunk(0, tuple(prompt[:-1]), 0, False, GREEDY, 0)])
    runner.copy_prefix(0, (2,), len(prompt) - 1)
    a = runner.prefill([PrefillChunk(0, tuple(prompt[-1:]), len(prompt) - 1, True, GREEDY, 0)])[0]
    b = runner.prefill([PrefillChunk(2, tuple(prompt[-1:]), len(prompt) - 1, True, GREEDY, 0)])[0]
    assert a == b
    tokens = runner.decode((0, 2), 6)  # step by step: slot 0's, then slot 2's
    assert tokens[0::2] == tokens[1::2]
