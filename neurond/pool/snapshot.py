"""What the supervisor knows, for readers: its recent transitions and a snapshot of its state at one moment
(the admin status, and so `neurond status`, show them). Plain data; the supervisor (pool/supervisor.py) makes it."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from neurond import protocol as p
from neurond.lifecycle import Cause


class Transition(NamedTuple):
    """One lifecycle transition as the supervisor remembers it (the admin status lists the last 256)."""

    event: str
    source: str
    target: str
    cause: str
    rung: str | None
    at: float  # wall-clock time


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """What the supervisor knows, at one moment, for the admin status (and so `neurond status`)."""

    state: str
    model: str
    model_dir: str
    tp_size: int
    incidents: int
    current_incident: str | None
    pids: dict[int, int | None]  # rank -> its process id (None: not started yet)
    spare_pids: list[int]
    zygote_pid: int | None  # the worker zygote (pool/launcher.py), when one runs
    spares_ready: int
    load_progress: dict[int, p.LoadProgress]
    last_cause: Cause | None
    transitions: tuple[Transition, ...]
    kv_blocks: int  # the paged KV cache's blocks the engine hands out (0: static; -1: not measured yet)
    rank_kv_blocks: dict[int, int]  # rank -> the blocks its cache made at its last load
