"""Every fault kind x rank 0 and 1 x phase, over gloo at TP=2 (issue 3's proof on CPU).

For each: the request in flight ends within the bound, the daemon stays up, /ready returns to 200 by itself,
the next request succeeds, no worker process is left over, and the recorded transitions are exactly
fault -> abort -> repair -> recovered with the cheapest ladder rung that fits, which the journal calls a clean
recovery (a costlier rung is `degraded` there, and fails the test):
- a rank that raised or ran out of memory reported an error about the step, which held only this request:
  the request caused it and fails with that error. The raiser is healthy and idle afterwards; its peer, waiting
  in a collective the raiser never joins, is released by the abort (on gloo the communicator's abort shuts its
  TCP connections down: worker/comm.py): nobody is killed, comm_rebuild, both processes and their weights kept.
- a dead or wedged rank says nothing about the request: it is replayed after the repair and gets the same
  answer as without the fault (greedy). The rank is replaced alone (replace_ranks); its peer is released by its
  death and keeps its process and weights. A wedge is found at the adaptive step deadline (what recent steps
  took, times the factor, never under the floor), not at the ceiling: the journal's detect_ms says when.

The daemon keeps two spare workers (pool/spares.py), as in production: a replaced rank takes one whose imports
are done instead of importing torch on the repair's critical path. On CPU ranks and spares are forked from the
worker zygote (pool/launcher.py), so a spare's replacement is ready at once; the leader's children are its ranks,
its spares and the zygote. (tests/pool/test_spares.py covers spares started from scratch, as CUDA ranks are.)
"""

from __future__ import annotations

import re
import time

import pytest

from tests.conftest import alive as _alive, chat_body, wait_until
from tests.faults import FAULT_SETTINGS, fault_daemon, wait_ready

# kind -> (HTTP status, error code) the faulted request gets (200: replayed and completed), the lifecycle cause,
# and the rung that repairs it
EXPECTED = {
    "raise": (500, "rank_failed", "rank_failed", "comm_rebuild"),
    "oom": (503, "out_of_memory", "out_of_memory", "comm_rebuild"),
    "exit": (200, None, "rank_died", "replace_ranks"),
    "sigkill": (200, None, "rank_died", "replace_ranks"),
    "segfault": (200, None, "rank_died", "replace_ranks"),
    "wedge": (200, None, "rank_timeout", "replace_ranks"),
}
REQUEST_BOUND_S = 30.0  # floor 1 s deadline + detection + a rank replaced + the replay; generous for 2-core CI
# How late after its deadline a hang may be noticed (the event loop's turn, the pipes; generous for 2-core CI).
DETECT_SLACK_S = 1.5


@pytest.fixture(scope="module")
def daemon(start_daemon, tmp_path_factory):
    d = fault_daemon(start_daemon, tmp_path_factory.mktemp("faults"), 2, env={"NEUROND_SPARE_WORKERS": "2"})
    yield d
    d.stop()  # asserts that no rank or spare is left; and its four processes do not idle until the session ends


@pytest.mark.parametrize("phase", ["prefill", "decode", "collective"])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_fault_fails_request_and_pool_recovers(daemon, kind, rank, phase):
    wait_ready(daemon)
    before = daemon.admin.status()["pids"]
    seen = len(daemon.admin.status()["transitions"])
    faults_seen = len(daemon.journal("fault_detected"))
    assert daemon.admin.inject(rank, kind, phase).status_code == 200

    t0 = time.monotonic()
    request = chat_body(f"{kind} {rank} {phase}", max_tokens=12, temperature=0)
    status, headers, body = daemon.chat(request)
    elapsed = time.monotonic() - t0
    want_status, want_code, cause, rung = EXPECTED[kind]
    assert elapsed < REQUEST_BOUND_S
    if want_code is None:
        assert status == 200, body
    else:
        assert (status, body["error"]["code"]) == (want_status, want_code), body
        assert "retry-after" in headers

    wait_ready(daemon)
    assert daemon.proc.poll() is None
    ok, _, answer = daemon.chat(request)
    assert ok == 200, answer
    if status == 200:  # the replay continued the answer exactly
        assert body["choices"][0]["message"]["content"] == answer["choices"][0]["message"]["content"]
        assert body["usage"] == answer["usage"]

    final = daemon.admin.status()
    transitions = final["transitions"][seen:]
    assert [t[:3] for t in transitions] == [
        ["fault", "healthy", "poisoned"],
        ["abort", "poisoned", "aborting"],
        ["repair", "aborting", "reloading"],
        ["recovered", "reloading", "healthy"],
    ], transitions
    assert transitions[0][3] == cause
    assert transitions[-1][4] == rung, transitions
    after = final["pids"]
    faulted, peer = str(rank), str(1 - rank)
    assert after[peer] == before[peer], "the rank that did not fault must keep its process"
    if rung == "comm_rebuild":
        assert after == before, "no process may be replaced"
    else:
        assert after[faulted] != before[faulted]
        assert not _alive(before[faulted]), "the replaced worker is still alive"
    # no replaced worker left over: the leader's children are exactly its ranks and its spares
    assert not set(final["spare_pids"]) & set(after.values())
    assert sorted(daemon.worker_pids()) == sorted([*after.values(), *final["spare_pids"]])

    # The journal's story of this incident: judged clean (the cheapest rung, one attempt), and a hang found at
    # its adaptive deadline.
    detected = daemon.journal("fault_detected")[faults_seen:]
    assert len(detected) == 1, detected
    incident = detected[0]["NEUROND_INCIDENT"]
    finished = wait_until(lambda: [e for e in daemon.journal("recovery_finished")
                                   if e.get("NEUROND_INCIDENT") == incident], 10, "the incident's recovery_finished")
    assert [(e.get("NEUROND_OUTCOME"), e.get("NEUROND_OUTCOME_WHY")) for e in finished] == [("clean", None)], finished
    if kind == "wedge":
        assert_detected_at_the_adaptive_deadline(daemon, detected[0])


def assert_detected_at_the_adaptive_deadline(daemon, entry: dict) -> None:
    """A hang is noticed when the call's deadline passes, and that deadline follows what recent steps of its kind
    took (engine/deadline.py): at most factor x (steps per call) x their 90th percentile, never under the floor.
    The percentile is bounded from above by the daemon's own step histogram (its bucket holding the 90th
    percentile; x 1.5 for the window of recent steps being slower than the whole history). A daemon that stopped
    learning from its steps waits for the ceiling (20 s here) and fails."""
    detail = entry["NEUROND_DETAIL"]
    match = re.match(r"(prefill|decode) did not finish within ([0-9.]+)s", detail)
    assert match, detail
    step, deadline = match.group(1), float(match.group(2))
    detect_s = int(entry["NEUROND_DETECT_MS"]) / 1000
    assert deadline - 0.05 <= detect_s <= deadline + DETECT_SLACK_S, (detect_s, detail)
    floor, ceiling = FAULT_SETTINGS["step_deadline_floor_s"], FAULT_SETTINGS["step_deadline_ceiling_s"]
    steps = 8 if step == "decode" else 1  # decode_steps_per_call (default); a prefill is one step
    p90 = step_p90_upper_bound(daemon, step)
    bound = min(ceiling, max(floor, 20.0 * steps * p90 * 1.5))  # step_deadline_factor 20 (default)
    assert bound < ceiling, f"{step} steps too slow here ({p90} s) to tell an adaptive deadline from the ceiling"
    assert floor <= deadline <= bound + 0.01, (deadline, bound, detail)


def step_p90_upper_bound(daemon, kind: str) -> float:
    """The upper edge of the histogram bucket that holds the 90th percentile of the daemon's `kind` steps."""
    pattern = re.compile(r'neurond_step_seconds_bucket\{kind="' + kind + r'",le="([0-9.e+-]+)"\}')
    buckets = sorted((float(m.group(1)), value) for sample, value in daemon.metrics().items()
                     if (m := pattern.fullmatch(sample)))
    total = buckets[-1][1] if buckets else 0
    assert total > 0, f"no {kind} steps observed"
    return next(edge for edge, count in buckets if count >= 0.9 * total)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("kind", ["raise", "exit", "wedge"])
def test_fault_during_reload_is_recovered_by_the_next_attempt(daemon, kind, rank):
    """A fault while loading shards (here: during the recovery of another fault) climbs the ladder."""
    wait_ready(daemon)
    seen = len(daemon.admin.status()["transitions"])
    assert daemon.admin.inject(rank, kind, "load").status_code == 200
    # A death makes the recovery respawn that rank, whose load then faults.
    assert daemon.admin.inject(rank, "sigkill", "prefill").status_code == 200
    status, _, body = daemon.chat(chat_body(max_tokens=4))
    # The request is replayed once the pool is repaired, unless that takes longer than resume_wait_s (30 s).
    assert status == 200 or (status, body["error"]["code"]) == (503, "model_unavailable"), body
    wait_ready(daemon, timeout=180)
    assert daemon.chat(chat_body(max_tokens=4))[0] == 200
    events = [t[0] for t in daemon.admin.status()["transitions"][seen:]]
    assert events[:3] == ["fault", "abort", "repair"]
    assert events[3] == "fault"  # the load fault, during reloading
    assert events[-1] == "recovered"
    # and the next attempt came after the first wait of the backoff (recovery_backoff_s, 1 s by default)
    assert "neurond recovery_backoff: waiting 1000 ms before attempt 2" in daemon.log()
    if kind == "wedge":  # found by the load's stall deadline (8 s here), not its 20 s load deadline
        assert "load shard (no progress) did not finish within 8.00s" in daemon.log()

