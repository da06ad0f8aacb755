"""The repair ladder against a fake pool: no processes, no torch, tiny deadlines (the way gunicorn tests its
arbiter). Each FakeRank is scripted: it answers or not, is dead, busy in or outside a collective, confirms an
abort or not; a replacement starts, loads, dies or hangs. The tests assert the rung, who is killed and who is
kept, and that each step gives up at its own deadline."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from neurond import protocol as p
from neurond.lifecycle import Cause
from neurond.observe.events import Event
from neurond.pool import ladder as ladder_mod
from neurond.pool.faults import PoolFault, RankDied, RankFailed, StepTimeout
from neurond.pool.ladder import Deadlines, RepairLadder
from neurond.protocol import FaultKind

DEADLINES = Deadlines(abort_s=0.2, comm_s=0.3, load_s=0.4, kill_s=0.05)
SLACK_S = 0.3  # scheduling noise allowed on a shared CPU


@dataclass
class FakeRank:
    alive: bool = True
    # "idle", "collective" (waiting on peers), "wedged" (busy in its own work), "mute" (control thread gone)
    state: str = "idle"
    confirms_abort: bool = True  # answers AbortComm in time
    released_by_abort: bool = True  # a rank in a collective comes free once aborted
    # ...or only this many pings after the abort (a peer's closed connections reach it a moment later)
    released_after_pings: int = 0
    # for a replacement: "ok", "dies_starting", "dies_loading", "hangs_loading"
    replacement: str = "ok"


@dataclass
class FakePool:
    ranks: dict[int, FakeRank]
    replacements: dict[int, FakeRank] = field(default_factory=dict)  # what spawn(rank) gives
    comm: str = "ok"  # "ok", "hangs" (pool honours its deadline), "ignores_deadline" (never returns)
    log: list[tuple] = field(default_factory=list)  # (step, ranks, deadline) in order
    killed: list[int] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def alive_ranks(self) -> list[int]:
        return [r for r, rank in self.ranks.items() if rank.alive]

    async def control(self, ranks, make, deadline_s, what):
        self.log.append((what, list(ranks), deadline_s))
        if not ranks:
            return {}
        cmd = make(0)
        replies, missing = {}, []
        for r in ranks:
            rank = self.ranks[r]
            if not rank.alive:
                raise RankDied(r, -9)
            if rank.state == "mute" or (isinstance(cmd, p.AbortComm) and not rank.confirms_abort):
                missing.append(r)
            elif isinstance(cmd, p.AbortComm):
                if rank.state == "collective" and rank.released_by_abort and not rank.released_after_pings:
                    rank.state = "idle"
                replies[r] = p.Aborted(0, r, True, 0.0)
            else:
                if rank.state == "collective" and rank.released_after_pings and "abort" in self.steps():
                    rank.released_after_pings -= 1
                    if not rank.released_after_pings:
                        rank.state = "idle"
                replies[r] = {
                    "idle": p.Pong(0, r, 0.0),
                    "collective": p.Pong(0, r, 3.0, in_collective=True, outside_s=0.0),
                    "wedged": p.Pong(0, r, 3.0, in_collective=False, outside_s=3.0),
                }[rank.state]
        if missing:  # as RankPool does: wait out the deadline, then name who did not answer
            await asyncio.sleep(deadline_s)
            raise StepTimeout(missing, deadline_s, what)
        return replies

    async def kill_ranks(self, ranks, timeout_s=10.0, dump_stacks=False):
        self.log.append(("kill", list(ranks), timeout_s))
        for r in ranks:
            if self.ranks[r].alive:
                self.ranks[r].alive = False
                self.killed.append(r)

    def spawn(self, rank):
        self.log.append(("spawn", [rank], None))
        self.ranks[rank] = self.replacements.get(rank, FakeRank())

    async def wait_started(self, ranks, timeout_s=None):
        self.log.append(("worker start", list(ranks), timeout_s))
        for r in ranks:
            if self.ranks[r].replacement == "dies_starting":
                self.ranks[r].alive = False
                raise RankDied(r, 1)

    async def form_comm(self, timeout_s=None):
        self.log.append(("form communicator", list(self.ranks), timeout_s))
        if self.comm == "hangs":
            await asyncio.sleep(timeout_s)
            raise StepTimeout([1], timeout_s, "join communicator")
        if self.comm == "ignores_deadline":
            await asyncio.sleep(3600)
        return 1

    async def load(self, ranks, timeout_s=None):
        self.log.append(("load shard", list(ranks), timeout_s))
        for r in ranks:
            if self.ranks[r].replacement == "dies_loading":
                self.ranks[r].alive = False
                raise RankDied(r, 1)
            if self.ranks[r].replacement == "hangs_loading":
                await asyncio.sleep(timeout_s)
                raise StepTimeout([r], timeout_s, "load shard")

    def steps(self) -> list[str]:
        return [entry[0] for entry in self.log]


@dataclass
class Harness:
    pool: FakePool
    events: list[tuple[Event, Cause | None, dict]] = field(default_factory=list)
    restarts: int = 0

    def emit(self, name, cause=None, **fields):
        self.events.append((name, cause, fields))

    async def restart(self):
        self.restarts += 1

    def ladder(self) -> RepairLadder:
        return RepairLadder(DEADLINES, self.emit, self.restart, world_size=self.pool.world_size)

    def names(self) -> list[str]:
        return [str(e[0].value) for e in self.events]

    def killed_events(self) -> list[int]:
        return [cause.rank for name, cause, _ in self.events if name == Event.RANK_KILLED]


CAUSE = Cause("rank_failed", "inc1", 1, attempt=1)


def recover(h: Harness, fault: PoolFault) -> tuple[set[int], str]:
    """unblock, choose, repair: what the supervisor's first attempt does."""

    async def run():
        ladder = h.ladder()
        victims = await ladder.unblock(h.pool, fault, CAUSE)
        rung = ladder.rung(victims)
        await ladder.repair(h.pool, rung, victims, CAUSE.with_(rung=rung))
        return victims, rung

    return asyncio.run(run())


def pool_of(*ranks: FakeRank, **kw) -> FakePool:
    return FakePool(dict(enumerate(ranks)), **kw)


# ---------------------------------------------------------------------- rungs
def test_raise_on_one_rank_rebuilds_the_communicator_and_kills_nobody():
    h = Harness(pool_of(FakeRank(), FakeRank()))
    victims, rung = recover(h, RankFailed(1, FaultKind.EXCEPTION, "boom"))
    assert (victims, rung) == (set(), "comm_rebuild")
    assert h.pool.killed == [] and h.killed_events() == []
    assert "spawn" not in h.pool.steps() and h.restarts == 0
    assert h.names() == ["abort_started", "abort_finished", "comm_rebuilt"]
    assert ("abort", [0, 1], DEADLINES.abort_s) in h.pool.log


def test_a_dead_rank_is_replaced_alone():
    h = Harness(pool_of(FakeRank(), FakeRank(alive=False), FakeRank()))
    victims, rung = recover(h, RankDied(1, -9))
    assert (victims, rung) == ({1}, "replace_ranks")
    assert h.pool.killed == []  # it was dead already: nobody else is killed
    assert ("abort", [0, 2], DEADLINES.abort_s) in h.pool.log
    assert [e for e in h.pool.log if e[0] == "spawn"] == [("spawn", [1], None)]
    assert [e for e in h.pool.log if e[0] == "load shard"] == [("load shard", [1], DEADLINES.load_s)]
    assert h.names()[-1] == "comm_rebuilt" and h.restarts == 0


def test_a_rank_wedged_outside_a_collective_is_killed_before_the_abort():
    # rank 1 is stuck in its own work; rank 0 waits for it inside the all-reduce.
    h = Harness(pool_of(FakeRank(state="collective"), FakeRank(state="wedged")))
    victims, rung = recover(h, StepTimeout([0, 1], 1.0, "decode"))
    assert (victims, rung) == ({1}, "replace_ranks")
    steps = h.pool.steps()
    assert steps.index("kill") < steps.index("abort")
    assert h.pool.killed == [1] and h.killed_events() == [1]
    assert ("abort", [0], DEADLINES.abort_s) in h.pool.log  # the wedged rank is not asked to abort
    assert h.names().index("rank_killed") < h.names().index("abort_started")


def test_a_rank_that_does_not_confirm_the_abort_is_a_victim_at_the_abort_deadline():
    h = Harness(pool_of(FakeRank(state="collective", confirms_abort=False), FakeRank()))
    t0 = time.monotonic()
    victims = asyncio.run(h.ladder().unblock(h.pool, RankFailed(1, FaultKind.EXCEPTION, "boom"), CAUSE))
    elapsed = time.monotonic() - t0
    assert victims == {0} and h.pool.killed == [0]
    assert h.pool.ranks[1].alive  # the rank that raised keeps its process and weights
    assert h.names()[:2] == ["abort_started", "abort_failed"]
    # gave up at the abort deadline (not the ping's, the grace's or a kill's)
    assert DEADLINES.abort_s <= elapsed < DEADLINES.abort_s + SLACK_S
    assert h.ladder().rung(victims) == "replace_ranks"


def test_a_rank_still_in_a_collective_after_the_grace_is_killed():
    h = Harness(pool_of(FakeRank(state="collective", released_by_abort=False), FakeRank()))
    t0 = time.monotonic()
    victims = asyncio.run(h.ladder().unblock(h.pool, RankFailed(1, FaultKind.EXCEPTION, "boom"), CAUSE))
    elapsed = time.monotonic() - t0
    assert victims == {0} and h.pool.killed == [0] and h.names()[:2] == ["abort_started", "abort_finished"]
    assert DEADLINES.release_grace_s <= elapsed < DEADLINES.release_grace_s + SLACK_S


def test_a_rank_released_during_the_grace_is_kept():
    """Released a few polls after the abort (its peer's connections close a moment later): nobody is killed,
    and the pool repairs by the cheapest rung. The grace exists for exactly this rank."""
    h = Harness(pool_of(FakeRank(state="collective", released_after_pings=4), FakeRank()))
    victims, rung = recover(h, RankFailed(1, FaultKind.EXCEPTION, "boom"))
    assert (victims, rung) == (set(), "comm_rebuild")
    assert h.pool.killed == [] and h.killed_events() == []
    assert h.pool.ranks[0].state == "idle"
    assert h.pool.steps().count("ping") >= 5  # before the abort, after it, and during the grace


def test_a_rank_whose_control_thread_does_not_answer_is_killed_at_the_ping_deadline():
    h = Harness(pool_of(FakeRank(), FakeRank(state="mute")))
    t0 = time.monotonic()
    victims = asyncio.run(h.ladder().unblock(h.pool, StepTimeout([1], 1.0, "decode"), CAUSE))
    assert victims == {1} and h.pool.killed == [1]
    assert time.monotonic() - t0 < DEADLINES.ping_s + SLACK_S
    assert h.pool.log[0] == ("ping", [0, 1], DEADLINES.ping_s)


def test_a_ruined_device_context_makes_its_rank_a_victim_though_it_answers():
    h = Harness(pool_of(FakeRank(), FakeRank()))
    fault = RankFailed(1, FaultKind.CUDA_ERROR, "illegal address", context_ok=False)
    victims, rung = recover(h, fault)
    assert (victims, rung) == ({1}, "replace_ranks") and h.pool.killed == [1]
    assert ("abort", [0], DEADLINES.abort_s) in h.pool.log


def test_all_ranks_dead_takes_a_full_reload():
    h = Harness(pool_of(FakeRank(alive=False), FakeRank(alive=False)))
    victims, rung = recover(h, RankDied(0, -9))
    assert (victims, rung) == ({0, 1}, "full_reload")
    assert h.restarts == 1 and "spawn" not in h.pool.steps() and h.killed_events() == []
    assert ("abort", [], DEADLINES.abort_s) in h.pool.log  # nobody left to abort: returns at once


def test_two_deaths_in_one_step_count_both():
    # rank 2 dies while the abort runs: the rung is chosen for both deaths.
    pool = pool_of(FakeRank(), FakeRank(alive=False), FakeRank(), FakeRank())
    real_control = pool.control

    async def control(ranks, make, deadline_s, what):
        if what == "abort":
            pool.ranks[2].alive = False
            raise RankDied(2, -9)
        return await real_control(ranks, make, deadline_s, what)

    pool.control = control
    h = Harness(pool)
    victims = asyncio.run(h.ladder().unblock(pool, RankDied(1, -9), CAUSE))
    assert victims == {1, 2} and h.ladder().rung(victims) == "replace_ranks"
    assert "abort_failed" in h.names() and pool.killed == []


# ---------------------------------------------------------------------- failures during a rung
def _replace(h: Harness, victims: set[int]) -> float:
    t0 = time.monotonic()
    asyncio.run(h.ladder().repair(h.pool, "replace_ranks", victims, CAUSE.with_(rung="replace_ranks")))
    return time.monotonic() - t0


def test_a_replacement_that_dies_while_loading_raises():
    h = Harness(pool_of(FakeRank(), FakeRank(alive=False), replacements={1: FakeRank(replacement="dies_loading")}))
    with pytest.raises(RankDied):
        _replace(h, {1})
    assert h.restarts == 0  # climbing the ladder is the supervisor's next attempt


def test_a_replacement_that_dies_starting_raises_before_any_communicator():
    h = Harness(pool_of(FakeRank(), FakeRank(alive=False), replacements={1: FakeRank(replacement="dies_starting")}))
    with pytest.raises(RankDied):
        _replace(h, {1})
    assert "form communicator" not in h.pool.steps()


def test_a_replacement_that_hangs_loading_gives_up_at_the_load_deadline():
    h = Harness(pool_of(FakeRank(), FakeRank(alive=False), replacements={1: FakeRank(replacement="hangs_loading")}))
    t0 = time.monotonic()
    with pytest.raises(StepTimeout) as missed:
        _replace(h, {1})
    elapsed = time.monotonic() - t0
    assert missed.value.ranks == [1] and missed.value.deadline_s == DEADLINES.load_s
    assert DEADLINES.load_s <= elapsed < DEADLINES.load_s + SLACK_S


def test_forming_the_communicator_gives_up_at_the_comm_deadline():
    h = Harness(pool_of(FakeRank(), FakeRank(), comm="hangs"))
    t0 = time.monotonic()
    with pytest.raises(StepTimeout) as missed:
        asyncio.run(h.ladder().repair(h.pool, "comm_rebuild", set(), CAUSE))
    elapsed = time.monotonic() - t0
    assert missed.value.deadline_s == DEADLINES.comm_s
    assert DEADLINES.comm_s <= elapsed < DEADLINES.comm_s + SLACK_S
    assert "comm_rebuilt" not in h.names()


def test_a_pool_that_ignores_a_deadline_is_bounded_by_the_ladder(monkeypatch):
    monkeypatch.setattr(ladder_mod, "BACKSTOP_S", 0.05)
    h = Harness(pool_of(FakeRank(), FakeRank(), comm="ignores_deadline"))
    t0 = time.monotonic()
    with pytest.raises(StepTimeout) as missed:  # (the test's own bound: a ladder without one fails, not hangs)
        asyncio.run(asyncio.wait_for(h.ladder().repair(h.pool, "comm_rebuild", set(), CAUSE), 10))
    elapsed = time.monotonic() - t0
    # two calls (open the store, join), each with the communicator deadline, then the backstop
    assert missed.value.ranks == [0, 1] and missed.value.deadline_s == DEADLINES.comm_s
    assert 2 * DEADLINES.comm_s <= elapsed < 2 * DEADLINES.comm_s + 0.05 + SLACK_S


def test_each_step_is_given_its_own_deadline():
    h = Harness(pool_of(FakeRank(state="collective"), FakeRank(alive=False)))
    recover(h, RankDied(1, -9))
    given = {step: deadline for step, _, deadline in h.pool.log if step != "spawn"}
    assert given == {"ping": DEADLINES.abort_s, "abort": DEADLINES.abort_s, "kill": DEADLINES.kill_s,
                     "worker start": DEADLINES.load_s, "form communicator": DEADLINES.comm_s,
                     "load shard": DEADLINES.load_s}


def test_full_reload_kills_known_victims_first_then_restarts():
    h = Harness(pool_of(FakeRank(state="wedged"), FakeRank()))
    asyncio.run(h.ladder().repair(h.pool, "full_reload", {0}, CAUSE))
    assert h.pool.killed == [0] and h.restarts == 1
    (name, cause, _), = [e for e in h.events if e[0] == Event.RANK_KILLED]
    assert (cause.name, cause.incident, cause.rank) == ("recovery", "inc1", 0)


def test_config_deadlines_are_the_ladders():
    from neurond.config import Config

    c = Config(abort_timeout_s=1.5, comm_timeout_s=7.0, load_timeout_s=99.0)
    d = Deadlines.from_config(c)
    assert (d.abort_s, d.ping_s, d.comm_s, d.load_s, d.kill_s) == (1.5, 1.5, 7.0, 99.0, ladder_mod.KILL_TIMEOUT_S)
    assert d.release_grace_s == 1.0
