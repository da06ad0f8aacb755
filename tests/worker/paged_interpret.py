"""Run by tests/worker/test_paged_attention.py in a process of its own with TRITON_INTERPRET=1 (Triton's CPU
interpreter must be chosen before triton is imported): the paged decode and prefill kernels against plain
attention, then a runner that reads the pool in place against the static slot cache's tokens.

    TRITON_INTERPRET=1 python tests/worker/paged_interpret.py BUILTIN_MODEL_DIR
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: this checkout's neurond and tests
from neurond.worker.paged_attention import paged_decode, paged_prefill  # noqa: E402
from tests.harness import ranks  # noqa: E402


def kernel_matches_plain_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    batch, q_heads, kv_heads, dim, bs, blocks = 3, 8, 2, 64, 16, 40
    lens = torch.tensor([1, 37, 100], dtype=torch.int32)
    k_pool = torch.randn(blocks + 1, bs, kv_heads, dim, generator=gen)
    v_pool = torch.randn(blocks + 1, bs, kv_heads, dim, generator=gen)
    table = torch.full((batch, 8), blocks, dtype=torch.long)
    order = torch.randperm(blocks, generator=gen).tolist()
    for b in range(batch):  # scattered blocks; the rest of each row points at the trash block
        n = -(-int(lens[b]) // bs)
        table[b, :n] = torch.tensor(order[:n])
        order = order[n:]
    query = torch.randn(batch, q_heads, dim, generator=gen)
    group = q_heads // kv_heads
    expected = []
    for b in range(batch):
        pos = torch.arange(int(lens[b]))
        k = k_pool[table[b, pos // bs], pos % bs].repeat_interleave(group, 1).transpose(0, 1)  # [Hq, L, D]
        v = v_pool[table[b, pos // bs], pos % bs].repeat_interleave(group, 1).transpose(0, 1)
        weights = (query[b].unsqueeze(1) @ k.transpose(1, 2) * dim ** -0.5).softmax(-1)  # [Hq, 1, L]
        expected.append((weights @ v).squeeze(1))
    for splits in (1, 2, 4):  # a split may be empty (row 0 has one position): it must weigh nothing
        got = paged_decode(query, k_pool, v_pool, table, lens, dim ** -0.5, splits, block_n=16)
        diff = (got - torch.stack(expected)).abs().max().item()
        assert diff < 1e-4, f"splits {splits}: max difference {diff}"


def prefill_kernel_matches_plain_attention() -> None:
    """Two rows of chunks at different starts (one padded), 3 query heads per KV head (a group padded to 4)."""
    gen = torch.Generator().manual_seed(1)
    q_heads, kv_heads, dim, bs, blocks, trash = 6, 2, 32, 8, 30, 200
    starts, counts, width = (0, 21), (19, 7), 19
    k_pool = torch.randn(blocks + 1, bs, kv_heads, dim, generator=gen)
    v_pool = torch.randn(blocks + 1, bs, kv_heads, dim, generator=gen)
    table = torch.full((2, 6), blocks, dtype=torch.long)
    table[0, :3] = torch.tensor([4, 17, 9])
    table[1, :4] = torch.tensor([2, 28, 11, 5])
    positions = torch.full((2, width), trash, dtype=torch.long)
    for b in range(2):
        positions[b, : counts[b]] = torch.arange(starts[b], starts[b] + counts[b])
    lens = torch.tensor([starts[b] + counts[b] for b in range(2)], dtype=torch.int32)
    query = torch.randn(2, width, q_heads, dim, generator=gen).transpose(1, 2)  # [B, Hq, T, D], strided
    group = q_heads // kv_heads
    got = paged_prefill(query, k_pool, v_pool, table, positions, lens, dim ** -0.5, block_q=4, block_n=16)
    for b in range(2):
        pos = torch.arange(int(lens[b]))
        k = k_pool[table[b, pos // bs], pos % bs].repeat_interleave(group, 1).transpose(0, 1)  # [Hq, L, D]
        v = v_pool[table[b, pos // bs], pos % bs].repeat_interleave(group, 1).transpose(0, 1)
        n = counts[b]
        scores = query[b, :, :n] @ k.transpose(1, 2) * dim ** -0.5  # [Hq, n, L]
        seen = pos.view(1, -1) <= positions[b, :n].view(-1, 1)
        expected = scores.masked_fill(~seen, float("-inf")).softmax(-1) @ v
        diff = (got[b, :, :n] - expected).abs().max().item()
        assert diff < 1e-4, f"row {b}: max difference {diff}"


def inactive_rows_read_one_position() -> None:
    """A decode batch's inactive rows write to the trash column; the kernel must not read their whole window."""
    from neurond.worker.kv_cache import PagedKVCache

    cache = PagedKVCache(1, 3, 4096, 1, 16, torch.float32, torch.device("cpu"), 16, 4, in_place=True)
    cache.bind(slice(0, 3), torch.arange(3).view(3, 1), torch.tensor([[5], [cache.trash], [0]]), 256)
    assert cache._read is not None and cache._read[1].tolist() == [6, 1, 1]


def runner_reads_in_place_like_the_slot_cache(model_dir: str) -> None:
    from neurond.protocol import BlockRow, PrefillChunk, SamplingParams

    greedy = SamplingParams(temperature=0.0)
    shard = ranks.load_shard(model_dir, torch.device("cpu"), "float32")
    prompts = {0: list(range(5, 40)), 1: [9, 8, 7, 6, 5, 4, 3], 2: list(range(100, 123))}
    steps, bs = 10, 8

    def run(runner, rows=None) -> list[int]:
        out = []
        for s, prompt in prompts.items():
            runner.apply_tables(rows[s] if rows else ())
            out.append(runner.prefill([PrefillChunk(s, tuple(prompt), 0, True, greedy, 0)])[0])
        return out + runner.decode(tuple(prompts), steps)

    def make(**kw):
        return ranks.runner(shard, slots=3, max_len=96, kv_block_size=bs, **kw)

    expected = run(make())
    free = random.Random(3).sample(range(36), 36)
    rows = {s: (BlockRow(s, 0, tuple(free.pop() for _ in range(-(-(len(p) + steps) // bs)))),)
            for s, p in prompts.items()}
    paged = make(kv_cache_blocks=36, paged_in_place=True)
    assert paged.info()["kv_reads"] == "in_place"
    got = run(paged, rows)
    assert got == expected, (got, expected)


if __name__ == "__main__":
    kernel_matches_plain_attention()
    prefill_kernel_matches_plain_attention()
    inactive_rows_read_one_position()
    runner_reads_in_place_like_the_slot_cache(sys.argv[1])
    print("ok")
