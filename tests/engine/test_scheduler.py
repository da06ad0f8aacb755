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
    s = Scheduler(max_batch=2, prefill_chunk=100)
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
    s = Scheduler(max_batch=4, prefill_chunk=8)
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


def test_n_choices_prefill_the_shared_prompt_once_and_copy_it():
    s = Scheduler(max_batch=4, prefill_chunk=100)
    members = [req(f"x-{i}", 6) for i in range(3)]
    s.queue(members)
    s.admit(lambda r: None)
    batch = s.prefill_batch()
    assert [(r.request_id, n) for r, n in batch] == [("x-0", 5)]  # the shared part: all but the last token
    members[0].prefilled = 5
    (group, source, targets), = s.copies()
    assert source is members[0] and targets == members[1:]


def test_an_interrupt_puts_running_requests_back_first_in_their_order():
    s = Scheduler(max_batch=2, prefill_chunk=100)
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
