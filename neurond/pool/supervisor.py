"""The supervisor: the only writer of pool state. It loads the pool, runs steps for the engine, turns every
fault into lifecycle transitions and repairs the pool.

Repair ladder, cheapest first (each rung recorded on the transition as `tier`). First the communicator of
every live rank is aborted from its control thread and every rank is pinged: a rank that is dead, still
stuck inside the failed call, or whose device context is ruined cannot go on as it is.
  comm_rebuild  no such rank: a fresh communicator among the same processes, weights kept. Today only at
                TP=1, because transformers' TP layers stay bound to the process group they were loaded with
                (re-pointing them at a new group is the open part of the recovery issue).
  full_reload   stop every rank (SIGTERM, then SIGKILL) and start a new pool
  give_up       after `breaker_max_failures` failed recoveries within `breaker_window_s`: -> unloaded
Every rung has a deadline; a miss escalates to the next rung. Nothing waits unbounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from typing import Callable

from neurond.config import Config
from neurond.pool import protocol as p
from neurond.pool.faults import PoolFault, PoolUnavailable, RankDied, StepTimeout
from neurond.observe.events import Event, EventSink, emit
from neurond.pool.lifecycle import Cause, Lifecycle, new_incident_id
from neurond.pool.pool import RankPool

log = logging.getLogger("neurond.supervisor")

# Environment every rank gets; NVLink multicast stays off (it can take shared GPUs out of service).
RANK_ENV = (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1"))


class Supervisor:
    def __init__(self, config: Config, model_dir: str, listeners: list | None = None,
                 events: EventSink | None = None) -> None:
        self.events = events if events is not None else EventSink()
        self._fault_at: float | None = None
        self.config = config
        self.model_dir = model_dir
        self.history: deque[tuple[str, str, str, str, str | None]] = deque(maxlen=256)
        self.lifecycle = Lifecycle(listeners=[self, *(listeners or [])])
        self.pool: RankPool | None = None
        self.incidents = 0
        self._incident: str | None = None
        self._recovery: asyncio.Task | None = None
        self._failures: deque[float] = deque()
        self._stopping = False
        self._load_faults: dict[int, list[str]] = {}
        self.on_unhealthy: list[Callable[[PoolFault | None], None]] = []
        self.on_gave_up: list[Callable[[Cause | None], None]] = []

    # ------------------------------------------------------------------ state for readers
    @property
    def state(self) -> str:
        return self.lifecycle.state_id

    @property
    def current_incident(self) -> str | None:
        return self._incident

    @property
    def serving(self) -> bool:
        return self.lifecycle.serving and self.pool is not None

    def _send(self, event: str, cause: Cause) -> None:
        self.lifecycle.send(event, cause=cause)

    def after_transition(self, event, source, target, cause: Cause | None = None) -> None:
        """(event, from, to, reason, tier) of recent transitions, for /admin/status and the tests."""
        self.history.append((str(event), source.id, target.id, cause.reason if cause else "", cause.tier if cause else None))
        self._emit(Event.TRANSITION, cause, lifecycle_event=str(event), state_from=source.id, state_to=target.id)

    def _emit(self, name: Event, cause: Cause | None = None, **fields) -> None:
        if cause is not None:
            base = dict(incident=cause.incident or None, cause=cause.reason, rank=cause.rank,
                        request_id=cause.request_id, tier=cause.tier, attempt=cause.attempt or None,
                        detail=cause.detail or None)
            base.update(fields)
            fields = base
        emit(self.events, name, model=self.config.model_name(), tp_size=self.config.tp_size, **fields)

    # ------------------------------------------------------------------ loading
    def _specs(self) -> list[p.WorkerSpec]:
        c = self.config
        return [
            p.WorkerSpec(
                rank=r,
                world_size=c.tp_size,
                model_dir=self.model_dir,
                dtype=c.dtype,
                device=c.device,
                backend=c.backend,
                env=RANK_ENV,
                log_level=c.log_level,
                fault_injection=c.fault_injection,
            )
            for r in range(c.tp_size)
        ]

    def _new_pool(self) -> RankPool:
        return RankPool(self._specs(), on_fault=self._on_pool_fault, load_timeout_s=self.config.load_timeout_s,
                        spec_hook=self._arm_load_faults, on_spawn=self._on_spawn)

    def _on_spawn(self, rank: int, pid: int | None) -> None:
        self._emit(Event.RANK_SPAWNED, Cause("spawn", self._incident or "", rank), pid=pid)

    # ------------------------------------------------------------------ fault injection (admin only)
    async def inject(self, rank: int, kind: str, phase: str, count: int = 1) -> None:
        """Arm a fault on a rank. Load-phase faults arm the next `count` spawns of that rank."""
        if not self.config.fault_injection:
            raise PermissionError("fault injection is disabled (set fault_injection = true)")
        if not 0 <= rank < self.config.tp_size:
            raise ValueError(f"rank must be 0..{self.config.tp_size - 1}")
        from neurond.worker.faults import KINDS, PHASES

        if kind not in KINDS or phase not in PHASES or count < 1:
            raise ValueError(f"kind must be one of {KINDS}, phase one of {PHASES}, count >= 1")
        if phase == "load":
            self._load_faults.setdefault(rank, []).extend([kind] * count)
            return
        pool = self.pool
        if pool is None or not self.serving:
            raise PoolUnavailable(None, f"model is {self.state}")
        await pool.control([rank], lambda cid: p.InjectFault(cid, kind, phase, count), 5.0, "inject fault")

    def _arm_load_faults(self, spec: p.WorkerSpec) -> p.WorkerSpec:
        pending = self._load_faults.get(spec.rank)
        if not pending:
            return spec
        kind = pending.pop(0)
        return dataclasses.replace(spec, faults=spec.faults + ((kind, "load", 1),))

    async def start(self, reason: str = "startup") -> None:
        """Load the pool (state `loading`); a failure goes through the same recovery as any fault."""
        pool = self._new_pool()
        self.pool = pool
        try:
            await pool.start()
        except PoolFault as fault:
            self._fault(fault, None)
            return
        if self.pool is pool and self.state == "loading":
            self._send("loaded", Cause(reason))

    # ------------------------------------------------------------------ steps (called by the engine)
    async def call(self, make, deadline_s: float, what: str, request_id: str | None = None) -> dict[int, object]:
        pool = self.pool
        if not self.serving or pool is None:
            raise PoolUnavailable(None, f"model is {self.state}")
        try:
            return await pool.call_all(make, deadline_s, what)
        except PoolFault as fault:
            if self.pool is pool and self.state == "healthy":
                self._fault(fault, request_id)
            raise

    def _on_pool_fault(self, fault: PoolFault) -> None:
        """A rank died outside any call. (While loading or recovering, the call in progress sees it itself.)"""
        if self.state == "healthy" and not self._stopping:
            self._fault(fault, None)

    # ------------------------------------------------------------------ faults and recovery
    def _fault(self, fault: PoolFault, request_id: str | None) -> None:
        if self._incident is None:
            self._incident = new_incident_id()
            self.incidents += 1
        cause = Cause(fault.cause, self._incident, fault.rank, request_id, detail=fault.message)
        log.error("fault: %s (rank %s, request %s)", fault.message, fault.rank, request_id)
        self._fault_at = time.monotonic()
        self._emit(Event.FAULT_DETECTED, cause)
        self._send("fault", cause)
        for callback in self.on_unhealthy:
            callback(fault)
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover(fault, cause))

    def _breaker_open(self) -> bool:
        now = time.monotonic()
        while self._failures and now - self._failures[0] > self.config.breaker_window_s:
            self._failures.popleft()
        return len(self._failures) >= self.config.breaker_max_failures

    async def _recover(self, fault: PoolFault, cause: Cause) -> None:
        attempt = 0
        while not self._stopping:
            attempt += 1
            self._failures.append(time.monotonic())
            if self._breaker_open():
                await self._stop_pool()
                gave_up = cause.with_(reason="breaker_open", tier="give_up", attempt=attempt)
                self._emit(Event.GAVE_UP, gave_up, duration_ms=self._since_fault_ms(),
                           detail=f"{len(self._failures)} recoveries within {self.config.breaker_window_s:.0f}s")
                self._send("give_up", gave_up)
                self._incident = None
                for callback in self.on_gave_up:
                    callback(self.lifecycle.last_cause)
                return
            self._send("abort", cause.with_(attempt=attempt))
            tier = "full_reload"
            victims: set[int] = set()
            try:
                if self.pool is not None:
                    victims = await self._unblock(fault, cause.with_(attempt=attempt))
                    if not victims and self.pool.world_size == 1 and attempt == 1:
                        tier = "comm_rebuild"
                self._send("repair", cause.with_(tier=tier, attempt=attempt, detail=f"replacing ranks {sorted(victims)}"))
                if tier == "comm_rebuild":
                    t0 = time.monotonic()
                    await self.pool.form_comm()
                    self._emit(Event.COMM_REBUILT, cause.with_(tier=tier, attempt=attempt),
                               duration_ms=round((time.monotonic() - t0) * 1000))
                else:
                    await self._full_reload(victims)
            except PoolFault as again:
                # A fault during recovery: record it and climb the ladder.
                fault = again
                cause = cause.with_(reason=again.cause, rank=again.rank, detail=again.message)
                if self.state == "reloading":
                    self._send("fault", cause.with_(attempt=attempt))
                continue
            if self._stopping:
                return
            done = cause.with_(tier=tier, attempt=attempt)
            self._emit(Event.RECOVERY_FINISHED, done, duration_ms=self._since_fault_ms())
            self._send("recovered", done)
            self._incident = None
            return

    def _since_fault_ms(self) -> int | None:
        return None if self._fault_at is None else round((time.monotonic() - self._fault_at) * 1000)

    async def _unblock(self, fault: PoolFault, cause: Cause | None = None) -> set[int]:
        """Abort the communicator on every live rank; return the ranks that cannot go on as they are:
        dead, stuck inside a call after the abort, or with a ruined device context."""
        pool = self.pool
        victims: set[int] = set()
        if isinstance(fault, (RankDied, StepTimeout)) or not fault.context_ok:
            victims.add(fault.rank)
        if isinstance(fault, StepTimeout):
            victims.update(fault.ranks)
        alive = pool.alive_ranks()
        self._emit(Event.ABORT_STARTED, cause, detail=f"aborting the communicator on ranks {alive}")
        t0 = time.monotonic()
        try:
            await pool.control(alive, lambda cid: p.AbortComm(cid), self.config.abort_timeout_s, "abort")
            self._emit(Event.ABORT_FINISHED, cause, duration_ms=round((time.monotonic() - t0) * 1000))
        except PoolFault as missed:
            log.warning("abort: %s", missed.message)
            self._emit(Event.ABORT_FAILED, cause, duration_ms=round((time.monotonic() - t0) * 1000),
                       detail=missed.message)
        # A rank whose compute thread is still inside a call after the abort is stuck for good
        # (always so on gloo, where abort does not unblock a collective).
        try:
            pongs = await pool.control(pool.alive_ranks(), lambda cid: p.Ping(cid), self.config.abort_timeout_s, "ping")
            victims.update(rank for rank, pong in pongs.items() if pong.busy_s > 0)
        except StepTimeout as missed:
            victims.update(missed.ranks)
        except PoolFault:
            pass
        victims.update(r for r in range(pool.world_size) if r not in pool.alive_ranks())
        victims.discard(None)
        return victims

    async def _full_reload(self, victims: set[int] = frozenset()) -> None:
        # Stuck or broken ranks get SIGKILL at once: asking them to shut down would only wait out the grace.
        if self.pool is not None and victims:
            await self.pool.kill_ranks(sorted(victims), timeout_s=10.0)
            for rank in sorted(victims):
                self._emit(Event.RANK_KILLED, Cause("recovery", self._incident or "", rank, tier="full_reload"),
                           detail="SIGKILL: dead, stuck in the failed call, or device context ruined")
        await self._stop_pool()
        pool = self._new_pool()
        self.pool = pool
        await pool.start()

    async def _stop_pool(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.stop(self.config.kill_grace_s)

    # ------------------------------------------------------------------ operator actions (admin API, SIGHUP)
    async def reload(self, reason: str = "operator_reload") -> None:
        """Reload every rank from the checkpoint; from `unloaded` this is a load."""
        if self.state == "unloaded":
            await self.load(reason)
            return
        cause = Cause(reason, tier="full_reload")
        self._send("reload", cause)
        try:
            await self._full_reload()
        except PoolFault as fault:
            self._fault(fault, None)
            return
        self._send("recovered", cause)

    async def load(self, reason: str = "operator_load") -> None:
        self._failures.clear()
        self._send("load", Cause(reason))
        await self.start(reason)

    async def unload(self, reason: str = "operator_unload") -> None:
        self._send("unload", Cause(reason))  # first, so nothing new is admitted while the ranks stop
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
        if self.state != "stopped":
            self._send("stop", Cause("shutdown"))
        await self._stop_pool()

