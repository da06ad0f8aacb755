"""What the engine needs of the pool: `StepPool`, exactly the members of the supervisor (pool/supervisor.py)
that engine.py reads or calls, so a reader (and mypy) can follow a step from the engine to the pipe, and the
engine's tests run against a fake that mypy checks against the same Protocol (tests/engine/fakes.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from neurond import protocol as p
from neurond.observe.events import EventSink


class StepPool(Protocol):
    """The supervisor, as the engine sees it (Supervisor, or the tests' FakeSupervisor)."""

    @property
    def serving(self) -> bool:
        """Steps may be sent: the pool is healthy (else the engine waits, bounded, for the repair)."""

    @property
    def state(self) -> str:
        """The lifecycle state (a LifecycleState value), for errors and for knowing a repair gave up."""

    @property
    def epoch(self) -> int:
        """Times the pool stopped serving: when it changes, ranks may be new and the prefix cache is dropped."""

    @property
    def kv_blocks(self) -> int:
        """Blocks in every rank's paged KV cache (0: static; -1: not measured by a first load yet)."""

    @property
    def healthy(self) -> asyncio.Event:
        """Set exactly while the pool is healthy (the engine waits on it for a repair)."""

    @property
    def events(self) -> EventSink:
        """Where the engine's journal events go (request_failed)."""

    @property
    def current_incident(self) -> str | None:
        """The incident being repaired, named in a failed request's journal entry."""

    async def call(self, make: Callable[[int], p.StepCommand], deadline_s: float, what: str,
                   request_id: str | None = None) -> dict[int, object]:
        """Send `make(call_id)` to every rank and wait, within `deadline_s`, for every rank's `p.Done` (by rank);
        a failed step raises a PoolFault (`pool/faults.py`), PoolUnavailable when the pool is not serving."""
        ...
