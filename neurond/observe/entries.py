"""neurond's journal entries as the audit reads them: typed, each counted once, grouped by daemon instance.

Identity of an entry. systemd-journal-upload resends what it is not sure the collector stored (after a network
outage, or when it was stopped before saving its cursor), and systemd-journal-remote appends whatever it
receives: one entry can be stored twice in one file, or once in an archived file and once in the active file
after a rotation. journalctl skips a copy found in another file, not one in the same file. What a copy does not
share is the collector's position (__CURSOR, and __SEQNUM where systemd exports it): it is new on every write.
What it does share is what the sending host's journald stamped when the entry was first received, copied
verbatim by upload and remote: __REALTIME_TIMESTAMP, __MONOTONIC_TIMESTAMP and every field (_HOSTNAME,
_BOOT_ID, _PID, MESSAGE_ID, MESSAGE, NEUROND_*, ...). So an entry is both timestamps and all its fields, the
collector's position left out: two copies are equal; two distinct entries would need one process to send the
same fields twice within one microsecond of both clocks.

Instance. A daemon instance is one run of the leader process, the one that sends neurond's events: its host,
its boot (_BOOT_ID) and its PID, from its start (the load that ends in the `startup` transition) to the
transition into `stopped`. PIDs repeat across boots all the time on small systems, so the PID alone never says
which daemon an entry came from; within one boot a PID given to a second daemon is told apart by the first
one's stop, or by a second start.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from dataclasses import dataclass, replace

from neurond.lifecycle import LifecycleState


def value(entry: dict, name: str) -> str | None:
    """A field of a `journalctl -o json` entry: a repeated field is a list, non-UTF-8 a list of byte values."""
    v = entry.get(name)
    if isinstance(v, list):
        v = v[0] if v and not isinstance(v[0], int) else bytes(v).decode(errors="replace") if v else None
    return v


def _int(v: str | None) -> int | None:
    try:
        return int(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


# Address fields that are the collector's position, new on every copy; the timestamps are the sender's.
_SENDERS_ADDRESS = ("__REALTIME_TIMESTAMP", "__MONOTONIC_TIMESTAMP")


def identity(raw: dict) -> tuple[tuple[str, str], ...]:
    """What every copy of one entry shares (see the module docstring)."""
    return tuple(sorted((k, json.dumps(v) if isinstance(v, list) else str(v)) for k, v in raw.items()
                        if not k.startswith("__") or k in _SENDERS_ADDRESS))


@dataclass(frozen=True)
class Entry:
    """One of neurond's event entries, with the fields the audit reads."""

    host: str
    boot: str
    pid: str
    realtime_us: int
    monotonic_us: int | None
    unit: str
    event: str | None
    incident: str | None
    lifecycle_event: str | None  # on transitions: NEUROND_LIFECYCLE_EVENT, NEUROND_STATE_FROM/_TO
    state_from: str | None
    state_to: str | None
    cause: str | None
    rank: str | None
    rung: str | None
    attempt: int | None
    duration_ms: int | None
    tp_size: int | None
    tp_impl: str | None
    model: str | None
    outcome: str | None  # NEUROND_OUTCOME, as the daemon judged its recovery

    @property
    def order(self) -> tuple[int, int]:
        """Order within one boot: the monotonic clock (the realtime clock may be stepped), else realtime."""
        return self.monotonic_us or 0, self.realtime_us

    @property
    def is_stop(self) -> bool:
        return self.event == "transition" and self.state_to == LifecycleState.STOPPED

    @property
    def is_startup(self) -> bool:
        """The daemon's first load finished: sent once per daemon run (Supervisor.start at serve)."""
        return self.event == "transition" and self.state_to == LifecycleState.HEALTHY and self.cause == "startup"

    @property
    def is_loading(self) -> bool:
        """A step of a load outside any incident: what a starting daemon sends before its startup transition."""
        return self.incident is None and self.event in ("rank_spawned", "load_progress")


def parse(raw: dict) -> Entry:
    """An entry of `journalctl -o json`."""
    f = lambda name: value(raw, name)  # noqa: E731
    return Entry(
        host=f("_HOSTNAME") or "?", boot=f("_BOOT_ID") or "", pid=f("_PID") or "",
        realtime_us=_int(f("__REALTIME_TIMESTAMP")) or 0, monotonic_us=_int(f("__MONOTONIC_TIMESTAMP")),
        unit=f("_SYSTEMD_UNIT") or "", event=f("NEUROND_EVENT"), incident=f("NEUROND_INCIDENT") or None,
        lifecycle_event=f("NEUROND_LIFECYCLE_EVENT"), state_from=f("NEUROND_STATE_FROM"),
        state_to=f("NEUROND_STATE_TO"), cause=f("NEUROND_CAUSE"), rank=f("NEUROND_RANK"),
        rung=f("NEUROND_RUNG") or f("NEUROND_TIER"),  # NEUROND_TIER: journals of daemons before the rename
        attempt=_int(f("NEUROND_ATTEMPT")), duration_ms=_int(f("NEUROND_DURATION_MS")),
        tp_size=_int(f("NEUROND_TP_SIZE")), tp_impl=f("NEUROND_TP_IMPL"), model=f("NEUROND_MODEL"),
        outcome=f("NEUROND_OUTCOME"))


def unique(raw_entries: list[dict]) -> list[Entry]:
    """The entries, each once however many copies the journals hold (the first copy read is kept)."""
    seen: dict[tuple, Entry] = {}
    for raw in raw_entries:
        key = identity(raw)
        if key not in seen:
            seen[key] = parse(raw)
    return list(seen.values())


@dataclass(frozen=True)
class Instance:
    """One run of the daemon (see the module docstring), and how it ended as far as the journal knows."""

    host: str
    unit: str
    boot: str
    pid: str
    start_us: int  # realtime of its first entry
    last_us: int  # realtime of its last entry
    stopped_us: int | None  # its lifecycle reached `stopped`: stopped on request (or after a give-up)
    # It never stopped, yet the same host's neurond unit started again after its last entry: it was killed
    # (e.g. by the watchdog), crashed, or its host went down. The time is that next start.
    died_us: int | None = None
    rebooted: bool = False  # the next start was in another boot

    @property
    def ended(self) -> bool:
        return self.stopped_us is not None or self.died_us is not None


def instances(entries: list[Entry]) -> list[tuple[Instance, list[Entry]]]:
    """Every daemon instance with its entries in order, oldest instance of each host first."""
    by_process: dict[tuple[str, str, str], list[Entry]] = defaultdict(list)
    for e in entries:
        by_process[(e.host, e.boot, e.pid)].append(e)
    runs: list[list[Entry]] = []
    for rows in by_process.values():
        rows.sort(key=lambda e: e.order)
        cuts = _starts(rows)
        runs += [rows[a:b] for a, b in itertools.pairwise(cuts + [len(rows)])]
    found = [(Instance(r[0].host, r[0].unit, r[0].boot, r[0].pid, min(e.realtime_us for e in r),
                       max(e.realtime_us for e in r), r[-1].realtime_us if r[-1].is_stop else None), r) for r in runs]
    found.sort(key=lambda pair: (pair[0].host, pair[0].start_us))
    return [(_fate(inst, [i for i, _ in found]), rows) for inst, rows in found]


def _starts(rows: list[Entry]) -> list[int]:
    """Where each daemon that had this host, boot and PID begins in `rows` (in order): after a stop; and at a
    second startup without a stop between (the first daemon was killed and another got its PID), from the
    start of the load that led to it."""
    starts, started = [0], False
    for i, e in enumerate(rows):
        if e.is_stop and i + 1 < len(rows):
            starts.append(i + 1)
            started = False
        elif e.is_startup:
            if started:
                j = i
                while j > starts[-1] + 1 and rows[j - 1].is_loading:
                    j -= 1
                starts.append(j)
            started = True
    return starts


def _fate(inst: Instance, every: list[Instance]) -> Instance:
    """`inst` with died_us set when it never stopped and its unit started again on its host after it fell
    silent. A later instance whose start overlaps `inst`'s entries is not its successor (two daemons at once)."""
    if inst.stopped_us is not None:
        return inst
    later = [i for i in every if i.host == inst.host and i.unit == inst.unit and i.start_us > inst.last_us]
    if not later:
        return inst
    nxt = min(later, key=lambda i: i.start_us)
    return replace(inst, died_us=nxt.start_us, rebooted=nxt.boot != inst.boot)
