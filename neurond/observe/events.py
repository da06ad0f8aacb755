"""The notable events of neurond, and where they go.

Every lifecycle transition and every step of a recovery is one event: an `Observation`, its name from `Event`
and its facts as typed fields (cause, rank, rung, incident, request_id, duration_ms, attempt, ...). Producers
(the supervisor, the ladder, the engine) call `emit(sink, Event.X, **facts)`: a fact no Observation has is a
TypeError at the producer, not a field the journal silently gains. What a sink does with an observation
(journald entries, stderr lines, metrics, STATUS=, the incident judge) is its own business, read from the
attributes. Producers never fail because a sink did: `emit()` swallows and counts sink errors.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("neurond.events")


class Event(str, enum.Enum):
    TRANSITION = "transition"  # one lifecycle transition (state_from, state_to, lifecycle_event)
    FAULT_DETECTED = "fault_detected"
    ABORT_STARTED = "abort_started"
    ABORT_FINISHED = "abort_finished"
    ABORT_FAILED = "abort_failed"  # a rank did not confirm the abort within abort_timeout_s
    RANK_KILLED = "rank_killed"
    RANK_SPAWNED = "rank_spawned"
    COMM_REBUILT = "comm_rebuilt"
    RECOVERY_BACKOFF = "recovery_backoff"  # waiting duration_ms before recovery attempt `attempt`
    RECOVERY_FINISHED = "recovery_finished"
    GAVE_UP = "gave_up"
    REQUEST_FAILED = "request_failed"  # a request ended by a rank fault
    LOAD_PROGRESS = "load_progress"  # a rank read more of its checkpoint (rank, done/total bytes and files)
    STARTUP_FAILED = "startup_failed"  # the configuration or the model cannot be served: exit code 2 (cause, path)


@dataclass(frozen=True, slots=True)
class Observation:
    """One event and what it says; None: nothing said. The journal writes each fact as NEUROND_<NAME>."""

    event: Event
    model: str | None = None
    tp_size: int | None = None
    incident: str | None = None
    cause: str | None = None  # why: a fault's name, or an operator's action
    rank: int | None = None
    request_id: str | None = None
    rung: str | None = None
    attempt: int | None = None
    detail: str | None = None
    path: str | None = None  # startup_failed: the file or directory at fault
    duration_ms: int | None = None
    detect_ms: int | None = None  # fault_detected: from the step's start to its fault
    lifecycle_event: str | None = None  # transition: the lifecycle's event, its states before and after
    state_from: str | None = None
    state_to: str | None = None
    pid: int | None = None  # rank_spawned
    status: int | None = None  # request_failed: the HTTP status, the request's tokens, its strikes
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    faults: int | None = None
    done_bytes: int | None = None  # load_progress
    total_bytes: int | None = None
    files_done: int | None = None
    files_total: int | None = None
    outcome: str | None = None  # the end of an incident, as the journal judged it (clean | degraded | gave_up)
    outcome_why: str | None = None

    def facts(self) -> dict:
        """The facts said, by name (the event's name left out)."""
        return {f.name: v for f in dataclasses.fields(self)
                if f.name != "event" and (v := getattr(self, f.name)) is not None and v != ""}


class EventSink:
    """The default sink: one log line per event. Subclass and override `observe`."""

    errors = 0

    def observe(self, o: Observation) -> None:
        log.info("%s %s", o.event.value, " ".join(f"{k}={v}" for k, v in o.facts().items()))


def emit(sink: EventSink | None, name: Event, **facts: Any) -> None:
    if sink is None:
        return
    deliver(sink, Observation(name, **facts))  # outside the guard: an unknown fact is the producer's bug


def deliver(sink: EventSink, o: Observation) -> None:
    try:
        sink.observe(o)
    except Exception:  # observing must never break serving
        sink.errors = getattr(sink, "errors", 0) + 1
        log.exception("event sink failed on %s", o.event.value)


class TeeSink(EventSink):
    """Several sinks behind the one `events=` a producer takes (e.g. the journal and metrics): each gets every
    event, and one that fails never keeps the event from the others."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks
        self.errors = 0

    def observe(self, o: Observation) -> None:
        for sink in self.sinks:
            deliver(sink, o)
