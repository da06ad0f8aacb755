"""Supervisor.call: which faults are this call's own (journaled with its request, blamed on its requests) and
which only interrupt it; how recovery attempts follow each other. No processes: the pool is a stand-in."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from neurond.config import Config
from neurond.observe.events import Event
from neurond.pool.faults import PoolUnavailable, RankDied, RankFailed, StepTimeout
from neurond.pool.ladder import backoff_s
from neurond.pool.supervisor import Supervisor
from neurond.protocol import FaultKind
from tests.engine.fakes import Recorder


class Pool:
    """A pool whose call fails with `fault`; `before` runs first (a death the pool finds outside the call)."""

    def __init__(self, fault, before=None) -> None:
        self.fault, self.before = fault, before

    async def call_all(self, make, deadline_s, what):
        if self.before is not None:
            self.before()
        raise self.fault

    def pids(self):
        return {}


def healthy_supervisor(monkeypatch) -> tuple[Supervisor, list]:
    sup = Supervisor(Config(), "/nonexistent-model", 4096)
    sup.lifecycle.send("loaded")
    recoveries = []

    async def recover(fault, cause):
        recoveries.append(cause)

    monkeypatch.setattr(sup, "_recover", recover)
    return sup, recoveries


def test_the_calls_own_fault_is_journaled_with_its_request_and_raised_as_it_is(monkeypatch):
    sup, recoveries = healthy_supervisor(monkeypatch)
    sup.pool = Pool(StepTimeout([1], 1.0, "decode"))

    async def scenario():
        with pytest.raises(StepTimeout):
            await sup.call(lambda cid: None, 1.0, "decode", "chatcmpl-alone")
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert [c.request_id for c in recoveries] == ["chatcmpl-alone"] and sup.state == "poisoned"


def test_a_call_that_runs_into_a_fault_found_outside_it_blames_nobody(monkeypatch):
    """A rank died after answering the call: the pool reports it outside any call (no request named), and the
    call then fails too. Its requests must not take a strike for that (the engine replays a PoolUnavailable)."""
    sup, recoveries = healthy_supervisor(monkeypatch)
    sup.pool = Pool(StepTimeout([0], 1.0, "decode"), before=lambda: sup.died(RankDied(1, -9)))

    async def scenario():
        with pytest.raises(PoolUnavailable) as err:
            await sup.call(lambda cid: None, 1.0, "decode", "chatcmpl-innocent")
        await asyncio.sleep(0)
        return err.value

    err = asyncio.run(scenario())
    assert isinstance(err.__cause__, StepTimeout) and "did not finish" in str(err)
    assert [c.request_id for c in recoveries] == [None]  # one incident, from the death, naming no request


def test_a_start_that_failed_is_repaired_by_a_full_reload_even_with_every_rank_alive(monkeypatch):
    """The ranks of a pool that never finished loading hold no weights: a rung that keeps them (a new
    communicator among the same processes) would declare healthy a pool with nothing loaded."""
    sup = Supervisor(Config(), "/nonexistent-model", 4096)  # `loading`

    class Unloaded(Pool):
        kv_blocks, loaded = 0, False

        async def start(self):
            raise StepTimeout([0, 1], 20.0, "worker start")  # slow imports: both alive, neither started

    rungs = []

    async def unblock(pool, fault, cause):
        return set()  # every rank alive and idle: the cheapest rung would be comm_rebuild

    async def repair(pool, rung, victims, cause):
        rungs.append(rung)

    monkeypatch.setattr(sup, "_new_pool", lambda: Unloaded(None))
    monkeypatch.setattr(sup.ladder, "unblock", unblock)
    monkeypatch.setattr(sup.ladder, "repair", repair)

    async def scenario():
        await sup.start()
        await sup._recovery

    asyncio.run(scenario())
    assert rungs == ["full_reload"] and sup.state == "healthy"


def loaded_supervisor(config: Config) -> tuple[Supervisor, list]:
    """A healthy supervisor over a loaded stand-in pool, and the list of every event it emits."""
    events = Recorder()
    sup = Supervisor(config, "/nonexistent-model", 4096, events=events)
    sup.lifecycle.send("loaded")

    class Loaded(Pool):
        kv_blocks, loaded = 0, True

        async def stop(self, grace):
            pass

    sup.pool = Loaded(None)
    return sup, events.seen


def test_failed_attempts_wait_longer_each_time_and_the_breaker_does_not_wait(monkeypatch):
    """Every attempt of an incident fails: the supervisor waits recovery_backoff_s before the second, twice
    that before the third, never more than recovery_backoff_max_s, journals each wait, and gives up at the
    breaker without waiting again."""
    sup, seen = loaded_supervisor(Config(recovery_backoff_s=0.2, recovery_backoff_max_s=0.3, breaker_max_failures=3))
    attempts = []

    async def unblock(pool, fault, cause):
        return set()

    async def repair(pool, rung, victims, cause):
        attempts.append((time.monotonic(), cause.attempt, rung))
        raise RankDied(1, -9)  # e.g. the new rank dies while loading, every time

    monkeypatch.setattr(sup.ladder, "unblock", unblock)
    monkeypatch.setattr(sup.ladder, "repair", repair)

    async def scenario():
        sup.died(RankDied(1, -9))
        try:  # bounded here: a supervisor whose breaker never opens fails this test instead of hanging it
            await asyncio.wait_for(sup._recovery, 10)
        finally:
            sup._stopping = True
        return time.monotonic()

    gave_up_at = asyncio.run(scenario())
    assert [(a, r) for _, a, r in attempts] == [(1, "comm_rebuild"), (2, "full_reload"), (3, "full_reload")]
    waits = [(o.attempt, o.duration_ms) for o in seen if o.event is Event.RECOVERY_BACKOFF]
    assert waits == [(2, 200), (3, 300)]  # 0.2 s, then 0.4 s capped at 0.3 s
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.3, gaps
    assert gave_up_at - attempts[-1][0] < 0.2  # the give-up does not wait
    assert sup.state == "unloaded" and [o.event for o in seen].count(Event.GAVE_UP) == 1


@pytest.mark.parametrize("attempt, want", [(1, 0.0), (2, 1.0), (3, 2.0), (4, 4.0), (6, 16.0), (7, 30.0), (500, 30.0)])
def test_backoff_doubles_up_to_its_cap(attempt, want):
    assert backoff_s(Config(), attempt) == want
    assert backoff_s(Config(recovery_backoff_s=0), attempt) == 0.0


@pytest.mark.parametrize("fault, victims, abort_fails, first_repair_fails, want", [
    (RankFailed(1, FaultKind.EXCEPTION, "boom"), set(), False, False, ("comm_rebuild", "clean", None)),
    (RankFailed(1, FaultKind.EXCEPTION, "boom"), {0}, False, False,
     ("replace_ranks", "degraded", "replace_ranks where comm_rebuild fits rank_failed")),
    (RankFailed(1, FaultKind.EXCEPTION, "boom"), set(), True, False, ("comm_rebuild", "degraded", "abort failed")),
    (RankDied(1, -9), {1}, False, True, ("full_reload", "degraded", "full_reload where replace_ranks fits rank_died; "
                                                                    "2 attempts")),
])
def test_the_supervisor_judges_each_incident_once_as_it_ends(monkeypatch, fault, victims, abort_fails,
                                                              first_repair_fails, want):
    """The verdict (neurond/judgement.py) is the supervisor's, on its recovery_finished event: the journal only
    writes it. Judged from the fault that opened the incident, the rung, the attempts and a failed abort."""
    sup, seen = loaded_supervisor(Config(tp_size=2, recovery_backoff_s=0))
    repairs = []

    async def unblock(pool, fault, cause):
        if abort_fails:
            sup.ladder._emit(Event.ABORT_FAILED, cause, detail="rank 0 did not confirm")
        return set(victims)

    async def repair(pool, rung, victims, cause):
        repairs.append(rung)
        if first_repair_fails and len(repairs) == 1:
            raise RankDied(1, 1)

    monkeypatch.setattr(sup.ladder, "unblock", unblock)
    monkeypatch.setattr(sup.ladder, "repair", repair)

    async def scenario():
        sup.died(fault) if isinstance(fault, RankDied) else sup._fault(fault, "chatcmpl-x")
        await asyncio.wait_for(sup._recovery, 10)

    asyncio.run(scenario())
    finished = [o for o in seen if o.event is Event.RECOVERY_FINISHED]
    assert len(finished) == 1 and sup.state == "healthy"
    assert (finished[0].rung, finished[0].outcome, finished[0].outcome_why) == want
