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
import logging
import time
from collections import deque
from typing import Callable

from neurond.config import Config
from neurond.pool import protocol as p
from neurond.pool.faults import PoolFault, PoolUnavailable, RankDied, StepTimeout
from neurond.pool.lifecycle import Cause, Lifecycle, new_incident_id
from neurond.pool.pool import RankPool

log = logging.getLogger("neurond.supervisor")

# Environment every rank gets; NVLink multicast stays off (it can take shared GPUs out of service).
RANK_ENV = (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1"))


class Supervisor:
    def __init__(self, config: Config, model_dir: str, listeners: list | None = None) -> None:
        self.config = config
        self.model_dir = model_dir
        self.lifecycle = Lifecycle(listeners=listeners)
        self.pool: RankPool | None = None
        self.incidents = 0
        self._incident: str | None = None
        self._recovery: asyncio.Task | None = None
        self._failures: deque[float] = deque()
        self._stopping = False
        self.on_unhealthy: list[Callable[[PoolFault | None], None]] = []

    # ------------------------------------------------------------------ state for readers
    @property
    def state(self) -> str:
        return self.lifecycle.state_id

    @property
    def serving(self) -> bool:
        return self.lifecycle.serving and self.pool is not None

    def _send(self, event: str, cause: Cause) -> None:
        self.lifecycle.send(event, cause=cause)

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
            )
            for r in range(c.tp_size)
        ]

    def _new_pool(self) -> RankPool:
        return RankPool(self._specs(), on_fault=self._on_pool_fault, load_timeout_s=self.config.load_timeout_s)

    async def start(self) -> None:
        """Load the pool (state `loading`); a failure goes through the same recovery as any fault."""
        pool = self._new_pool()
        self.pool = pool
        try:
            await pool.start()
        except PoolFault as fault:
            self._fault(fault, None)
            return
        if self.pool is pool and self.state == "loading":
            self._send("loaded", Cause("startup"))

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
        """A rank died outside any call."""
        if self.state in ("healthy", "loading", "reloading") and not self._stopping:
            self._fault(fault, None)

    # ------------------------------------------------------------------ faults and recovery
    def _fault(self, fault: PoolFault, request_id: str | None) -> None:
        if self._incident is None:
            self._incident = new_incident_id()
            self.incidents += 1
        cause = Cause(fault.cause, self._incident, fault.rank, request_id, detail=fault.message)
        log.error("fault: %s (rank %s, request %s)", fault.message, fault.rank, request_id)
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
                self._send("give_up", cause.with_(reason="breaker_open", tier="give_up", attempt=attempt))
                await self._stop_pool()
                self._incident = None
                return
            self._send("abort", cause.with_(attempt=attempt))
            tier = "full_reload"
            try:
                if self.pool is not None and attempt == 1:
                    victims = await self._unblock(fault)
                    if not victims and self.pool.world_size == 1:
                        tier = "comm_rebuild"
                self._send("repair", cause.with_(tier=tier, attempt=attempt))
                if tier == "comm_rebuild":
                    await self.pool.form_comm()
                else:
                    await self._full_reload()
            except PoolFault as again:
                # A fault during recovery: record it and climb the ladder.
                fault = again
                cause = cause.with_(reason=again.cause, rank=again.rank, detail=again.message)
                if self.state == "reloading":
                    self._send("fault", cause.with_(attempt=attempt))
                continue
            if self._stopping:
                return
            self._send("recovered", cause.with_(tier=tier, attempt=attempt))
            self._incident = None
            return

    async def _unblock(self, fault: PoolFault) -> set[int]:
        """Abort the communicator on every live rank; return the ranks that cannot go on as they are:
        dead, stuck inside a call after the abort, or with a ruined device context."""
        pool = self.pool
        victims: set[int] = set()
        if isinstance(fault, (RankDied, StepTimeout)) or not fault.context_ok:
            victims.add(fault.rank)
        if isinstance(fault, StepTimeout):
            victims.update(fault.ranks)
        try:
            await pool.control(pool.alive_ranks(), lambda cid: p.AbortComm(cid), self.config.abort_timeout_s, "abort")
        except PoolFault as missed:
            log.warning("abort: %s", missed.message)
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

    async def _full_reload(self) -> None:
        await self._stop_pool()
        pool = self._new_pool()
        self.pool = pool
        await pool.start()

    async def _stop_pool(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.stop(self.config.kill_grace_s)

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

