"""One incident rebuilt from its journal entries, and how good its recovery was.

An incident is every entry with one NEUROND_INCIDENT on one host: from the fault that poisoned the pool to
the recovery, the give-up, or nothing. Classes:
  clean        recovered by the cheapest rung that fits the fault (needed_rung), on the first attempt, with
               the communicator abort confirmed
  degraded     recovered, but by a costlier rung than needed, after more than one attempt, after a failed
               abort, or later than the stuck bound
  stuck        poisoned and neither recovered nor given up within the bound (also: the daemon was killed
               mid-recovery, e.g. by the watchdog, and its incident never ended)
  gave_up      the breaker opened: the model was unloaded
  interrupted  the daemon was stopped on request during the recovery (within the bound)
  open         still in progress, younger than the bound
The daemon judges its own recoveries with the same rule (NEUROND_OUTCOME on recovery_finished), so the
saved queries can select clean ones with one field match; the audit recomputes it from the entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Ladder rungs, cheapest first (docs/recovery.md, neurond/pool/supervisor.py).
RUNGS = ("comm_rebuild", "replace_ranks", "full_reload", "give_up")
# Faults after which the rank's process and device context are intact: a fresh communicator among the same
# processes repairs them. Any other fault costs the rank its process: replace it (or, alone, reload).
PROCESS_INTACT = ("rank_failed", "out_of_memory")

CLASSES = ("clean", "degraded", "stuck", "gave_up", "interrupted", "open")
NEEDS_ACTION = {"degraded": 1, "stuck": 2, "gave_up": 2}  # class -> severity (exit code of `neurond audit`)


def needed_rung(cause: str | None, tp_size: int | None, tp_impl: str | None = None) -> str:
    """The cheapest rung that can repair `cause`. Lenient where the journal cannot tell (a cuda_error may or
    may not have ruined the context): a cheaper rung than this is never held against a recovery."""
    tp = tp_size or 1
    if tp > 1 and tp_impl == "transformers":
        return "full_reload"  # its TP layers stay bound to the process group they were loaded with
    if cause in PROCESS_INTACT:
        return "comm_rebuild"
    return "replace_ranks" if tp > 1 else "full_reload"


def rung_cost(tier: str | None) -> int:
    return RUNGS.index(tier) if tier in RUNGS else len(RUNGS)


def judge_recovery(cause: str | None, tp_size: int | None, tier: str | None, attempt: int | None,
                   abort_failed: bool, tp_impl: str | None = None) -> tuple[str, str]:
    """("clean" | "degraded", why) for a finished recovery."""
    why = []
    need = needed_rung(cause, tp_size, tp_impl)
    if rung_cost(tier) > rung_cost(need):
        why.append(f"{tier} where {need} fits {cause}")
    if (attempt or 1) > 1:
        why.append(f"{attempt} attempts")
    if abort_failed:
        why.append("abort failed")
    return ("degraded", "; ".join(why)) if why else ("clean", "")


@dataclass
class Incident:
    host: str
    incident: str
    start_us: int  # realtime of the first entry
    pid: str = ""
    cause: str | None = None  # of the first fault
    rank: str | None = None
    tp_size: int | None = None
    tp_impl: str | None = None
    model: str | None = None
    tier: str | None = None  # rung that ended it
    attempts: int = 0
    abort_failed: bool = False
    end_us: int | None = None
    end: str | None = None  # "recovered" | "gave_up" | "stopped"
    duration_ms: int | None = None
    requests_failed: int = 0
    state: str | None = None  # lifecycle state after its last transition
    cls: str = "open"
    why: str = ""
    entries: list[dict] = field(default_factory=list)

    @property
    def mttr_ms(self) -> int | None:
        if self.end != "recovered":
            return None
        if self.duration_ms is not None:
            return self.duration_ms
        return (self.end_us - self.start_us) // 1000 if self.end_us else None

    def summary(self) -> dict:
        d = {k: getattr(self, k) for k in ("host", "incident", "cls", "why", "cause", "rank", "tier", "attempts",
                                           "abort_failed", "end", "requests_failed", "tp_size", "model", "state")}
        d["class"] = d.pop("cls")
        d["start_us"], d["mttr_ms"] = self.start_us, self.mttr_ms
        return d


def value(entry: dict, name: str) -> str | None:
    """A field of a `journalctl -o json` entry: a repeated field is a list, non-UTF-8 a list of byte values."""
    v = entry.get(name)
    if isinstance(v, list):
        v = v[0] if v and not isinstance(v[0], int) else bytes(v).decode(errors="replace") if v else None
    return v


def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def rebuild(entries: list[dict], now_us: int, stuck_after_s: float) -> list[Incident]:
    """Incidents, per host, from neurond's event entries (any order, any number of hosts), classified."""
    bound_us = int(stuck_after_s * 1e6)
    incidents: dict[tuple[str, str], Incident] = {}
    stops: dict[tuple[str, str], list[int]] = {}  # (host, leader pid) -> times the lifecycle reached stopped
    rows = sorted(entries, key=lambda e: _int(value(e, "__REALTIME_TIMESTAMP")) or 0)
    for e in rows:
        host = value(e, "_HOSTNAME") or "?"
        pid = value(e, "_PID") or ""
        ts = _int(value(e, "__REALTIME_TIMESTAMP")) or 0
        event = value(e, "NEUROND_EVENT")
        if event == "transition" and value(e, "NEUROND_STATE_TO") == "stopped":
            stops.setdefault((host, pid), []).append(ts)
        key = value(e, "NEUROND_INCIDENT")
        if not key:
            continue
        inc = incidents.get((host, key))
        if inc is None:
            inc = incidents[(host, key)] = Incident(host, key, ts, pid)
        inc.entries.append(e)
        inc.attempts = max(inc.attempts, _int(value(e, "NEUROND_ATTEMPT")) or 0)
        if inc.tp_size is None:
            inc.tp_size, inc.model = _int(value(e, "NEUROND_TP_SIZE")), value(e, "NEUROND_MODEL")
            inc.tp_impl = value(e, "NEUROND_TP_IMPL")
        if event == "fault_detected" and inc.cause is None:
            inc.cause, inc.rank = value(e, "NEUROND_CAUSE"), value(e, "NEUROND_RANK")
        elif event == "transition":
            inc.state = value(e, "NEUROND_STATE_TO")
            if inc.cause is None and inc.state == "poisoned":
                inc.cause, inc.rank = value(e, "NEUROND_CAUSE"), value(e, "NEUROND_RANK")
        elif event == "abort_failed":
            inc.abort_failed = True
        elif event == "request_failed":
            inc.requests_failed += 1
        elif event in ("recovery_finished", "gave_up") and inc.end is None:
            inc.end = "recovered" if event == "recovery_finished" else "gave_up"
            inc.end_us, inc.tier = ts, value(e, "NEUROND_TIER")
            inc.duration_ms = _int(value(e, "NEUROND_DURATION_MS"))
    for inc in incidents.values():
        _classify(inc, stops.get((inc.host, inc.pid), []), now_us, bound_us)
    return sorted(incidents.values(), key=lambda i: (i.host, i.start_us))


def _classify(inc: Incident, stops: list[int], now_us: int, bound_us: int) -> None:
    if inc.end == "gave_up":
        inc.cls, inc.why = "gave_up", "the breaker opened; the model was unloaded"
        return
    if inc.end == "recovered":
        inc.cls, inc.why = judge_recovery(inc.cause, inc.tp_size, inc.tier, inc.attempts, inc.abort_failed,
                                          inc.tp_impl)
        if inc.mttr_ms is not None and inc.mttr_ms * 1000 > bound_us:
            inc.cls = "degraded"
            inc.why = "; ".join(filter(None, [inc.why, f"recovered only after {inc.mttr_ms / 1000:.0f} s"]))
        return
    stop = next((t for t in stops if t >= inc.start_us), None)
    if stop is not None:
        inc.end, inc.end_us = "stopped", stop
        if stop - inc.start_us <= bound_us:
            inc.cls, inc.why = "interrupted", "the daemon was stopped during the recovery"
            return
    if (stop or now_us) - inc.start_us > bound_us:
        inc.cls = "stuck"
        inc.why = f"{inc.state or 'poisoned'} and not recovered within {bound_us / 1e6:.0f} s"
        return
    inc.cls, inc.why = "open", f"in progress ({inc.state})"
