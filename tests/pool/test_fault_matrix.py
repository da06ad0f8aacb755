"""Every fault kind x rank 0 and 1 x phase, over gloo at TP=2 (issue 3's proof on CPU).

For each: the request in flight ends within the bound, the daemon stays up, /ready returns to 200 by itself,
the next request succeeds, no worker process is left over, and the recorded transitions are exactly
fault -> abort -> repair -> recovered with the cheapest ladder rung that fits:
- a rank that raised or ran out of memory reported an error about the step, which held only this request:
  the request caused it and fails with that error. The raiser is healthy and idle afterwards; its peer, waiting
  in a collective the raiser never joins, is usually released when the raiser's communicator is aborted
  (gloo: its connections close): nobody is killed, comm_rebuild, both processes and their weights kept. Gloo
  does not always release it within the grace (seen on the first collective after start); then the stuck peer
  alone is replaced (replace_ranks) and the raiser keeps its process. (NCCL's abort releases it: the GPU issues.)
- a dead or wedged rank says nothing about the request: it is replayed after the repair and gets the same
  answer as without the fault (greedy). The rank is replaced alone (replace_ranks); its peer is released by its
  death and keeps its process and weights.

The daemon keeps two spare workers (pool/spares.py), as in production: a replaced rank takes one whose imports
are done instead of importing torch on the repair's critical path. On CPU ranks and spares are forked from the
worker zygote (pool/launcher.py), so a spare's replacement is ready at once; the leader's children are its ranks,
its spares and the zygote. (tests/pool/test_spares.py covers spares started from scratch, as CUDA ranks are.)
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import alive as _alive, chat_body
from tests.faults import fault_daemon, wait_ready

# kind -> (HTTP status, error code) the faulted request gets (200: replayed and completed), the lifecycle cause,
# and the rung that repairs it
EXPECTED = {
    "raise": (500, "rank_failed", "rank_failed", "comm_rebuild or peer"),
    "oom": (503, "out_of_memory", "out_of_memory", "comm_rebuild or peer"),
    "exit": (200, None, "rank_died", "replace_ranks"),
    "sigkill": (200, None, "rank_died", "replace_ranks"),
    "segfault": (200, None, "rank_died", "replace_ranks"),
    "wedge": (200, None, "rank_timeout", "replace_ranks"),
}
REQUEST_BOUND_S = 30.0  # floor 1 s deadline + detection + a rank replaced + the replay; generous for 2-core CI


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
    after = final["pids"]
    faulted, peer = str(rank), str(1 - rank)
    if transitions[-1][4] == "comm_rebuild" and rung == "comm_rebuild or peer":
        assert after == before, "no process may be replaced"
    elif rung == "comm_rebuild or peer":
        assert transitions[-1][4] == "replace_ranks"
        assert after[faulted] == before[faulted], "the rank that raised is healthy: it keeps its process"
        assert not _alive(before[peer]), "the replaced worker is still alive"
    else:
        assert transitions[-1][4] == rung
        assert after[peer] == before[peer], "the surviving rank must keep its process"
        assert after[faulted] != before[faulted]
        assert not _alive(before[faulted]), "the replaced worker is still alive"
    # no replaced worker left over: the leader's children are exactly its ranks and its spares
    assert not set(final["spare_pids"]) & set(after.values())
    assert sorted(daemon.worker_pids()) == sorted([*after.values(), *final["spare_pids"]])


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

