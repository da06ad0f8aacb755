"""The notable events of neurond, and where they go.

Every lifecycle transition and every step of a recovery is one event: a name from `Event` and fields (cause,
rank, rung, incident, request_id, duration_ms, attempt, ...). Producers (the supervisor, the engine) call
`sink.event(Event.X, **fields)`; what a sink does with it (journald entries, stderr lines, metrics) is its own
business. Producers never fail because a sink did: `emit()` swallows and counts sink errors.
"""

from __future__ import annotations

import enum
import logging

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
    RECOVERY_FINISHED = "recovery_finished"
    GAVE_UP = "gave_up"
    REQUEST_FAILED = "request_failed"  # a request ended by a rank fault
    LOAD_PROGRESS = "load_progress"  # a rank read more of its checkpoint (rank, done/total bytes and files)


class EventSink:
    """The default sink: one log line per event. Subclass and override `event`."""

    errors = 0

    def event(self, name: Event, **fields) -> None:
        shown = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None and v != "")
        log.info("%s %s", name.value, shown)


def emit(sink: EventSink | None, name: Event, **fields) -> None:
    if sink is None:
        return
    try:
        sink.event(name, **fields)
    except Exception:  # noqa: BLE001 - observing must never break serving
        sink.errors = getattr(sink, "errors", 0) + 1
        log.exception("event sink failed on %s", name.value)


class TeeSink(EventSink):
    """Several sinks behind the one `events=` a producer takes (e.g. the journal and metrics): each gets every
    event, and one that fails never keeps the event from the others."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks
        self.errors = 0

    def event(self, name: Event, **fields) -> None:
        for sink in self.sinks:
            emit(sink, name, **fields)
