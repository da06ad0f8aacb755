"""The admin API against fakes (tests/api/fakes.py, type-checked against the Protocols it depends on): its status
is the supervisor's snapshot and the engine's counts, an operator's action is refused with 409 in a state
that does not allow it and otherwise started in the background (202), and every route needs the token. The
daemon's own admin socket is tested in tests/api/test_security.py and tests/test_status.py."""

from __future__ import annotations

from starlette.testclient import TestClient

from neurond.api.admin import AdminAPI
from neurond.lifecycle import Cause, LifecycleState
from tests.api.fakes import FakeEngine, FakePool, transition
from tests.conftest import wait_until

TOKEN = "admin-token-5e1a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_status_is_the_snapshot_and_the_engine_counts():
    pool = FakePool(LifecycleState.RELOADING, Cause("rank_died", incident="i-7", rank=1, detail="exit -9"))
    pool.transitions = (transition("fault", "healthy", "poisoned", "rank_died"),)
    with TestClient(AdminAPI(pool, TOKEN, engine=FakeEngine(), started_at=1000.0).app()) as client:
        assert client.get("/admin/status").status_code == 401
        status = client.get("/admin/status", headers=AUTH).json()
    assert (status["state"], status["tp_size"], status["pids"]) == ("reloading", 2, {"0": 101, "1": 102})
    assert status["last_cause"] == {"cause": "rank_died", "incident": "i-7", "rank": 1, "request_id": None,
                                    "rung": None, "attempt": 0, "detail": "exit -9"}
    assert status["last_transition"]["to"] == "poisoned" and status["started_at"] == 1000.0
    assert status["requests"]["completed"] == 3 and status["requests"]["max_batch_seen"] == 2


def test_operator_actions_are_refused_in_the_wrong_state_and_run_in_the_background():
    pool = FakePool(LifecycleState.HEALTHY)
    with TestClient(AdminAPI(pool, TOKEN).app()) as client:
        assert client.post("/admin/load").status_code == 401
        refused = client.post("/admin/load", headers=AUTH)
        assert refused.status_code == 409 and "cannot load while healthy" in refused.text
        accepted = client.post("/admin/unload", headers=AUTH)
        assert accepted.status_code == 202 and accepted.json() == {"accepted": "unload", "state": "healthy"}
        wait_until(lambda: pool.actions == ["unload"], 5, "the unload to start")
        pool.state = LifecycleState.RELOADING
        assert client.post("/admin/reload", headers=AUTH).status_code == 409
    assert pool.actions == ["unload"]


def test_fault_injection_takes_a_json_body():
    pool = FakePool()
    with TestClient(AdminAPI(pool, TOKEN).app()) as client:
        assert client.post("/admin/faults", headers=AUTH, content=b"{}").status_code == 400
        armed = client.post("/admin/faults", headers=AUTH, json={"rank": 1, "kind": "hang", "phase": "decode"})
    assert armed.status_code == 200 and pool.armed == [(1, "hang", "decode", 1, 0)]
