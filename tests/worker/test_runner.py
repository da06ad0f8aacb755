"""The runner (slot KV cache, own attention, chunked prefill, batched decode) against transformers' generate."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from neurond.protocol import PrefillChunk, SamplingParams  # noqa: E402
from neurond.worker.graphs import batch_bucket  # noqa: E402
from neurond.worker.runner import ModelRunner  # noqa: E402
from tests.harness import ranks  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


def make_runner(shard, slots=4, max_len=256) -> ModelRunner:
    return ranks.runner(shard, slots=slots, max_len=max_len)


def reference(model, prompt: list[int], n: int) -> list[int]:
    from neurond.worker import attention

    saved = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    finally:
        model.config._attn_implementation = saved if saved != attention.NAME else attention.NAME
    return out[0, len(prompt):].tolist()


def prefill(runner, slot, tokens, start, last, sampling, drawn):
    return runner.prefill([PrefillChunk(slot, tuple(tokens), start, last, sampling, drawn)])[0]


def generate(runner: ModelRunner, slot: int, prompt: list[int], n: int, chunk: int = 1000) -> list[int]:
    out = []
    for start in range(0, len(prompt), chunk):
        piece = tuple(prompt[start : start + chunk])
        tok = prefill(runner, slot, piece, start, start + len(piece) == len(prompt), GREEDY, 0)
    out.append(tok)
    while len(out) < n:
        out += runner.decode((slot,))
    return out


PROMPTS = [[5, 17, 300, 42, 7, 99, 123], [1, 2, 3], list(range(40, 90))]


def test_greedy_matches_transformers(shard):
    want = [reference(shard.model, p, 12) for p in PROMPTS]
    runner = make_runner(shard)
    assert [generate(runner, 0, p, 12) for p in PROMPTS] == want


def test_chunked_prefill_matches_one_chunk(shard):
    runner = make_runner(shard)
    prompt = PROMPTS[2]
    assert generate(runner, 1, prompt, 10, chunk=7) == generate(runner, 2, prompt, 10)


def test_batched_decode_matches_each_alone(shard):
    """Sequences at different positions decode together (rows join and leave) with the same tokens."""
    alone = [generate(make_runner(shard), 0, p, 10) for p in PROMPTS]
    runner = make_runner(shard)
    got: dict[int, list[int]] = {}
    slots = {0: PROMPTS[0], 2: PROMPTS[1]}  # slot 1 stays empty: an inactive row inside the batch
    for slot, prompt in slots.items():
        got[slot] = [prefill(runner, slot, tuple(prompt), 0, True, GREEDY, 0)]
    for step in range(9):
        if step == 3:  # a third sequence joins mid-way
            got[3] = [prefill(runner, 3, tuple(PROMPTS[2]), 0, True, GREEDY, 0)]
        active = tuple(s for s in got if len(got[s]) < 10)
        for slot, tok in zip(active, runner.decode(active), strict=True):
            got[slot].append(tok)
    got[3] += runner.decode((3,)) + runner.decode((3,)) + runner.decode((3,))
    assert [got[0], got[2], got[3]] == alone


def test_sampling_is_a_function_of_seed_and_position(shard):
    """A replay (prefill of prompt + tokens so far, continuing the draw count) draws what the original drew."""
    runner = make_runner(shard)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    prompt = PROMPTS[0]
    first = [prefill(runner, 0, tuple(prompt), 0, True, params, 0)]
    first += [runner.decode((0,))[0] for _ in range(11)]
    replay = make_runner(shard)
    got = first[:5]
    got.append(prefill(replay, 1, tuple(prompt + got), 0, True, params, 5))
    got += [replay.decode((1,))[0] for _ in range(6)]
    assert got == first
    other = make_runner(shard)
    params2 = SamplingParams(temperature=1.0, top_p=0.9, seed=99)
    third = [prefill(other, 0, tuple(prompt), 0, True, params2, 0)] + [other.decode((0,))[0] for _ in range(11)]
    assert third != first  # a different seed draws differently (12 tokens at temperature 1)


def test_refuses_a_prefill_past_the_slot(shard):
    runner = make_runner(shard, max_len=16)
    with pytest.raises(ValueError, match="does not fit"):
        prefill(runner, 0, tuple(range(20)), 0, True, GREEDY, 0)


def test_batch_buckets():
    assert [batch_bucket(n, 32) for n in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]
    assert batch_bucket(7, 6) == 6


def test_decode_across_a_kv_bucket_boundary(shard):
    """Decode attention reads a power-of-two prefix of the cache; a sequence growing past 256 positions moves
    to the next bucket without changing what it generates."""
    prompt = [(7 * i) % 900 + 20 for i in range(250)]
    want = reference(shard.model, prompt, 12)
    assert generate(make_runner(shard, max_len=600), 0, prompt, 12) == want


def test_prefill_of_several_sequences_in_one_step(shard):
    """Chunks of different sequences, lengths and start positions in one padded forward pass give each the
    tokens it gets alone."""
    alone = [generate(make_runner(shard), 0, p, 6) for p in PROMPTS]
    runner = make_runner(shard)
    # sequence 2 is already half prefilled; 0 and 1 start now
    prefill(runner, 3, PROMPTS[2][:30], 0, False, GREEDY, 0)
    first = runner.prefill([PrefillChunk(0, tuple(PROMPTS[0]), 0, True, GREEDY, 0),
                            PrefillChunk(1, tuple(PROMPTS[1][:2]), 0, False, GREEDY, 0),
                            PrefillChunk(3, tuple(PROMPTS[2][30:]), 30, True, GREEDY, 0)])
    assert first[1] == -1
    second = prefill(runner, 1, PROMPTS[1][2:], 2, True, GREEDY, 0)
    got = {0: [first[0]], 1: [second], 3: [first[2]]}
    for _ in range(5):
        for slot, tok in zip((0, 1, 3), runner.decode((0, 1, 3)), strict=True):
            got[slot].append(tok)
    assert [got[0], got[1], got[3]] == alone


def test_one_chunk_per_slot_per_step(shard):
    with pytest.raises(ValueError, match="one chunk per slot"):
        make_runner(shard).prefill([PrefillChunk(0, (1, 2), 0, False, GREEDY, 0),
                                    PrefillChunk(0, (3,), 2, True, GREEDY, 0)])
