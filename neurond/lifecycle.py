"""The model lifecycle: the one state machine that owns the rank pool's state.

    loading ──loaded──► healthy ──fault──► poisoned ──abort──► aborting ──repair──► reloading ──recovered──► healthy
       │                  │                   │                   │                     │
       └──────────────────┴──── give_up / unload ─────────────────┴─────────────────────┴──► unloaded
    unloaded ──load──► loading        healthy ──reload──► reloading (operator)       any ──stop──► stopped

Every transition carries a Cause: why (fault kind or operator action), which rank, which request, which
ladder rung, and the incident id shared by all transitions from the first fault to the recovery (or give-up).
A transition that is not allowed raises TransitionNotAllowed: nothing is silently ignored
(`allow_event_without_transition = False`), and errors in callbacks propagate to the caller
(`catch_errors_as_events = False`), because a lifecycle that swallowed an error would lie to the journal.
Observers attach as listeners with `after_transition(event, source, target, cause)`.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, replace
from typing import Any

from statemachine import State, StateMachine


class LifecycleState(enum.StrEnum):
    """The lifecycle's states, by name (the machine below defines their transitions)."""

    LOADING = "loading"
    HEALTHY = "healthy"
    POISONED = "poisoned"
    ABORTING = "aborting"
    RELOADING = "reloading"
    UNLOADED = "unloaded"
    STOPPED = "stopped"


class Rung(enum.StrEnum):
    """The repair ladder's rungs, cheapest first (pool/ladder.py runs them); GIVE_UP ends in `unloaded`."""

    COMM_REBUILD = "comm_rebuild"
    REPLACE_RANKS = "replace_ranks"
    FULL_RELOAD = "full_reload"
    GIVE_UP = "give_up"


@dataclass(frozen=True, slots=True)
class Cause:
    """Why a transition happened. `incident` is shared by every transition of one fault-to-recovery episode."""

    name: str  # e.g. "startup", "rank_died", "rank_timeout", "operator_reload", "breaker_open"
    incident: str = ""
    rank: int | None = None
    request_id: str | None = None
    rung: Rung | None = None  # the ladder rung of a repair (journal field NEUROND_RUNG)
    attempt: int = 0
    detail: str = ""

    def with_(self, **changes: Any) -> Cause:
        return replace(self, **changes)


def new_incident_id() -> str:
    return uuid.uuid4().hex[:16]


class Lifecycle(StateMachine):
    allow_event_without_transition = False
    catch_errors_as_events = False

    loading = State(initial=True)
    healthy = State()
    poisoned = State()
    aborting = State()
    reloading = State()
    unloaded = State()
    stopped = State(final=True)

    loaded = loading.to(healthy)
    fault = healthy.to(poisoned) | loading.to(poisoned) | reloading.to(poisoned)
    abort = poisoned.to(aborting)
    repair = aborting.to(reloading)
    recovered = reloading.to(healthy)
    give_up = loading.to(unloaded) | poisoned.to(unloaded) | aborting.to(unloaded) | reloading.to(unloaded)
    unload = healthy.to(unloaded)
    load = unloaded.to(loading)
    reload = healthy.to(reloading)
    stop = (
        loading.to(stopped)
        | healthy.to(stopped)
        | poisoned.to(stopped)
        | aborting.to(stopped)
        | reloading.to(stopped)
        | unloaded.to(stopped)
    )

    def __init__(self, listeners: list | None = None) -> None:
        self.last_cause: Cause | None = None
        super().__init__(listeners=listeners or [])

    @property
    def state_id(self) -> str:
        return str(self.current_state_value)

    @property
    def serving(self) -> bool:
        return self.current_state_value == LifecycleState.HEALTHY

    def on_transition(self, cause: Cause | None = None) -> None:
        self.last_cause = cause


def transitions_table() -> list[tuple[str, str, str]]:
    """(source, event, target) for every transition: the input of the rendered diagram in docs/."""
    rows = []
    for state in Lifecycle.states:
        for transition in state.transitions:
            for event in transition.events:
                rows.append((transition.source.id, str(event), transition.target.id))
    return sorted(set(rows))


def mermaid_diagram() -> str:
    lines = ["stateDiagram-v2", "    [*] --> loading"]
    lines += [f"    {src} --> {dst}: {event}" for src, event, dst in transitions_table()]
    lines.append("    stopped --> [*]")
    return "\n".join(lines)


def render_doc() -> str:
    """docs/lifecycle.md, generated from the state machine above."""
    return (
        "# Model lifecycle\n\n"
        "Generated from `neurond/lifecycle.py` by `python -m neurond.lifecycle > docs/lifecycle.md`;\n"
        "a test fails when this file and the code disagree.\n\n"
        "```mermaid\n" + mermaid_diagram() + "\n```\n\n"
        "| from | event | to |\n| --- | --- | --- |\n"
        + "".join(f"| {s} | {e} | {t} |\n" for s, e, t in transitions_table())
    )


if __name__ == "__main__":
    print(render_doc(), end="")
