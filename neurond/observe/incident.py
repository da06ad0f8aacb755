"""One incident rebuilt from its journal entries, and how good its recovery was.

An incident is every entry with one NEUROND_INCIDENT sent by one daemon instance (host, boot, PID: see
neurond/observe/entries.py): from the fault that poisoned the pool to the recovery, the give-up, or nothing.
What happened next (a stop, a restart, a give-up) is looked up in that instance only. Classes:
  clean        recovered by the cheapest rung that fits the fault (needed_rung), on the first attempt, with
               the communicator abort confirmed, within CLEAN_WITHIN_S of the fault
  degraded     recovered, but by a costlier rung than needed, after more than one attempt, after a failed
               abort, or later than CLEAN_WITHIN_S
  stuck        poisoned and neither recovered nor given up within the bound; also when its daemon ended
               mid-recovery without stopping (killed, e.g. by the watchdog, crashed, or the host went down:
               the unit started again on that host) -- such an incident can never end
  gave_up      the breaker opened: the model was unloaded
  interrupted  its daemon was stopped on request during the recovery (within the bound)
  open         still in progress, younger than the bound
The daemon judges its own recoveries with the same function (NEUROND_OUTCOME on recovery_finished), so the
saved queries select clean ones with one field match; the audit recomputes it from the entries, which gives
the same answer (and the right one for journals of daemons that judged without the time bound).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from neurond.judgement import judge_recovery
from neurond.lifecycle import LifecycleState
from neurond.observe.entries import Entry, Instance, instances

CLASSES = ("clean", "degraded", "stuck", "gave_up", "interrupted", "open")
NEEDS_ACTION = {"degraded": 1, "stuck": 2, "gave_up": 2}  # class -> severity (exit code of `neurond audit`)


@dataclass
class Incident:
    instance: Instance
    incident: str
    start_us: int  # realtime of the first entry
    cause: str | None = None  # of the first fault
    rank: str | None = None
    tp_size: int | None = None
    tp_impl: str | None = None
    model: str | None = None
    rung: str | None = None  # rung that ended it
    attempts: int = 0
    abort_failed: bool = False
    end_us: int | None = None
    end: str | None = None  # "recovered" | "gave_up" | "stopped" | "died"
    duration_ms: int | None = None
    requests_failed: int = 0
    state: str | None = None  # lifecycle state after its last transition
    outcome: str | None = None  # NEUROND_OUTCOME: the daemon's own verdict on its recovery
    cls: str = "open"
    why: str = ""
    entries: list[Entry] = field(default_factory=list)

    @property
    def host(self) -> str:
        return self.instance.host

    @property
    def mttr_ms(self) -> int | None:
        if self.end != "recovered":
            return None
        if self.duration_ms is not None:
            return self.duration_ms
        return (self.end_us - self.start_us) // 1000 if self.end_us else None

    def summary(self) -> dict:
        d = {k: getattr(self, k) for k in ("host", "incident", "cls", "why", "cause", "rank", "rung", "attempts",
                                           "abort_failed", "end", "requests_failed", "tp_size", "model", "state",
                                           "outcome")}
        d["class"] = d.pop("cls")
        d["boot_id"], d["pid"] = self.instance.boot, self.instance.pid
        d["start_us"], d["mttr_ms"] = self.start_us, self.mttr_ms
        return d


def rebuild(entries: list[Entry], now_us: int, stuck_after_s: float) -> list[Incident]:
    """Incidents, per daemon instance, from neurond's event entries (each once: entries.unique; any order, any
    number of hosts), classified."""
    bound_us = int(stuck_after_s * 1e6)
    found: list[Incident] = []
    for instance, rows in instances(entries):
        mine: dict[str, Incident] = {}
        for e in rows:
            if e.incident is None:
                continue
            inc = mine.get(e.incident)
            if inc is None:
                inc = mine[e.incident] = Incident(instance, e.incident, e.realtime_us)
            _add(inc, e)
        for inc in mine.values():
            _classify(inc, now_us, bound_us)
        found += mine.values()
    return sorted(found, key=lambda i: (i.host, i.start_us))


def _add(inc: Incident, e: Entry) -> None:
    inc.entries.append(e)
    inc.attempts = max(inc.attempts, e.attempt or 0)
    if inc.tp_size is None:
        inc.tp_size, inc.model, inc.tp_impl = e.tp_size, e.model, e.tp_impl
    if e.event == "fault_detected" and inc.cause is None:
        inc.cause, inc.rank = e.cause, e.rank
    elif e.event == "transition":
        inc.state = e.state_to
        if inc.cause is None and inc.state == LifecycleState.POISONED:
            inc.cause, inc.rank = e.cause, e.rank
    elif e.event == "abort_failed":
        inc.abort_failed = True
    elif e.event == "request_failed":
        inc.requests_failed += 1
    elif e.event in ("recovery_finished", "gave_up") and inc.end is None:
        inc.end = "recovered" if e.event == "recovery_finished" else "gave_up"
        inc.end_us, inc.rung, inc.duration_ms, inc.outcome = e.realtime_us, e.rung, e.duration_ms, e.outcome


def _classify(inc: Incident, now_us: int, bound_us: int) -> None:
    if inc.end == "gave_up":
        inc.cls, inc.why = "gave_up", "the breaker opened; the model was unloaded"
        return
    if inc.end == "recovered":
        inc.cls, inc.why = judge_recovery(inc.cause, inc.tp_size, inc.rung, inc.attempts, inc.abort_failed,
                                          inc.tp_impl, inc.mttr_ms)
        return
    daemon, state = inc.instance, inc.state or LifecycleState.POISONED
    if daemon.stopped_us is not None:
        inc.end, inc.end_us = "stopped", daemon.stopped_us
        if daemon.stopped_us - inc.start_us <= bound_us:
            inc.cls, inc.why = "interrupted", "the daemon was stopped during the recovery"
        else:
            inc.cls, inc.why = "stuck", f"{state} and not recovered within {bound_us / 1e6:.0f} s (then stopped)"
        return
    if daemon.died_us is not None:
        inc.end, inc.end_us = "died", daemon.died_us
        again = "after a reboot" if daemon.rebooted else "in the same boot"
        inc.cls = "stuck"
        inc.why = (f"the daemon (pid {daemon.pid}) ended while {state} without stopping: killed, crashed or its "
                   f"host went down; neurond started again {again}")
        return
    if now_us - inc.start_us > bound_us:
        inc.cls, inc.why = "stuck", f"{state} and not recovered within {bound_us / 1e6:.0f} s"
        return
    inc.cls, inc.why = "open", f"in progress ({inc.state})"
