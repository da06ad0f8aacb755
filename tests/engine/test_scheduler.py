"""The pure scheduler and the fault blame, without an engine loop, a pool or asyncio."""

from __future__ import annotations

from neurond import protocol as p
from neurond.engine.blame import blame
from neurond.engine.request import GenerationRequest
from neurond.engine.scheduler import Scheduler
from neurond.pool.faults import PoolUnavailable, RankDied, RankFailed

GREEDY = p.SamplingParams(temperature=0.0)


def req(name: str, prompt_len: int = 5, **kw) -> GenerationRequest:
    return GenerationRequest(name, list(range(1, prompt_len + 1)), 8, GREEDY, **kw)


def admitted(s: Scheduler) -> list[str]:
    return [r.request_id for r in s.running]


def test_admission_takes_the_lowest_free_slots_oldest_first():
    s = Scheduler(max_batch_size=2, prefill_chunk_tokens=100)
    a, b, c = req("a"), req("b"), req("c")
    s.queue([a])
    s.queue([b])
    s.queue([c])
    started = []
    s.admit(started.append)
    assert admitted(s) == ["a", "b"] and (a.slot, b.slot) == (0, 1) and started == [a, b]
    s.release(a)
    s.admit(started.append)
    assert c.slot == 0 and admitted(s) == ["b", "c"]


def test_prefill_chunks_share_the_budget_and_a_struck_request_goes_alone():
    s = Scheduler(max_batch_size=4, prefill_chunk_tokens=8)
    a, b, c = req("a", 6), req("b", 6), req("c", 6)
    for r in (a, b, c):
        s.queue([r])
    s.admit(lambda r: None)
    assert [(r.request_id, n) for r, n in s.prefill_batch()] == [("a", 6), ("b", 2)]
    b.faults = 1
    assert [(r.request_id, n) for r, n in s.prefill_batch()] == [("a", 6)]  # b was struck: not batched with a
    a.decoding, c.decoding = True, True
    assert [(r.request_id, n) for r, n in s.prefill_batch()] == [("b", 6)]
    b.decoding = True
    assert [[r.request_id for r in batch] for batch in s.decode_batches()] == [["a", "c"], ["b"]]


def test_a_prefill_call_reads_at_most_one_context_window_of_keys():
    """Rows x the longest row's end stays within context_len (what the ranks measure a step with when they size
    their cache from memory); one row always goes, however long."""
    s = Scheduler(max_batch_size=4, prefill_chunk_tokens=100, context_len=40)
    a, b, c, d = req("a", 30), req("b", 5), req("c", 5), req("d", 5)
    for r in (a, b, c, d):
        s.queue([r])
    s.admit(lambda r: None)
    assert [(r.request_id, n) for r, n in s.prefill_batch()] == [("a", 30)]  # 2 rows x 30 > 40
    a.prefilled = 30
    a.decoding = True
    assert [(r.request_id, n) for r, n in s.prefill_batch()] == [("b", 5), ("c", 5), ("d", 5)]  # 3 x 5 <= 40


def test_n_choices_prefill_the_shared_prompt_once_and_copy_it():
    s = Scheduler(max_batch_size=4, prefill_chunk_tokens=100)
    members = [req(f"x-{i}", 6) for i in range(3)]
    s.queue(members)
    s.admit(lambda r: None)
    batch = s.prefill_batch()
    assert [(r.request_id, n) for r, n in batch] == [("x-0", 5)]  # the shared part: all but the last token
    members[0].prefilled = 5
    (group, source, targets), = s.copies()
    assert source is members[0] and targets == members[1:]


def test_an_interrupt_puts_running_requests_back_first_in_their_order():
    s = Scheduler(max_batch_size=2, prefill_chunk_tokens=100)
    a, b, c = req("a"), req("b"), req("c")
    for r in (a, b, c):
        s.queue([r])
    s.admit(lambda r: None)
    a.prefilled = 3
    assert s.interrupt(42.0) == [a, b]
    assert list(s.waiting) == [a, b, c] and a.slot is None and a.prefilled == 0 and a.interrupted_at == 42.0
    c.cancelled = True
    assert s.cancelled() == [] and list(s.waiting) == [a, b]


def test_blame_fails_a_lone_request_that_raised_and_strikes_everyone_else():
    a, b = req("a"), req("b")
    raised = RankFailed(1, p.FaultKind.EXCEPTION, "boom")
    ((who, failed, quarantined),) = blame(raised, [a], max_request_faults=2)
    assert who is a and failed.code == "rank_failed" and failed.status == 500 and not quarantined
    assert blame(raised, [a, b], max_request_faults=2) == [] and (a.faults, b.faults) == (1, 1)
    ((who, failed, quarantined),) = blame(RankDied(0, -9), [a], max_request_faults=2)
    assert who is a and quarantined and failed.code == "request_quarantined"
    assert blame(PoolUnavailable(None, "reloading"), [b], max_request_faults=1) == [] and b.faults == 1


# ---------------------------------------------------------------------------------------------- paged KV cache
def paged(blocks: int, max_batch_size: int = 4, block_size: int = 4, context_len: int = 64) -> Scheduler:
    return Scheduler(max_batch_size=max_batch_size, prefill_chunk_tokens=100, context_len=context_len,
                     kv_cache_blocks=blocks, kv_block_size=block_size)


def prefilled(r: GenerationRequest, *drawn: int) -> None:
    """What the engine does after `r`'s last prefill chunk: its context is in the cache, its first token drawn
    (not in the cache yet: the next decode step writes it)."""
    r.prefilled, r.decoding = len(r.context), True
    r.generated.extend(drawn or (1,))


def test_the_static_cache_counts_blocks_but_never_waits_preempts_or_sends_rows():
    # kv_cache_blocks=0: static slots
    s = Scheduler(max_batch_size=2, prefill_chunk_tokens=100, context_len=64, kv_block_size=4)
    a, b = req("a", 60), req("b", 60)
    s.queue([a])
    s.queue([b])
    s.admit(lambda r: None)
    assert admitted(s) == ["a", "b"] and s.take_rows() == ()
    for r in (a, b):
        prefilled(r)
    assert s.reserve_decode([a, b], 8) == [a, b] and s.preemptions == 0 and s.take_rows() == ()


def test_admission_waits_for_blocks_and_nobody_overtakes_the_oldest():
    s = paged(blocks=4)
    a, b, c = req("a", 7), req("b", 11), req("c", 1)  # need 2, 3 and 1 blocks of 4 (context + first step)
    for r in (a, b, c):
        s.queue([r])
    s.admit(lambda r: None)
    assert admitted(s) == ["a"] and a.blocks == [0, 1] and s.pool.free == 2
    assert [r.request_id for r in s.waiting] == ["b", "c"]  # c would fit, but b is older
    s.release(a)
    assert a.blocks == [] and s.pool.free == 4  # release gives the blocks back
    s.admit(lambda r: None)
    assert admitted(s) == ["b", "c"] and len(b.blocks) == 3 and len(c.blocks) == 1 and s.pool.free == 0


def test_rows_are_sent_whole_on_admission_and_grow_at_block_boundaries():
    s = paged(blocks=8)
    a = req("a", 7)
    s.queue([a])
    s.admit(lambda r: None)
    assert s.take_rows() == (p.BlockRow(0, 0, (0, 1)),) and s.take_rows() == ()
    prefilled(a)  # context 8: positions 0..6 cached, the first decode step writes position 7
    assert s.reserve_decode([a], 1) == [a] and s.take_rows() == ()  # 8 positions: still 2 blocks
    a.generated.append(2)  # context 9: the next step writes position 8, the first of a third block
    assert s.reserve_decode([a], 1) == [a] and s.take_rows() == (p.BlockRow(0, 2, (2,)),)
    # 4 steps write positions 8..11 (3 blocks, held); 5 steps reach position 12, a fourth block.
    assert s.reserve_decode([a], 4) == [a] and s.take_rows() == ()
    s.reserve_decode([a], 5)
    assert a.blocks == [0, 1, 2, 3] and s.take_rows() == (p.BlockRow(0, 3, (3,)),)
    # Growth before the ranks saw the row joins the pending row.
    b = req("b", 3)
    s.queue([b])
    s.admit(lambda r: None)
    prefilled(b, 5, 6)  # context 5: writes from position 4
    s.reserve_decode([b], 1)
    assert s.take_rows() == (p.BlockRow(1, 0, (4, 5)),)


def test_growth_is_capped_by_the_requests_own_end():
    s = paged(blocks=8)
    a = GenerationRequest("a", [1, 2, 3], 5, GREEDY)  # at most 8 positions: 2 blocks, however many steps
    s.queue([a])
    s.admit(lambda r: None)
    prefilled(a)
    s.reserve_decode([a], 8)
    assert len(a.blocks) == 2 and s.never_fits(a) is None


def test_a_short_pool_preempts_the_request_admitted_last_and_requeues_it_first():
    s = paged(blocks=5)
    a, b, c = (GenerationRequest(name, list(range(1, 8)), 40, GREEDY) for name in "abc")
    for r in (a, b, c):
        s.queue([r])
    s.admit(lambda r: None)
    assert admitted(s) == ["a", "b"] and s.pool.free == 1 and [r.request_id for r in s.waiting] == ["c"]
    prefilled(a, 1, 2)
    prefilled(b, 1, 2)  # both at context 9: their next step writes position 8, in a third block each
    s.take_rows()
    assert s.reserve_decode([a, b], 1) == [a]  # a took the last free block; b, the newest, gave its back
    assert s.preemptions == 1 and b.slot is None and b.blocks == [] and b.prefilled == 0 and not b.decoding
    assert b.generated == [1, 2]  # replayed later: prompt + what it generated so far
    assert [r.request_id for r in s.waiting] == ["b", "c"] and admitted(s) == ["a"]
    assert s.take_rows() == (p.BlockRow(0, 2, (a.blocks[2],)), p.BlockRow(1, 0, ()))
    assert s.pool.free == 2
    s.admit(lambda r: None)
    assert admitted(s) == ["a"]  # b needs 3 blocks (context 9 + 1 step), 2 are free: it waits, so does c


def test_the_older_request_growing_preempts_the_newest_not_itself():
    s = paged(blocks=4)
    a = GenerationRequest("a", list(range(1, 8)), 40, GREEDY)
    d = req("d", 3)
    s.queue([a])
    s.queue([d])
    s.admit(lambda r: None)
    assert admitted(s) == ["a", "d"] and s.pool.free == 1  # 2 blocks and 1
    prefilled(a, *range(5))  # context 12: the next step writes position 11, in a's third block (the free one)
    prefilled(d)
    assert s.reserve_decode([a, d], 1) == [a, d] and s.preemptions == 0 and s.pool.free == 0
    a.generated.append(9)  # position 12: a fourth block, none free
    assert s.reserve_decode([a, d], 1) == [a] and s.preemptions == 1 and d.slot is None
    assert list(s.waiting) == [d] and len(a.blocks) == 4 and s.pool.free == 0


def test_an_interrupt_sends_every_row_afresh():
    s = paged(blocks=8, max_batch_size=3)
    a, b = req("a", 3), req("b", 3)
    s.queue([a])
    s.queue([b])
    s.admit(lambda r: None)
    s.take_rows()
    s.interrupt(now=1.0)
    assert s.pool.free == 8
    assert s.take_rows() == (p.BlockRow(0, 0, ()), p.BlockRow(1, 0, ()), p.BlockRow(2, 0, ()))
    s.interrupt(now=2.0)
    s.admit(lambda r: None)
    assert s.take_rows() == (p.BlockRow(0, 0, tuple(a.blocks)), p.BlockRow(1, 0, tuple(b.blocks)),
                             p.BlockRow(2, 0, ()))


def test_n_choices_each_hold_blocks_for_the_copied_prompt():
    s = paged(blocks=8)
    members = [req(f"x-{i}", 6) for i in range(3)]
    s.queue(members)
    s.admit(lambda r: None)
    assert [len(m.blocks) for m in members] == [2, 2, 2]  # 6 + 1 positions each: the copy has its blocks
    assert s.take_rows() == tuple(p.BlockRow(m.slot, 0, tuple(m.blocks)) for m in members)
    assert len({b for m in members for b in m.blocks}) == 6


def test_with_the_default_pool_nothing_waits_for_blocks_or_is_preempted():
    # kv_cache_blocks=0: 3 x blocks of 41 positions
    s = Scheduler(max_batch_size=3, prefill_chunk_tokens=100, context_len=40)
    reqs = [GenerationRequest(f"r{i}", list(range(1, 11)), 30, GREEDY) for i in range(3)]  # to position 40
    for r in reqs:
        s.queue([r])
    s.admit(lambda r: None)
    assert admitted(s) == ["r0", "r1", "r2"]
    for r in reqs:
        prefilled(r)
    while reqs[0].max_tokens > len(reqs[0].generated):
        assert s.reserve_decode(reqs, 8) == reqs
        for r in reqs:
            r.generated.append(1)
    assert s.preemptions == 0 and s.pool.free >= 0


def test_a_request_that_can_never_fit_is_named_with_its_numbers():
    s = paged(blocks=4, context_len=64)  # 16 positions in all
    assert s.never_fits(GenerationRequest("a", [1] * 10, 6, GREEDY)) is None
    why = s.never_fits(GenerationRequest("b", [1] * 10, 7, GREEDY))
    assert why is not None and "17 tokens" in why and "5 KV cache blocks" in why and "4 blocks" in why \
        and "16 positions" in why


# ---------------------------------------------------------------- prefix cache (paged cache only)


def cached_scheduler(blocks: int = 16, max_batch_size: int = 4) -> Scheduler:
    return Scheduler(max_batch_size=max_batch_size, prefill_chunk_tokens=100, context_len=64, kv_cache_blocks=blocks,
                     kv_block_size=4)


def ask(name: str, prompt: list[int], max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(name, list(prompt), max_tokens, GREEDY)


def drew(r: GenerationRequest, generated: tuple[int, ...] = ()) -> None:
    """What the engine does when `r`'s prefill is done and it drew (and then decoded) `generated`."""
    r.prefilled, r.decoding = len(r.context), True
    r.generated.extend(generated)


def test_a_request_shares_the_written_full_blocks_of_a_running_one_with_the_same_prefix():
    s = cached_scheduler()
    prompt = list(range(1, 15))  # 14 tokens: 3 full blocks of 4 and 2 more
    a = ask("a", prompt)
    s.queue([a])
    s.admit(lambda r: None)
    b = ask("b", prompt + [50, 51])
    s.queue([b])
    s.admit(lambda r: None)
    assert b.prefilled == 0 and not set(a.blocks) & set(b.blocks)  # nothing of a's was written yet
    s.release(b)
    drew(a, (99,))  # a's 14 positions are written, the token it drew is not: 3 full blocks
    c = ask("c", prompt + [50, 51])
    s.queue([c])
    s.take_rows()
    s.admit(lambda r: None)
    assert c.blocks[:3] == a.blocks[:3] and c.prefilled == 12 and not set(c.blocks[3:]) & set(a.blocks)
    row = s.take_rows()[-1]
    assert row == p.BlockRow(c.slot, 0, tuple(c.blocks))  # its row, the shared blocks first
    assert (s.prefix_hits, s.prefix_misses) == (12, 14 + 16 + 4)
    assert s.prefill_batch()[-1] == (c, 4)  # only the tail is prefilled


def test_a_partly_written_block_or_a_different_earlier_block_is_never_shared():
    s = cached_scheduler()
    prompt = list(range(1, 11))  # 2 full blocks and 2 tokens
    a = ask("a", prompt)
    s.queue([a])
    s.admit(lambda r: None)
    drew(a)
    b = ask("b", prompt + [11, 12, 13, 14])  # a's third block holds 2 of b's tokens only
    other = ask("x", [0] + prompt[1:])  # a different first token: no block matches
    s.queue([b])
    s.queue([other])
    s.admit(lambda r: None)
    assert b.blocks[:2] == a.blocks[:2] and b.prefilled == 8 and b.blocks[2] != a.blocks[2]
    assert other.prefilled == 0 and not set(other.blocks) & set(a.blocks)


def test_the_whole_context_is_never_matched_its_last_token_is_prefilled():
    s = cached_scheduler()
    prompt = list(range(1, 13))  # exactly 3 blocks
    a = ask("a", prompt)
    s.queue([a])
    s.admit(lambda r: None)
    drew(a, (7, 8))  # 13 of 14 positions written
    s.release(a)  # its 3 full blocks stay cached
    assert s.pool.cached == 3 and s.pool.used == 0
    b = ask("b", prompt)
    s.queue([b])
    s.admit(lambda r: None)
    assert b.prefilled == 8 and s.prefill_batch() == [(b, 4)]  # 2 blocks: 12 tokens would leave none to prefill


def test_released_blocks_are_cached_reused_and_evicted_before_anyone_waits():
    s = cached_scheduler(blocks=6, max_batch_size=2)
    prompt = list(range(1, 10))  # 9 tokens: 2 full blocks
    a = ask("a", prompt)
    s.queue([a])
    s.admit(lambda r: None)
    drew(a, (5,))
    held = list(a.blocks)
    s.release(a)
    assert s.pool.cached == 2 and s.pool.free == 6
    b = ask("b", prompt)
    s.queue([b])
    s.admit(lambda r: None)
    assert b.blocks[:2] == held[:2] and b.prefilled == 8 and s.pool.cached == 0
    s.release(b)
    # A request with nothing in common needs all 6 blocks: the cached ones are evicted rather than it waiting.
    c = ask("c", [90 + i for i in range(20)])
    s.queue([c])
    s.admit(lambda r: None)
    assert admitted(s) == ["c"] and len(c.blocks) == 6 and c.prefilled == 0 and s.pool.cached == 0
    s.release(c)
    d = ask("d", prompt)
    s.queue([d])
    s.admit(lambda r: None)
    assert d.prefilled == 0  # evicted: prefilled again


def test_an_interrupt_drops_the_prefix_cache():
    s = cached_scheduler()
    prompt = list(range(1, 10))
    a, b = ask("a", prompt), ask("b", list(range(30, 40)))
    s.queue([a])
    s.queue([b])
    s.admit(lambda r: None)
    drew(a)
    s.release(a)
    drew(b, (1,))
    assert s.pool.cached == 2
    s.interrupt(0.0)
    assert s.pool.cached == 0 and s.pool.used == 0 and s.pool.free == 16
    s.admit(lambda r: None)
    assert b.slot is not None and b.prefilled == 0  # the replay prefills everything again
    c = ask("c", prompt)
    s.queue([c])
    s.admit(lambda r: None)
    assert c.prefilled == 0


def test_n_choices_share_the_prefillers_whole_blocks_and_prefill_the_rest_themselves():
    """Paged: no copy. The others take the shared prompt's whole blocks from the member that prefilled it,
    give back their own, and prefill the partial block and the last token (14 - 1 shared tokens: 3 whole
    blocks of 4, then 2 tokens each)."""
    s = cached_scheduler()
    prompt = list(range(1, 15))
    choices = [ask(f"n{i}", prompt) for i in range(3)]
    s.queue(choices)
    s.admit(lambda r: None)
    free_before = s.pool.free
    assert [(r.request_id, n) for r, n in s.prefill_batch()] == [("n0", 13)]  # the shared part, by one member
    assert s.share_choices() == 0  # nothing to share before it is prefilled
    choices[0].prefilled = 13
    s.take_rows()
    assert s.share_choices() == 6 and s.copies() == []
    source = choices[0].blocks[:3]
    for r in choices[1:]:
        assert r.blocks[:3] == source and r.prefilled == 12 and not set(r.blocks[3:]) & set(choices[0].blocks)
    assert s.pool.free == free_before + 6  # the others' own first blocks went back
    assert (s.prefix_hits, s.prefix_misses) == (24, 14 + 2 + 2)  # n0 prefilled it all; n1, n2 share 12 each
    assert s.take_rows() == tuple(p.BlockRow(r.slot, 0, tuple(r.blocks)) for r in choices[1:])
    assert [(r.request_id, n) for r, n in s.prefill_batch()] == [("n0", 1), ("n1", 2), ("n2", 2)]
    assert s.share_choices() == 0  # once
    for r in choices:
        s.release(r)
    assert s.pool.used == 0


def test_n_choices_copy_with_the_static_cache():
    s = Scheduler(max_batch_size=4, prefill_chunk_tokens=100, context_len=64, kv_cache_blocks=0, kv_block_size=4)
    choices = [ask(f"n{i}", list(range(1, 15))) for i in range(2)]
    s.queue(choices)
    s.admit(lambda r: None)
    choices[0].prefilled = 13
    assert s.share_choices() == 0 and s.copies()[0][2] == [choices[1]]
    assert [r.request_id for r, _ in s.prefill_batch()] == ["n0"]  # n1 waits for its copy


def test_n_choices_keep_the_copy_path():
    s = cached_scheduler()
    prompt = list(range(1, 10))
    a = ask("a", prompt)
    s.queue([a])
    s.admit(lambda r: None)
    drew(a)
    s.release(a)
    choices = [ask(f"n{i}", prompt) for i in range(2)]
    s.queue(choices)
    s.admit(lambda r: None)
    assert all(r.group is not None and r.prefilled == 0 for r in choices)
    assert not set(choices[0].blocks) & set(choices[1].blocks)
