"""Faults armed for a rehearsal (the admin API's /admin/faults, with fault_injection = true): checked here, then
a step fault goes to its rank at once, and a load fault waits here for that rank's next spawns, in its spec."""

from __future__ import annotations

import dataclasses

from neurond import protocol as p
from neurond.config import Config


class FaultArming:
    def __init__(self, config: Config) -> None:
        self.enabled = config.fault_injection
        self.tp_size = config.tp_size
        self._load: dict[int, list[str]] = {}  # rank -> kinds for its next spawns, in order

    def check(self, rank: int, kind: str, phase: str, count: int, after: int) -> None:
        """PermissionError when fault injection is off, ValueError for a fault that cannot be armed."""
        if not self.enabled:
            raise PermissionError("fault injection is disabled (set fault_injection = true)")
        if not 0 <= rank < self.tp_size:
            raise ValueError(f"rank must be 0..{self.tp_size - 1}")
        if kind not in p.FAULT_KINDS or phase not in p.FAULT_PHASES or count < 1 or after < 0:
            raise ValueError(f"kind must be one of {p.FAULT_KINDS}, phase one of {p.FAULT_PHASES}, count >= 1, "
                             f"after >= 0")
        if phase == "load" and after:
            raise ValueError("after is for step phases (a load fault fires at the next spawns)")

    def arm_load(self, rank: int, kind: str, count: int = 1) -> None:
        self._load.setdefault(rank, []).extend([kind] * count)

    def at_spawn(self, spec: p.WorkerSpec) -> p.WorkerSpec:
        """`spec` with the next load fault armed for its rank, if any."""
        pending = self._load.get(spec.rank)
        if not pending:
            return spec
        kind = pending.pop(0)
        return dataclasses.replace(spec, faults=spec.faults + ((kind, "load", 1),))
