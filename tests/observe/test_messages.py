"""Every event's MESSAGE, PRIORITY and NEUROND_* fields, pinned: one Observation of each event with every fact,
one with none, and the variants that change a message or a priority. The renderer may change shape; what it
writes to the journal may not (saved queries, alerts and `neurond audit` read it)."""

from __future__ import annotations

import pytest

from neurond.observe import journal
from neurond.observe.events import Event as E, Observation

SITE = ("x.py", 1, "f")
FULL = dict(model="m", tp_size=2, incident="inc1", cause="rank_died", rank=1, request_id="req-1", rung="replace_ranks",
            attempt=2, detail="exit 9", duration_ms=1234, detect_ms=56, lifecycle_event="fault", state_from="healthy",
            state_to="poisoned", pid=4242, status=503, prompt_tokens=7, completion_tokens=3, faults=1,
            done_bytes=3 << 30, total_bytes=4 << 30, files_done=3, files_total=4, path="/m/config.json")
CASES = {e.value + "/full": Observation(e, **FULL) for e in E} | {e.value + "/bare": Observation(e) for e in E} | {
    "transition/blank": Observation(E.TRANSITION, cause="", detail="", incident="", rank=0),
    "transition/healthy": Observation(E.TRANSITION, cause="startup", lifecycle_event="loaded", state_from="loading",
                                      state_to="healthy"),
    "transition/reloading": Observation(E.TRANSITION, cause="sighup", lifecycle_event="reload", state_from="healthy",
                                        state_to="reloading", rung="full_reload"),
    "transition/breaker": Observation(E.TRANSITION, incident="i", cause="breaker_open", lifecycle_event="give_up",
                                      state_from="aborting", state_to="unloaded", rung="give_up", attempt=5),
    "transition/unload": Observation(E.TRANSITION, cause="operator_unload", lifecycle_event="unload",
                                     state_from="healthy", state_to="unloaded"),
    "transition/stopped": Observation(E.TRANSITION, cause="shutdown", lifecycle_event="stop", state_from="healthy",
                                      state_to="stopped"),
    "recovery_finished/clean": Observation(E.RECOVERY_FINISHED, incident="i", cause="rank_failed", tp_size=1,
                                           rung="comm_rebuild", attempt=1, duration_ms=12, outcome="clean"),
    "recovery_finished/degraded": Observation(E.RECOVERY_FINISHED, incident="i", cause="rank_failed", tp_size=1,
                                              rung="full_reload", attempt=2, duration_ms=12, outcome="degraded",
                                              outcome_why="2 attempts"),
    "abort_started/attempt0": Observation(E.ABORT_STARTED, attempt=0),
    "abort_failed/blank": Observation(E.ABORT_FAILED, duration_ms=5, detail=""),
    "load_progress/partial": Observation(E.LOAD_PROGRESS, rank=0, done_bytes=0, files_done=0),
    "startup_failed/no_path": Observation(E.STARTUP_FAILED, cause="fd_limit", detail="hard limit 512"),
}
EXPECTED = [  # (case, MESSAGE, PRIORITY)
    ('transition/full',
     'neurond transition: healthy -> poisoned on fault, cause rank_died, rank 1, rung replace_ranks'
     ' (incident inc1)', 4),
    ('fault_detected/full', 'neurond fault_detected: rank_died on rank 1, request req-1 (incident inc1)', 3),
    ('abort_started/full', 'neurond abort_started: aborting the communicator, attempt 2 (incident inc1)', 5),
    ('abort_finished/full', 'neurond abort_finished: communicator aborted in 1234 ms (incident inc1)', 6),
    ('abort_failed/full', 'neurond abort_failed: abort not confirmed after 1234 ms: exit 9 (incident inc1)', 4),
    ('rank_killed/full', 'neurond rank_killed: rank 1 killed with SIGKILL (incident inc1)', 4),
    ('rank_spawned/full', 'neurond rank_spawned: rank 1 started as pid 4242 (incident inc1)', 6),
    ('comm_rebuilt/full', 'neurond comm_rebuilt: new communicator in 1234 ms, weights kept (incident inc1)', 6),
    ('recovery_backoff/full',
     'neurond recovery_backoff: waiting 1234 ms before attempt 2, after rank_died on rank 1 (incident inc1)', 5),
    ('recovery_finished/full',
     'neurond recovery_finished: healthy after 1234 ms via replace_ranks, attempt 2, ? (incident inc1)', 5),
    ('gave_up/full', 'neurond gave_up: recovery gave up (exit 9); model unloaded (incident inc1)', 2),
    ('request_failed/full',
     'neurond request_failed: request req-1 failed with 503 rank_died (rank 1) (incident inc1)', 4),
    ('load_progress/full',
     'neurond load_progress: rank 1 loaded 3.0 GiB of 4.0 GiB (75%), 3/4 files (incident inc1)', 6),
    ('startup_failed/full', 'neurond startup_failed: rank_died: /m/config.json: exit 9 (incident inc1)', 2),
    ('transition/bare', 'neurond transition: ? -> ? on ?, cause ?', 6),
    ('fault_detected/bare', 'neurond fault_detected: ? on rank ?', 3),
    ('abort_started/bare', 'neurond abort_started: aborting the communicator, attempt 1', 5),
    ('abort_finished/bare', 'neurond abort_finished: communicator aborted in ? ms', 6),
    ('abort_failed/bare', 'neurond abort_failed: abort not confirmed after ? ms: ', 4),
    ('rank_killed/bare', 'neurond rank_killed: rank ? killed with SIGKILL', 4),
    ('rank_spawned/bare', 'neurond rank_spawned: rank ? started as pid ?', 6),
    ('comm_rebuilt/bare', 'neurond comm_rebuilt: new communicator in ? ms, weights kept', 6),
    ('recovery_backoff/bare', 'neurond recovery_backoff: waiting ? ms before attempt ?, after ?', 5),
    ('recovery_finished/bare', 'neurond recovery_finished: healthy after ? ms via ?, attempt 1, ?', 5),
    ('gave_up/bare', 'neurond gave_up: recovery gave up (); model unloaded', 2),
    ('request_failed/bare', 'neurond request_failed: request ? failed with ? ?', 4),
    ('load_progress/bare', 'neurond load_progress: rank ? loaded ? of ? (?), ?/? files', 6),
    ('startup_failed/bare', 'neurond startup_failed: ?: ', 2),
    ('transition/blank', 'neurond transition: ? -> ? on ?, cause ?, rank 0', 6),
    ('transition/healthy', 'neurond transition: loading -> healthy on loaded, cause startup', 6),
    ('transition/reloading', 'neurond transition: healthy -> reloading on reload, cause sighup, rung full_reload', 6),
    ('transition/breaker',
     'neurond transition: aborting -> unloaded on give_up, cause breaker_open, rung give_up (incident i)', 3),
    ('transition/unload', 'neurond transition: healthy -> unloaded on unload, cause operator_unload', 5),
    ('transition/stopped', 'neurond transition: healthy -> stopped on stop, cause shutdown', 5),
    ('recovery_finished/clean',
     'neurond recovery_finished: healthy after 12 ms via comm_rebuild, attempt 1, clean (incident i)', 5),
    ('recovery_finished/degraded',
     'neurond recovery_finished: healthy after 12 ms via full_reload, attempt 2, degraded (2 attempts)'
     ' (incident i)', 4),
    ('abort_started/attempt0', 'neurond abort_started: aborting the communicator, attempt 0', 5),
    ('abort_failed/blank', 'neurond abort_failed: abort not confirmed after 5 ms: ', 4),
    ('load_progress/partial', 'neurond load_progress: rank 0 loaded 0 B of ? (?), 0/? files', 6),
    ('startup_failed/no_path', 'neurond startup_failed: fd_limit: hard limit 512', 2),
]


def entry(o: Observation) -> dict:
    return journal.entry_for(o, SITE)


@pytest.mark.parametrize("case, message, priority", EXPECTED, ids=[case for case, _, _ in EXPECTED])
def test_message_and_priority_of_each_event(case, message, priority):
    e = entry(CASES[case])
    assert (e["MESSAGE"], e["PRIORITY"]) == (message, priority)


def test_every_case_is_pinned():
    assert [case for case, _, _ in EXPECTED] == list(CASES)


@pytest.mark.parametrize("event", list(E), ids=[e.value for e in E])
def test_fields_of_each_event(event):
    e = entry(Observation(event, **FULL))
    fields = {k: v for k, v in e.items() if k.startswith("NEUROND_")}
    assert fields == {"NEUROND_EVENT": event.value} | {f"NEUROND_{k.upper()}": v for k, v in FULL.items()}
    assert list(e)[:8] == ["MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER", "CODE_FILE", "CODE_LINE",
                           "CODE_FUNC", "NEUROND_EVENT"]
    blank = entry(Observation(event, cause="", detail="", rank=0, attempt=0))
    assert {k: v for k, v in blank.items() if k.startswith("NEUROND_")} == {
        "NEUROND_EVENT": event.value, "NEUROND_RANK": 0, "NEUROND_ATTEMPT": 0}  # None and "" left out, 0 kept
