"""The repair ladder: after a fault, make every rank idle or dead, then run the cheapest rung that repairs the
pool. The supervisor owns everything around it (lifecycle transitions, incident ids, the crash-loop breaker,
spares, operator actions) and calls in here; this module owns only the mechanics, so it can be tested against
a fake pool without processes (tests/pool/test_ladder_unit.py).

Rungs, cheapest first (each recorded on the transition as `rung`):
  comm_rebuild   nobody was killed: a fresh communicator among the same processes, weights kept
  replace_ranks  some were killed: respawn only those, load only their shards, fresh communicator for all
  full_reload    all were killed, or a previous rung failed: stop every rank and start a new pool
(give_up, the breaker's end, is the supervisor's: it is a decision about attempts, not a repair.)

Every step has a deadline of its own (`Deadlines`). The pool enforces it and raises a PoolFault naming the
ranks that missed it; the ladder also bounds each step itself (`_within`), a little past the pool's own worst
case, so a pool that does not honour a deadline still cannot hold the ladder. A PoolFault out of a rung climbs
the ladder (the supervisor's next attempt is a full reload). Nothing waits unbounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from neurond import protocol as p
from neurond.config import Config
from neurond.lifecycle import Cause, Rung
from neurond.observe.events import Event
from neurond.pool.faults import PoolFault, RankDied, StepTimeout

COMM_REBUILD, REPLACE_RANKS, FULL_RELOAD = Rung.COMM_REBUILD, Rung.REPLACE_RANKS, Rung.FULL_RELOAD

# A rank busy outside any collective for longer than this (since its call began or its last collective
# returned), after a step failed or timed out, is wedged.
WEDGE_MIN_BUSY_S = 0.5

# How long a killed rank gets to be reaped (per rank). SIGKILL cannot be refused, so this bounds only a
# process stuck in the kernel (D state); the ladder goes on without it either way.
KILL_TIMEOUT_S = 10.0

# How far past the pool's own deadline the ladder's bound of a step lies: the pool's StepTimeout, which names
# the ranks that missed, must always be the one that fires when the pool honours its deadlines.
BACKSTOP_S = 0.5

# The most a rank still inside a collective after the abort waits to come free before it counts as stuck.
RELEASE_GRACE_MAX_S = 1.0
RELEASE_POLL_S = 0.02

T = TypeVar("T")


class LadderPool(Protocol):
    """What the ladder needs of a pool (RankPool, or the tests' FakePool)."""

    world_size: int

    def alive_ranks(self) -> list[int]: ...
    async def control(self, ranks: list[int], make: Callable[[int], p.ControlCommand], deadline_s: float,
                      what: str) -> dict[int, object]: ...
    async def kill_ranks(self, ranks: Iterable[int], timeout_s: float = ..., dump_stacks: bool = ...) -> None: ...
    def spawn(self, rank: int) -> object: ...
    async def wait_started(self, ranks: Iterable[int], timeout_s: float | None = None) -> None: ...
    async def form_comm(self, timeout_s: float | None = None) -> int: ...
    async def load(self, ranks: Iterable[int], timeout_s: float | None = None) -> None: ...


class Emit(Protocol):
    def __call__(self, name: Event, cause: Cause | None = None, **fields: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class Deadlines:
    """One deadline per step of the ladder, in seconds."""

    abort_s: float  # a rank confirms AbortComm from its control thread; every Ping has it too
    comm_s: float  # each call of forming a communicator (open the store; join, its first collective included)
    load_s: float  # a replaced rank's start (spec taken, imports done), and then separately its load
    kill_s: float = KILL_TIMEOUT_S  # each killed rank is reaped

    @property
    def ping_s(self) -> float:
        return self.abort_s

    @property
    def release_grace_s(self) -> float:
        """How long a rank still in a collective after the abort gets to be released by its peers' aborts."""
        return min(RELEASE_GRACE_MAX_S, self.abort_s)

    @classmethod
    def from_config(cls, config: Config) -> Deadlines:
        return cls(abort_s=config.abort_timeout_s, comm_s=config.comm_timeout_s, load_s=config.load_timeout_s)


# What a repair may take beyond its steps' deadlines (the event loop's own turns, journal writes, spawning).
REPAIR_SLACK_S = 30.0


def worst_case_s(config: Config) -> float:
    """The longest one repair state may last with every step at its deadline: a load, two communicators (the
    abort's and the new one's), two aborts and two kill graces (a failed rung's, then the full reload's), and
    the longest wait before an attempt. A repair state that outlives this means the supervisor itself is stuck
    (the systemd watchdog's test)."""
    return (config.load_timeout_s + 2 * config.comm_timeout_s + 2 * config.abort_timeout_s
            + 2 * config.kill_grace_s + config.recovery_backoff_max_s + REPAIR_SLACK_S)


def backoff_s(config: Config, attempt: int) -> float:
    """The wait before recovery attempt `attempt` of one incident: none before the first, recovery_backoff_s
    before the second, doubled before each later one, never more than recovery_backoff_max_s."""
    if attempt < 2 or config.recovery_backoff_s <= 0:
        return 0.0
    return min(config.recovery_backoff_s * 2.0 ** min(attempt - 2, 32), config.recovery_backoff_max_s)


@dataclass(slots=True)
class Busy:
    """The live ranks a ping found busy but not (yet) wedged."""

    waiting: set[int] = field(default_factory=set)  # inside a collective: waiting on a peer
    finishing: set[int] = field(default_factory=set)  # outside any collective, only for a moment

    def __bool__(self) -> bool:
        return bool(self.waiting or self.finishing)

    def all(self) -> set[int]:
        return self.waiting | self.finishing


def _ms_since(t0: float) -> int:
    return round((time.monotonic() - t0) * 1000)


class RepairLadder:
    def __init__(self, deadlines: Deadlines, emit: Emit, restart: Callable[[], Awaitable[None]], *,
                 world_size: int) -> None:
        """`emit`: the journal (the supervisor's `_emit`). `restart`: stop the current pool and start a new one
        (the supervisor owns the pool object, so it makes the new one)."""
        self.deadlines = deadlines
        self._emit = emit
        self._restart = restart
        self.world_size = world_size

    @classmethod
    def from_config(cls, config: Config, emit: Emit, restart: Callable[[], Awaitable[None]]) -> RepairLadder:
        return cls(Deadlines.from_config(config), emit, restart, world_size=config.tp_size)

    # ------------------------------------------------------------------ choosing a rung
    def rung(self, victims: set[int]) -> Rung:
        """The cheapest rung that repairs the pool once `victims` are gone."""
        if not victims:
            return COMM_REBUILD
        return REPLACE_RANKS if len(victims) < self.world_size else FULL_RELOAD

    # ------------------------------------------------------------------ making every rank idle or dead
    async def unblock(self, pool: LadderPool, fault: PoolFault, cause: Cause) -> set[int]:
        """Make every rank idle or dead; return the dead (killed) ones, which must be replaced.

        1. A dead rank, or one whose device context is ruined, is a victim from the start.
        2. Ping: a rank busy outside any collective for more than a moment is wedged in its own work (a stuck
           kernel, a hung syscall): a victim, killed now. Aborting it first would only wait out
           abort_timeout_s (measured on an H200: a rank in a never-ending kernel never confirms the abort).
        3. Abort the communicator on every other live rank from its control thread (NCCL: unblocks a rank
           stuck in a collective). A rank that does not confirm within abort_timeout_s is a victim.
        4. A rank still in a collective after that gets a short grace (a victim's death or the abort of its
           peers' connections releases it over gloo); any rank still busy after it is stuck for good: killed.
        """
        victims: set[int] = {r for r in range(pool.world_size) if r not in pool.alive_ranks()}
        if isinstance(fault, RankDied) or not fault.context_ok:
            assert fault.rank is not None  # a death or a ruined context is one rank's
            victims.add(fault.rank)
        await self._ping_busy(pool, victims)  # the wedged ones join the victims
        await self._kill(pool, victims, cause)

        await self._abort(pool, victims, cause)

        busy = await self._ping_busy(pool, victims)
        await self._kill(pool, victims, cause)
        if busy:
            deadline = time.monotonic() + self.deadlines.release_grace_s
            while busy and time.monotonic() < deadline:
                await asyncio.sleep(RELEASE_POLL_S)
                busy = await self._ping_busy(pool, victims)
        # Still busy after the grace: stuck for good. (Pings in the grace may also have found wedged ranks.)
        victims |= busy.all()
        await self._kill(pool, victims, cause)  # kills only those still alive
        # A rank that died on its own meanwhile (two deaths in one step: the second pidfd turns readable
        # while the abort runs) is a victim too; else the rung would be chosen for the first death alone.
        victims |= {r for r in range(pool.world_size) if r not in pool.alive_ranks()}
        return victims

    async def _abort(self, pool: LadderPool, victims: set[int], cause: Cause) -> None:
        """AbortComm on every live rank not already a victim; those that do not confirm in time join them."""
        alive = [r for r in pool.alive_ranks() if r not in victims]
        self._emit(Event.ABORT_STARTED, cause, detail=f"aborting the communicator on ranks {alive}")
        t0 = time.monotonic()
        try:
            await self._within("abort", self.deadlines.abort_s, alive,
                               pool.control(alive, lambda cid: p.AbortComm(cid), self.deadlines.abort_s, "abort"))
            self._emit(Event.ABORT_FINISHED, cause, duration_ms=_ms_since(t0))
        except StepTimeout as missed:
            victims.update(missed.ranks)
            self._emit(Event.ABORT_FAILED, cause, duration_ms=_ms_since(t0), detail=missed.message)
        except PoolFault as missed:  # a rank died meanwhile: the final sweep of unblock() counts it
            self._emit(Event.ABORT_FAILED, cause, duration_ms=_ms_since(t0), detail=missed.message)

    async def _ping_busy(self, pool: LadderPool, victims: set[int]) -> Busy:
        """Ping the live ranks not in `victims`. Wedged ones (no answer, or busy outside any collective for
        longer than a moment) are added to `victims`. Returns the ones busy but not wedged."""
        ranks = [r for r in pool.alive_ranks() if r not in victims]
        if not ranks:
            return Busy()
        try:
            pongs = await self._within("ping", self.deadlines.ping_s, ranks,
                                       pool.control(ranks, lambda cid: p.Ping(cid), self.deadlines.ping_s, "ping"))
        except StepTimeout as missed:
            victims.update(missed.ranks)
            return Busy()
        except PoolFault:  # a rank died meanwhile: the final sweep of unblock() counts it
            return Busy()
        busy = Busy()
        for rank, pong in pongs.items():
            assert isinstance(pong, p.Pong)  # a Ping's answer
            if pong.busy_s <= 0:
                continue
            if pong.in_collective:
                busy.waiting.add(rank)
            elif pong.outside_s < WEDGE_MIN_BUSY_S:
                busy.finishing.add(rank)
            else:
                victims.add(rank)
        return busy

    async def _kill(self, pool: LadderPool, ranks: set[int], cause: Cause) -> None:
        """SIGKILL (after a stack dump) those of `ranks` still alive; journal each one actually killed."""
        alive = [r for r in sorted(ranks) if r in pool.alive_ranks()]
        await pool.kill_ranks(sorted(ranks), timeout_s=self.deadlines.kill_s, dump_stacks=True)
        for rank in alive:
            self._emit(Event.RANK_KILLED, cause.with_(rank=rank),
                       detail="SIGKILL: wedged, stuck in a collective, or device context ruined")

    # ------------------------------------------------------------------ the rungs
    async def repair(self, pool: LadderPool | None, rung: Rung, victims: set[int], cause: Cause) -> None:
        """Run `rung`. `cause` carries the rung and attempt for the journal. Raises PoolFault on any failure."""
        if rung == COMM_REBUILD:
            assert pool is not None
            await self._form_comm(pool, cause)
        elif rung == REPLACE_RANKS:
            assert pool is not None
            await self._replace(pool, victims, cause)
        else:
            await self.full_reload(pool, victims, cause)

    async def _replace(self, pool: LadderPool, victims: set[int], cause: Cause) -> None:
        """Respawn only the victims; survivors keep their processes and weights and join a new communicator."""
        ranks = sorted(victims)
        for rank in ranks:
            pool.spawn(rank)
        await self._within("worker start", self.deadlines.load_s, ranks,
                           pool.wait_started(ranks, timeout_s=self.deadlines.load_s))
        await self._form_comm(pool, cause)
        await self._within("load shard", self.deadlines.load_s, ranks,
                           pool.load(ranks, timeout_s=self.deadlines.load_s))

    async def _form_comm(self, pool: LadderPool, cause: Cause) -> None:
        """A new communicator among the pool's processes (both rungs that keep weights end or pass here),
        journalled with how long it took. Two calls (open the store on rank 0, then join on all), each with the
        communicator deadline."""
        t0 = time.monotonic()
        await self._within("form communicator", self.deadlines.comm_s, range(pool.world_size),
                           pool.form_comm(timeout_s=self.deadlines.comm_s), calls=2)
        self._emit(Event.COMM_REBUILT, cause, duration_ms=_ms_since(t0))

    async def full_reload(self, pool: LadderPool | None, victims: set[int], cause: Cause) -> None:
        # Stuck or broken ranks get SIGKILL at once: asking them to shut down would only wait out the grace.
        if pool is not None and victims:
            await self._kill(pool, victims, Cause("recovery", cause.incident))
        await self._restart()

    # ------------------------------------------------------------------ deadlines
    @staticmethod
    async def _within(what: str, deadline_s: float, ranks: Iterable[int], step: Awaitable[T], calls: int = 1) -> T:
        """Await `step`, which the pool bounds by `deadline_s` per call; should the pool not honour that, give up
        BACKSTOP_S after its worst case with the StepTimeout the pool would have raised."""
        try:
            return await asyncio.wait_for(step, deadline_s * calls + BACKSTOP_S)
        except TimeoutError:
            raise StepTimeout(sorted(ranks), deadline_s, what) from None
