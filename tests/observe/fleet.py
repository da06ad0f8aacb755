"""A fleet of five hosts as real journal files: each host's neurond entries, made by the daemon's own entry
builder (neurond.observe.journal.entry_for) in the order the supervisor sends them, written with
systemd-journal-remote. What each host should be classified as is in EXPECTED."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from neurond.judgement import judge_recovery
from neurond.observe.events import Event as E, Observation
from neurond.observe.journal import entry_for
from tests.observe.journald import write_journal_file

SITE = ("/opt/neurond/neurond/pool/supervisor.py", 1, "Supervisor._recover")
MODEL = "llama-3-8b-instruct"


def startup(tp: int):
    return [(E.RANK_SPAWNED, dict(cause="spawn", rank=r, pid=1000 + r)) for r in range(tp)] + [
        (E.TRANSITION, dict(cause="startup", lifecycle_event="loaded", state_from="loading", state_to="healthy"))]


def fault(inc, cause, rank, request=True, status=503):
    request_id = "req-" + inc if request else None
    out = [(E.FAULT_DETECTED, dict(incident=inc, cause=cause, rank=rank, request_id=request_id)),
           (E.TRANSITION, dict(incident=inc, cause=cause, rank=rank, lifecycle_event="fault", state_from="healthy",
                               state_to="poisoned"))]
    if request:
        out.append((E.REQUEST_FAILED, dict(incident=inc, cause=cause, rank=rank, request_id=request_id, status=status)))
    return out


def abort(inc, cause, attempt, ok=True, state_from="poisoned"):
    out = [(E.TRANSITION, dict(incident=inc, cause=cause, attempt=attempt, lifecycle_event="abort",
                               state_from=state_from, state_to="aborting")),
           (E.ABORT_STARTED, dict(incident=inc, cause=cause, attempt=attempt))]
    if ok:
        return out + [(E.ABORT_FINISHED, dict(incident=inc, cause=cause, attempt=attempt, duration_ms=4))]
    return out + [(E.ABORT_FAILED, dict(incident=inc, cause=cause, attempt=attempt, duration_ms=2001,
                                        detail="abort did not finish within 2.00s; ranks [1] did not answer"))]


def repair(inc, cause, attempt, rung, victims=(), killed=()):
    out = [(E.TRANSITION, dict(incident=inc, cause=cause, attempt=attempt, rung=rung, lifecycle_event="repair",
                               state_from="aborting", state_to="reloading"))]
    out += [(E.RANK_KILLED, dict(incident=inc, cause="recovery", rank=r, rung=rung)) for r in killed]
    if rung == "comm_rebuild":
        return out + [(E.COMM_REBUILT, dict(incident=inc, cause=cause, rung=rung, attempt=attempt, duration_ms=80))]
    if rung == "replace_ranks":
        return out + [(E.RANK_SPAWNED, dict(incident=inc, cause="spawn", rank=r, pid=2000 + r)) for r in victims] + [
            (E.COMM_REBUILT, dict(incident=inc, cause=cause, rung=rung, attempt=attempt, duration_ms=90))]
    return out + [(E.RANK_SPAWNED, dict(incident=inc, cause="spawn", rank=r, pid=2000 + r)) for r in range(2)]


def recovered(inc, cause, attempt, rung, ms):
    return [(E.RECOVERY_FINISHED, dict(incident=inc, cause=cause, rung=rung, attempt=attempt, duration_ms=ms)),
            (E.TRANSITION, dict(incident=inc, cause=cause, rung=rung, attempt=attempt, lifecycle_event="recovered",
                                state_from="reloading", state_to="healthy"))]


def gave_up_after(inc, cause, rank, attempts):
    """Every respawn of `rank` dies while loading: replace_ranks, then full reloads, until the breaker opens
    (failed attempts 2..attempts count; only the first attempt aborts, later ones start from a dead pool)."""
    steps = fault(inc, cause, rank)
    for a in range(1, attempts):
        rung = "replace_ranks" if a == 1 else "full_reload"
        steps += (abort(inc, cause, a) if a == 1 else abort(inc, cause, a)[:1]) + repair(inc, cause, a, rung, [rank])
        steps.append((E.TRANSITION, dict(incident=inc, cause="rank_died", rank=rank, attempt=a,
                                         lifecycle_event="fault", state_from="reloading", state_to="poisoned")))
    return steps + [
        (E.GAVE_UP, dict(incident=inc, cause="breaker_open", rank=rank, rung="give_up", attempt=attempts,
                         duration_ms=41000, detail=f"{attempts - 1} recoveries within 600s")),
        (E.TRANSITION, dict(incident=inc, cause="breaker_open", rank=rank, rung="give_up", attempt=attempts,
                            lifecycle_event="give_up", state_from="poisoned", state_to="unloaded")),
        (E.TRANSITION, dict(cause="shutdown", lifecycle_event="stop", state_from="unloaded", state_to="stopped"))]


BOOT = "5a8c1f0e2d3b4a69b7c8d9e0f1a2b3c4"
PID = 4242


@dataclass(frozen=True)
class Episode:
    """Steps one daemon sent, from `start_s` seconds before now, 150 ms apart. `booted_s`: when its boot began
    (seconds before now), the zero of its __MONOTONIC_TIMESTAMP. `old_daemon`: NEUROND_OUTCOME as the steps
    give it, not judged by today's JournalSink (a daemon that judged without the time bound)."""

    start_s: int
    steps: list
    boot: str = BOOT
    pid: int = PID
    booted_s: int = 86400
    old_daemon: bool = False


def stop(state_from="healthy"):
    return [(E.TRANSITION, dict(cause="shutdown", lifecycle_event="stop", state_from=state_from, state_to="stopped"))]


# host -> (tp_size, [(start seconds before now, steps)])
HOSTS = {
    "gpu-clean": (1, [(7200, startup(1)),
                      (3600, fault("c1", "rank_failed", 0, status=500) + abort("c1", "rank_failed", 1)
                       + repair("c1", "rank_failed", 1, "comm_rebuild")
                       + recovered("c1", "rank_failed", 1, "comm_rebuild", 240))]),
    "gpu-degraded": (2, [(7200, startup(2)),
                         (5400, fault("d1", "rank_died", 1) + abort("d1", "rank_died", 1)
                          + repair("d1", "rank_died", 1, "replace_ranks", [1])
                          + recovered("d1", "rank_died", 1, "replace_ranks", 3100)),
                         (1800, fault("d2", "rank_timeout", 1, status=504) + abort("d2", "rank_timeout", 1, ok=False)
                          + repair("d2", "rank_timeout", 1, "replace_ranks", [1], killed=[1])
                          + recovered("d2", "rank_timeout", 1, "replace_ranks", 5200))]),
    "gpu-stuck": (2, [(7200, startup(2)),
                      (3600, fault("s1", "rank_timeout", 0, status=504) + abort("s1", "rank_timeout", 1)[:2])]),
    "gpu-gaveup": (2, [(7200, startup(2)), (3000, gave_up_after("g1", "rank_died", 1, 6))]),
    "gpu-quiet": (2, [(7200, startup(2))]),
}
EXPECTED = {  # host -> classes of its incidents
    "gpu-clean": ["clean"], "gpu-degraded": ["clean", "degraded"], "gpu-stuck": ["stuck"],
    "gpu-gaveup": ["gave_up"], "gpu-quiet": [],
}


class _Verdicts:
    """The verdict a daemon's supervisor gives each incident as it ends (pool/supervisor.py: the first fault's
    cause, a failed abort, the rung and attempts, by neurond/judgement.py's rules), added to its end events."""

    def __init__(self) -> None:
        self.first_cause: dict[str, str | None] = {}
        self.abort_failed: set[str] = set()

    def __call__(self, o: Observation) -> Observation:
        if not o.incident:
            return o
        if o.event is E.FAULT_DETECTED:
            self.first_cause.setdefault(o.incident, o.cause)
        elif o.event is E.ABORT_FAILED:
            self.abort_failed.add(o.incident)
        elif o.event is E.RECOVERY_FINISHED:
            outcome, why = judge_recovery(self.first_cause.get(o.incident) or o.cause, o.tp_size, o.rung, o.attempt,
                                          o.incident in self.abort_failed, duration_ms=o.duration_ms)
            return dataclasses.replace(o, outcome=outcome, outcome_why=why or None)
        elif o.event is E.GAVE_UP:
            return dataclasses.replace(o, outcome="gave_up")
        return o


def host_entries(host: str, now_us: int, tp: int | None = None, episodes: list | None = None) -> list[dict]:
    """`host`'s entries: from HOSTS, or `tp` and `episodes` (Episode, or (start_s, steps) in the default boot)."""
    if episodes is None:
        tp, episodes = HOSTS[host]
    entries = []
    judge = _Verdicts()  # NEUROND_OUTCOME as the daemon's supervisor judges it
    for ep in episodes:
        ep = ep if isinstance(ep, Episode) else Episode(*ep)
        ts = now_us - ep.start_s * 1_000_000
        for event, fields in ep.steps:
            fields = {"model": MODEL, "tp_size": tp, **fields}
            fields = {k: v for k, v in fields.items() if v is not None}
            o = Observation(event, **fields)
            entry = entry_for(o if ep.old_daemon else judge(o), SITE)
            entry.update(__REALTIME_TIMESTAMP=ts, __MONOTONIC_TIMESTAMP=ts - (now_us - ep.booted_s * 1_000_000),
                         _HOSTNAME=host, _SYSTEMD_UNIT="neurond.service", _PID=ep.pid, _TRANSPORT="journal",
                         _BOOT_ID=ep.boot)
            entries.append(entry)
            ts += 150_000  # 150 ms between steps
    return entries


def write_fleet(directory: Path, hosts=None, now_us: int | None = None) -> list[Path]:
    """One journal file per host, named like systemd-journal-remote's --split-mode=host output."""
    now_us = now_us or int(time.time() * 1e6)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for host in hosts or HOSTS:
        path = directory / f"remote-{host}.journal"
        write_journal_file(path, host_entries(host, now_us))
        paths.append(path)
    return paths
