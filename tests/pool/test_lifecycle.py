import pytest
from statemachine.exceptions import TransitionNotAllowed

from neurond.lifecycle import Cause, Lifecycle, mermaid_diagram, transitions_table


class Recorder:
    def __init__(self):
        self.seen = []

    def after_transition(self, event, source, target, cause=None):
        self.seen.append((str(event), source.id, target.id, cause))


def test_fault_to_recovery_path_is_recorded_with_one_incident():
    rec = Recorder()
    m = Lifecycle(listeners=[rec])
    m.send("loaded", cause=Cause("startup"))
    c = Cause("rank_died", incident="i1", rank=1)
    for event in ("fault", "abort", "repair", "recovered"):
        m.send(event, cause=c.with_(rung="full_reload"))
    assert [(e, s, t) for e, s, t, _ in rec.seen] == [
        ("loaded", "loading", "healthy"),
        ("fault", "healthy", "poisoned"),
        ("abort", "poisoned", "aborting"),
        ("repair", "aborting", "reloading"),
        ("recovered", "reloading", "healthy"),
    ]
    assert {cause.incident for _, _, _, cause in rec.seen[1:]} == {"i1"}
    assert m.serving and m.last_cause.rung == "full_reload"


def test_transition_not_allowed_is_an_error():
    m = Lifecycle()
    with pytest.raises(TransitionNotAllowed):
        m.send("recovered", cause=Cause("x"))
    m.send("loaded", cause=Cause("startup"))
    with pytest.raises(TransitionNotAllowed):
        m.send("loaded", cause=Cause("x"))
    assert m.state_id == "healthy"


def test_give_up_and_operator_load():
    m = Lifecycle()
    m.send("fault", cause=Cause("rank_died"))
    m.send("give_up", cause=Cause("breaker_open"))
    assert m.state_id == "unloaded" and not m.serving
    m.send("load", cause=Cause("operator_load"))
    assert m.state_id == "loading"


def test_diagram_in_docs_matches_code():
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "lifecycle.md"
    assert mermaid_diagram() in doc.read_text(), "docs/lifecycle.md is stale: run python -m neurond.lifecycle"
    assert ("healthy", "fault", "poisoned") in transitions_table()


def test_the_state_names_are_the_machines_states():
    """LifecycleState (what the rest of the code compares against) names exactly the machine's states."""
    from neurond.lifecycle import Lifecycle, LifecycleState

    assert [s.id for s in Lifecycle.states] == [s.value for s in LifecycleState]
