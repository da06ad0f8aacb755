"""The supervisor: the only writer of pool state. It loads the pool, runs steps for the engine, turns every
fault into lifecycle transitions and repairs the pool.

A fault opens an incident (healthy -> poisoned); recovery then runs attempts (aborting -> reloading) until one
repairs the pool or the crash-loop breaker gives up (`breaker_max_failures` failed attempts within
`breaker_window_s`: -> unloaded). The mechanics of an attempt, making every rank idle or dead and running the
cheapest rung (comm_rebuild, replace_ranks, full_reload), are the repair ladder's: pool/ladder.py. The first
attempt of an incident takes the cheapest rung that fits; any later one is a full reload, after a wait that
doubles with every failed attempt (`recovery_backoff_s`, up to `recovery_backoff_max_s`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from neurond import protocol as p
from neurond.config import Config
from neurond.judgement import judge_recovery
from neurond.lifecycle import Cause, Lifecycle, LifecycleState, Rung, new_incident_id
from neurond.observe.events import Event, EventSink, emit
from neurond.pool.arming import FaultArming
from neurond.pool.faults import PoolFault, PoolUnavailable, RankDied
from neurond.pool.ladder import FULL_RELOAD, REPLACE_RANKS, RepairLadder, backoff_s
from neurond.pool.launcher import Launcher, zygote_wanted
from neurond.pool.pool import RankPool
from neurond.pool.snapshot import Snapshot, Transition
from neurond.pool.spares import SpareWorkers
from neurond.pool.specs import RankSpecs, rank_env

if TYPE_CHECKING:
    from statemachine import State

log = logging.getLogger("neurond.supervisor")


class Breaker:
    """The crash-loop breaker: open once `breaker_max_failures` recovery attempts failed within
    `breaker_window_s` (only failed attempts count: a fault that recovery repairs, whoever sent the request that
    hit it, must never let a client walk the daemon into `unloaded`)."""

    def __init__(self, config: Config) -> None:
        self.max_failures, self.window_s = config.breaker_max_failures, config.breaker_window_s
        self._at: deque[float] = deque()  # when each failed attempt failed (monotonic)

    @property
    def failures(self) -> int:
        return len(self._at)

    def failed(self) -> None:
        self._at.append(time.monotonic())

    def open(self) -> bool:
        now = time.monotonic()
        while self._at and now - self._at[0] > self.window_s:
            self._at.popleft()
        return len(self._at) >= self.max_failures

    def reset(self) -> None:
        self._at.clear()


def _milestone(progress: p.LoadProgress) -> tuple[int, bool]:
    return progress.files_done, progress.done_bytes >= progress.total_bytes


def _ms_since(t0: float) -> int:
    return round((time.monotonic() - t0) * 1000)


class Supervisor:
    """The rank pool's owner (its PoolListener) and the lifecycle's one listener."""

    def __init__(self, config: Config, model_dir: str, context_len: int, events: EventSink | None = None) -> None:
        #: Tokens per sequence the ranks' KV caches hold: the served context window (ServedModel.context_len,
        #: resolved there from the model and max_model_len).
        self.context_len = context_len
        self.events = events if events is not None else EventSink()
        self._fault_at: float | None = None
        self.config = config
        self.model_dir = model_dir
        self.history: deque[Transition] = deque(maxlen=256)  # recent transitions, for /admin/status and the tests
        self.load_progress: dict[int, p.LoadProgress] = {}  # the latest report of each rank of the current pool
        self.healthy = asyncio.Event()  # set exactly while the state is `healthy`
        # The supervisor is the lifecycle's one listener; every other observer gets transitions as events.
        self.lifecycle = Lifecycle(listeners=[self])
        self.pool: RankPool | None = None
        self.incidents = 0
        #: Times the state left `healthy` (a fault, a reload, an unload): ranks may have been replaced since,
        #: with empty KV caches, so the engine drops its prefix cache when this changes.
        self.epoch = 0
        self._incident: str | None = None
        # What the current incident's verdict is judged from, as it ends (neurond/judgement.py): the cause of the
        # fault that opened it, and whether an abort failed in it (the ladder says so through _emit).
        self._first_cause: str | None = None
        self._abort_failed = False
        self._recovery: asyncio.Task | None = None
        self.breaker = Breaker(config)
        self._stopping = False
        self.arming = FaultArming(config)
        self.on_gave_up: list[Callable[[Cause | None], None]] = []
        # Started when the model is first healthy (not while the first ranks load and import), and again
        # whenever the pool takes one, so the next is importing while the replaced rank loads.
        env = rank_env(config)
        self.launcher = Launcher(env, zygote=zygote_wanted(config.worker_zygote, config.device))
        self.spares = SpareWorkers(config.spare_workers, env, self.launcher)
        self.specs = RankSpecs(config, model_dir, context_len, env)  # every pool's, kept for the daemon's life
        self.ladder = RepairLadder.from_config(config, self._emit, self._restart_pool)

    @property
    def kv_blocks(self) -> int:
        """Blocks in every rank's paged KV cache (0: static; -1, sized from memory, until the first load)."""
        return self.specs.kv_cache_blocks

    # ------------------------------------------------------------------ state for readers
    @property
    def state(self) -> str:
        return self.lifecycle.state_id

    def snapshot(self) -> Snapshot:
        pool = self.pool
        return Snapshot(
            state=self.state, model=self.config.model_name(), model_dir=self.model_dir, tp_size=self.config.tp_size,
            incidents=self.incidents, current_incident=self.current_incident,
            pids=pool.pids() if pool is not None else {}, spare_pids=self.spares.pids(),
            zygote_pid=self.launcher.zygote_pid,
            spares_ready=self.spares.ready(), load_progress=dict(self.load_progress),
            last_cause=self.lifecycle.last_cause, transitions=tuple(self.history), kv_blocks=self.kv_blocks,
            rank_kv_blocks={} if pool is None else {r: i.kv_cache_blocks for r, i in pool.reports.items()})

    @property
    def current_incident(self) -> str | None:
        return self._incident

    @property
    def serving(self) -> bool:
        return self.lifecycle.serving and self.pool is not None

    def _send(self, event: str, cause: Cause) -> None:
        self.lifecycle.send(event, cause=cause)

    def after_transition(self, event: object, source: State, target: State, cause: Cause | None = None) -> None:
        self.history.append(Transition(str(event), source.id, target.id, cause.name if cause else "",
                                       cause.rung if cause else None, time.time()))
        if target.id == LifecycleState.HEALTHY:
            self.healthy.set()
            if not self._stopping:
                self.spares.fill()
        else:
            if self.healthy.is_set():
                self.epoch += 1
            self.healthy.clear()
        self._emit(Event.TRANSITION, cause, lifecycle_event=str(event), state_from=source.id, state_to=target.id)

    def _emit(self, name: Event, cause: Cause | None = None, **fields: Any) -> None:
        if name is Event.ABORT_FAILED:
            self._abort_failed = True
        if cause is not None:
            base = dict(incident=cause.incident or None, cause=cause.name, rank=cause.rank,
                        request_id=cause.request_id, rung=cause.rung, attempt=cause.attempt or None,
                        detail=cause.detail or None)
            base.update(fields)
            fields = base
        emit(self.events, name, model=self.config.model_name(), tp_size=self.config.tp_size, **fields)

    # ------------------------------------------------------------------ loading (and the pool's listener)
    def _new_pool(self) -> RankPool:
        self.load_progress = {}
        return RankPool(self.specs, self, load_timeout_s=self.config.load_timeout_s,
                        load_stall_timeout_s=self.config.load_stall_timeout_s,
                        comm_timeout_s=self.config.comm_timeout_s, spares=self.spares, launcher=self.launcher)

    def progress(self, progress: p.LoadProgress) -> None:
        previous = self.load_progress.get(progress.rank)
        self.load_progress[progress.rank] = progress
        # Journalled at its start, as files finish and at its end; the reports in between (bytes within a file,
        # the warm-up's steps) only keep the load's stall deadline and the status current.
        if previous is not None and progress.done_bytes > 0 and _milestone(previous) == _milestone(progress):
            return
        self._emit(Event.LOAD_PROGRESS, incident=self._incident, rank=progress.rank, done_bytes=progress.done_bytes,
                   total_bytes=progress.total_bytes, files_done=progress.files_done, files_total=progress.files_total)

    def spawned(self, rank: int, pid: int | None) -> None:
        self._emit(Event.RANK_SPAWNED, Cause("spawn", self._incident or "", rank), pid=pid)

    def spawning(self, spec: p.WorkerSpec) -> p.WorkerSpec:
        """The last word on a rank's spec as it is spawned: armed load faults; and a rank started by a repair
        captures its decode graphs as they are first used, not all before it says it is loaded."""
        if self._incident is not None:
            spec = dataclasses.replace(spec, capture_at_load=False)
        return self.arming.at_spawn(spec)

    def died(self, fault: RankDied) -> None:
        """A rank died outside any call. (While loading or recovering, the call in progress sees it itself.)"""
        if self.state == LifecycleState.HEALTHY and not self._stopping:
            self._fault(fault, None)

    # ------------------------------------------------------------------ fault injection (admin only)
    async def inject(self, rank: int, kind: str, phase: str, count: int = 1, after: int = 0) -> None:
        """Arm a fault on a rank, to fire at its next `count` calls of `phase` once `after` of them passed.
        Load-phase faults arm the next `count` spawns of that rank."""
        self.arming.check(rank, kind, phase, count, after)
        if phase == "load":
            self.arming.arm_load(rank, kind, count)
            return
        pool = self.pool
        if pool is None or not self.serving:
            raise PoolUnavailable(None, f"model is {self.state}")
        await pool.control([rank], lambda cid: p.InjectFault(cid, kind, phase, count, after), 5.0, "inject fault")

    async def start(self, cause: str = "startup") -> None:
        """Load the pool (state `loading`); a failure goes through the same recovery as any fault."""
        pool = self._new_pool()
        self.pool = pool
        try:
            await self._start_pool(pool)
        except PoolFault as fault:
            self._fault(fault, None)
            return
        if self.pool is pool and self.state == LifecycleState.LOADING:
            self._send("loaded", Cause(cause))

    # ------------------------------------------------------------------ steps (called by the engine)
    async def call(self, make: Callable[[int], p.StepCommand], deadline_s: float, what: str,
                   request_id: str | None = None) -> dict[int, object]:
        pool = self.pool
        if not self.serving or pool is None:
            raise PoolUnavailable(None, f"model is {self.state}")
        t0 = time.monotonic()
        try:
            return await pool.call_all(make, deadline_s, what)
        except PoolFault as fault:
            if self.pool is pool and self.state == LifecycleState.HEALTHY:
                self._fault(fault, request_id, detect_ms=_ms_since(t0))
                raise
            # A fault found outside this call came first (a rank died after it had answered the call; the
            # journal named no request): this step only ran into that incident's repair. Its requests are
            # replayed, with no strike: an innocent one struck twice so was failed as quarantined (chaos soak).
            raise PoolUnavailable(fault.rank, f"model is {self.state}: {fault.message}") from fault

    # ------------------------------------------------------------------ faults and recovery
    def _fault(self, fault: PoolFault, request_id: str | None, detect_ms: int | None = None) -> None:
        """`detect_ms`: how long the failed call had been running when its fault was known (for a hang, the
        step deadline); None for faults outside a call (a death between steps is seen at once, by pidfd)."""
        if self._incident is None:
            self._incident = new_incident_id()
            self.incidents += 1
            self._first_cause, self._abort_failed = fault.cause, False
        cause = Cause(fault.cause, self._incident, fault.rank, request_id, detail=fault.message)
        log.error("fault: %s (rank %s, request %s)", fault.message, fault.rank, request_id)
        self._fault_at = time.monotonic()
        self._emit(Event.FAULT_DETECTED, cause, detect_ms=detect_ms)
        self._send("fault", cause)
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover(fault, cause))

    async def _recover(self, fault: PoolFault, cause: Cause) -> None:
        attempt = 0
        while not self._stopping:
            attempt += 1
            if attempt > 1:  # the previous attempt failed
                self.breaker.failed()
            if self.breaker.open():
                await self._stop_pool()
                gave_up = cause.with_(name="breaker_open", rung=Rung.GIVE_UP, attempt=attempt)
                self._emit(Event.GAVE_UP, gave_up, duration_ms=self._since_fault_ms(), outcome="gave_up",
                           detail=f"{self.breaker.failures} recoveries within {self.config.breaker_window_s:.0f}s")
                self._send("give_up", gave_up)
                self._incident = None
                for callback in self.on_gave_up:
                    callback(self.lifecycle.last_cause)
                return
            if pause := backoff_s(self.config, attempt):
                # In `poisoned`, between a failed attempt and the next: the journal says how long, and stop()
                # cancels the wait like any other step.
                self._emit(Event.RECOVERY_BACKOFF, cause.with_(attempt=attempt), duration_ms=round(pause * 1000))
                await asyncio.sleep(pause)
            self._send("abort", cause.with_(attempt=attempt))
            rung: Rung = FULL_RELOAD
            victims: set[int] = set()
            try:
                # A pool that never finished loading has no weights to keep: only a full reload repairs it. (A
                # cheaper rung once "recovered" a start that had timed out, and the first request then found
                # ranks with no shard: seen on the 2-core box under load.)
                if self.pool is not None and self.pool.loaded and attempt == 1:
                    victims = await self.ladder.unblock(self.pool, fault, cause.with_(attempt=attempt))
                    rung = self.ladder.rung(victims)
                self._send("repair", cause.with_(rung=rung, attempt=attempt,
                                                 detail=f"replacing ranks {sorted(victims)}" if victims else ""))
                if rung == REPLACE_RANKS:
                    for rank in victims:  # their progress is of the processes being replaced
                        self.load_progress.pop(rank, None)
                await self.ladder.repair(self.pool, rung, victims, cause.with_(rung=rung, attempt=attempt))
            except PoolFault as again:
                # A fault during recovery: record it and climb the ladder.
                fault = again
                cause = cause.with_(name=again.cause, rank=again.rank, detail=again.message)
                if self.state == LifecycleState.RELOADING:
                    self._send("fault", cause.with_(attempt=attempt))
                continue
            if self._stopping:
                return
            done = cause.with_(rung=rung, attempt=attempt)
            took_ms = self._since_fault_ms()
            # The incident's verdict, judged once, here; the journal writes it as given.
            outcome, why = judge_recovery(self._first_cause or done.name, self.config.tp_size, rung, attempt,
                                          self._abort_failed, duration_ms=took_ms)
            self._emit(Event.RECOVERY_FINISHED, done, duration_ms=took_ms, outcome=outcome, outcome_why=why or None)
            self._send("recovered", done)
            self._incident = None
            return

    def _since_fault_ms(self) -> int | None:
        return None if self._fault_at is None else _ms_since(self._fault_at)

    async def _restart_pool(self) -> None:
        """Stop every rank and start a new pool (the full_reload rung, and the operator's reload)."""
        await self._stop_pool()
        pool = self._new_pool()
        self.pool = pool
        await self._start_pool(pool)

    async def _start_pool(self, pool: RankPool) -> None:
        await pool.start()  # (with kv_cache_blocks = -1 the first load agrees on the size: pool/specs.py)

    async def _stop_pool(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.stop(self.config.kill_grace_s)

    # ------------------------------------------------------------------ operator actions (admin API, SIGHUP)
    async def reload(self, cause: str = "operator_reload") -> None:
        """Reload every rank from the checkpoint; from `unloaded` this is a load."""
        if self.state == LifecycleState.UNLOADED:
            await self.load(cause)
            return
        full_reload = Cause(cause, rung=Rung.FULL_RELOAD)
        self._send("reload", full_reload)
        try:
            await self._restart_pool()
        except PoolFault as fault:
            self._fault(fault, None)
            return
        self._send("recovered", full_reload)

    async def load(self, cause: str = "operator_load") -> None:
        self.breaker.reset()
        self._send("load", Cause(cause))
        await self.start(cause)

    async def unload(self, cause: str = "operator_unload") -> None:
        self._send("unload", Cause(cause))  # first, so nothing new is admitted while the ranks stop
        await self._stop_pool()

    # ------------------------------------------------------------------ shutdown
    async def stop(self) -> None:
        self._stopping = True
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()
            try:
                await self._recovery
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self.state != LifecycleState.STOPPED:
            self._send("stop", Cause("shutdown"))
        self.spares.close()
        await self._stop_pool()
        self.launcher.close()

