"""The API's and the admin API's test doubles: a supervisor (`FakePool`) and an engine (`FakeEngine`), no
processes.

mypy checks this module (scripts/test) against the Protocols the APIs depend on (api/app.py's `PoolState` and
`GenerationQueue`, api/admin.py's `AdminPool` and `EngineCounts`): a fake that drifts from what they use fails
type-checking (the assignments at the end).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from neurond.api.admin import AdminPool, EngineCounts
from neurond.api.app import GenerationQueue, PoolState
from neurond.engine.outcomes import EngineStats
from neurond.engine.request import GenerationRequest
from neurond.lifecycle import Cause, LifecycleState
from neurond.pool.snapshot import Snapshot, Transition


class FakeLifecycle:
    def __init__(self, last_cause: Cause | None = None) -> None:
        self.last_cause = last_cause


class FakePool:
    """A supervisor in lifecycle state `state`, its last transition caused by `last_cause`. It records the
    operator's actions and the faults armed, and changes no state for them."""

    def __init__(self, state: str = LifecycleState.HEALTHY, last_cause: Cause | None = None) -> None:
        self.state = state
        self.lifecycle = FakeLifecycle(last_cause)
        self.actions: list[str] = []
        self.armed: list[tuple[int, str, str, int, int]] = []
        self.transitions: tuple[Transition, ...] = ()

    @property
    def serving(self) -> bool:
        return self.state == LifecycleState.HEALTHY

    def snapshot(self) -> Snapshot:
        return Snapshot(state=self.state, model="fake", model_dir="/nonexistent", tp_size=2, incidents=0,
                        current_incident=None, pids={0: 101, 1: 102}, spare_pids=[], zygote_pid=None,
                        spares_ready=0, load_progress={}, last_cause=self.lifecycle.last_cause,
                        transitions=self.transitions, kv_blocks=0, rank_kv_blocks={})

    async def inject(self, rank: int, kind: str, phase: str, count: int, after: int) -> None:
        self.armed.append((rank, kind, phase, count, after))

    async def reload(self) -> None:
        self.actions.append("reload")

    async def unload(self) -> None:
        self.actions.append("unload")

    async def load(self) -> None:
        self.actions.append("load")


class FakeEngine:
    """An engine that takes every request and runs none."""

    def __init__(self, kv_positions: int = 4096) -> None:
        self.kv_positions = kv_positions
        self.submitted: list[GenerationRequest] = []
        self.stats: EngineStats = {"completed": 3, "failed": 1, "cancelled": 0, "replayed": 0, "quarantined": 0,
                                   "repair_wait_expired": 0, "preempted": 0, "last_cancelled_tokens": None,
                                   "max_batch_seen": 2}

    def submit_all(self, reqs: list[GenerationRequest]) -> None:
        self.submitted.extend(reqs)


def transition(event: str, source: str, target: str, cause: str) -> Transition:
    return Transition(event, source, target, cause, None, time.time())


# What mypy checks: the fakes are what the APIs take (a member missing or of another type fails here).
if TYPE_CHECKING:
    _ready: PoolState = FakePool()
    _admin: AdminPool = FakePool()
    _queue: GenerationQueue = FakeEngine()
    _counts: EngineCounts = FakeEngine()
