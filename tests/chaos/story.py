"""The daemon's journal story, read back from its stderr.

Without journald (CI, this box) the daemon writes every event to stderr as one structured line
(neurond/observe/journal.py: `MESSAGE=... NEUROND_EVENT=... NEUROND_INCIDENT=...`), the same fields a journal
entry has. Incidents are rebuilt from those lines with the daemon's own audit code
(neurond/observe/incident.py), as `neurond audit` would rebuild them from a journal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neurond.observe.entries import unique
from neurond.observe.incident import Incident, rebuild
from neurond.observe.journal import parse_structured_line


def read_events(log_path: Path, leader_pid: int) -> list[dict]:
    """Every event line of the daemon's output, as journal-like entries in the order they were written."""
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        if "NEUROND_EVENT=" not in line:
            continue
        entry = parse_structured_line(line)
        # What journald would add: the order (a realtime stamp), the host and the writer's pid.
        entry.update({"__REALTIME_TIMESTAMP": str(len(events)), "_HOSTNAME": "soak", "_PID": str(leader_pid)})
        events.append(entry)
    return events


def incidents(events: list[dict]) -> list[Incident]:
    """In the order they started. (The stamps are line numbers, so nothing counts as stuck by age.)"""
    return rebuild(unique(events), now_us=len(events), stuck_after_s=1e9)


@dataclass(frozen=True, slots=True)
class Transition:
    event: str  # fault, abort, repair, recovered, give_up, ...
    state_from: str
    state_to: str
    cause: str | None
    rung: str | None


def transitions(incident: Incident) -> list[Transition]:
    return [Transition(e.lifecycle_event or "?", e.state_from or "?", e.state_to or "?", e.cause, e.rung)
            for e in incident.entries if e.event == "transition"]


def story_problems(incident: Incident) -> list[str]:
    """What is missing from one incident's story: it must start with the pool poisoned and end healthy."""
    steps = transitions(incident)
    problems = []
    if not steps or steps[0].state_to != "poisoned":
        problems.append(f"does not start with poisoned: {[t.state_to for t in steps[:1]]}")
    if not steps or steps[-1].state_to != "healthy":
        problems.append(f"does not end healthy: {[t.state_to for t in steps[-1:]]}")
    if not any(e.event == "fault_detected" for e in incident.entries):
        problems.append("no fault_detected event")
    if steps and steps[-1].state_to == "healthy" and incident.end != "recovered":
        problems.append("healthy without a recovery_finished event")
    return problems


def culprit_request_ids(events: list[dict]) -> set[str]:
    """Requests whose own step faulted: the journal names them on fault_detected."""
    return {e["NEUROND_REQUEST_ID"] for e in events
            if e.get("NEUROND_EVENT") == "fault_detected" and e.get("NEUROND_REQUEST_ID")}


def fault_transitions(incident: Incident) -> int:
    return sum(1 for t in transitions(incident) if t.event == "fault")
