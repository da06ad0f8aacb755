"""The repair ladder's other rungs and its end: comm_rebuild without reloading weights, operator actions, and
the crash-loop breaker that gives up into `unloaded` and exits with code 4 as documented.

The TP=1 tests with the default fault settings share one daemon (`tp1`): each starts from a healthy daemon and
looks only at what happens after it starts (transitions from its own start on, the process it saw), so none
depends on a fresh one. Its stop at the end still checks that no worker is left over. The breaker's daemon
(which exits), the one without fault injection and the TP=2 one are their own."""

from __future__ import annotations

import time

import pytest

from tests.conftest import chat_body
from tests.faults import Admin, fault_daemon, wait_ready


@pytest.fixture(scope="module")
def tp1(start_daemon, tmp_path_factory):
    d = fault_daemon(start_daemon, tmp_path_factory.mktemp("tp1"), 1)
    yield d
    d.stop()  # asserts that no worker process is left


def test_tp1_exception_is_repaired_by_comm_rebuild_keeping_the_process(tp1):
    d = tp1
    wait_ready(d)
    pids = d.worker_pids()
    seen = len(d.admin.status()["transitions"])
    assert d.admin.inject(0, "raise", "decode").status_code == 200
    status, _, body = d.chat(chat_body(max_tokens=8))
    assert (status, body["error"]["code"]) == (500, "rank_failed")
    wait_ready(d)
    transitions = d.admin.status()["transitions"][seen:]
    assert [t[0] for t in transitions] == ["fault", "abort", "repair", "recovered"]
    assert transitions[-1][4] == "comm_rebuild"
    assert d.worker_pids() == pids  # same process, weights kept
    assert d.chat(chat_body(max_tokens=8))[0] == 200


def test_tp1_oom_answers_503_and_keeps_serving(tp1):
    d = tp1
    wait_ready(d)
    assert d.admin.inject(0, "oom", "prefill").status_code == 200
    status, headers, body = d.chat(chat_body(max_tokens=8))
    assert (status, body["error"]["code"]) == (503, "out_of_memory") and "retry-after" in headers
    wait_ready(d)
    assert d.chat(chat_body(max_tokens=8))[0] == 200


def test_breaker_gives_up_into_unloaded_then_exits_4(start_daemon, tmp_path):
    d = fault_daemon(start_daemon, tmp_path, 2, breaker_max_failures=2, unloaded_exit_s=3.0)
    # Every respawn of rank 1 dies while loading: recovery can never succeed.
    assert d.admin.inject(1, "exit", "load", count=50).status_code == 200
    assert d.admin.inject(1, "sigkill", "decode").status_code == 200  # so recovery must respawn rank 1
    assert d.chat(chat_body(max_tokens=8))[0] == 503
    wait_ready(d, want=503)
    t0 = time.monotonic()
    while d.admin.status()["state"] != "unloaded":
        assert time.monotonic() - t0 < 60, d.admin.status()
        time.sleep(0.1)
    status, headers, body = d.get("/ready")
    assert status == 503 and body["state"] == "unloaded" and body["cause"] == body["reason"] == "breaker_open"
    status, headers, body = d.chat(chat_body(max_tokens=4))
    assert status == 503 and body["error"]["code"] == "model_unavailable" and "retry-after" in headers
    assert d.worker_pids() == []  # nothing left running while unloaded
    assert d.proc.wait(30) == 4  # then exits with code 4, for systemd's Restart=
    assert d.stop() == 4


def test_operator_reload_unload_load(tp1):
    d = tp1
    wait_ready(d)
    pids = d.worker_pids()
    assert d.admin.client.post("/admin/reload").status_code == 202
    t0 = time.monotonic()
    while d.worker_pids() == pids or d.get("/ready")[0] != 200:
        assert time.monotonic() - t0 < 60
        time.sleep(0.1)
    assert d.admin.client.post("/admin/unload").status_code == 202
    wait_ready(d, want=503)
    assert d.get("/ready")[2]["state"] == "unloaded"
    assert d.admin.client.post("/admin/unload").status_code == 409  # not allowed while unloaded
    assert d.admin.client.post("/admin/load").status_code == 202
    wait_ready(d)
    assert d.chat(chat_body(max_tokens=4))[0] == 200


def test_admin_needs_its_token_and_fault_injection_its_setting(tp1, start_daemon, tmp_path):
    d = tp1
    wrong = Admin(d.admin.socket_path, token="wrong")
    assert wrong.client.get("/admin/status").status_code == 401
    assert wrong.inject(0, "raise", "decode").status_code == 401
    assert d.admin.inject(0, "nonsense", "decode").status_code == 400
    assert d.admin.inject(7, "raise", "decode").status_code == 400

    off = tmp_path / "off"
    off.mkdir()
    d2 = fault_daemon(start_daemon, off, 1, fault_injection=False)
    assert d2.admin.inject(0, "raise", "decode").status_code == 403
    assert d2.chat(chat_body(max_tokens=4))[0] == 200
    d2.stop()


def test_public_port_has_no_admin_routes(daemon_tp1):
    assert daemon_tp1.get("/admin/status")[0] == 404


def test_interrupted_and_queued_requests_complete_after_the_repair(start_daemon, tmp_path):
    """A wedged rank says nothing about which request caused it: the one in the step is replayed after the
    repair, and the one queued behind it waits for the repair (bounded by resume_wait_s); both complete with
    the answers they get without a fault."""
    import threading

    d = fault_daemon(start_daemon, tmp_path, 2)
    assert d.admin.inject(1, "wedge", "decode").status_code == 200  # detected after the 1 s deadline floor
    results = {}

    def send(name, content):
        results[name] = d.chat(chat_body(content, max_tokens=8, temperature=0))

    prefills = d.steps("prefill")
    first = threading.Thread(target=send, args=("faulted", "first"))
    first.start()
    d.wait_steps(prefills, "prefill")  # its prefill is done: the first request is now in its wedged decode step
    second = threading.Thread(target=send, args=("queued", "second"))
    second.start()
    first.join(60)
    second.join(60)
    assert results["faulted"][0] == 200, results["faulted"][2]
    assert results["queued"][0] == 200, results["queued"][2]
    assert [t[3] for t in d.admin.status()["transitions"] if t[0] == "fault"] == ["rank_timeout"]
    for name, content in (("faulted", "first"), ("queued", "second")):
        again = d.chat(chat_body(content, max_tokens=8, temperature=0))
        assert again[2]["choices"] == results[name][2]["choices"]
    d.stop()


def test_empty_control_call_returns_at_once():
    """Found on the GPU: aborting 'every live rank' when the only rank had died waited out abort_timeout_s."""
    import asyncio

    from neurond.config import Config
    from neurond.pool.pool import RankPool
    from neurond.pool.specs import RankSpecs

    async def run():
        pool = RankPool(RankSpecs(Config(), "", 16, ()))
        t0 = time.monotonic()
        assert await pool.control([], lambda cid: None, 5.0, "abort") == {}
        return time.monotonic() - t0

    assert asyncio.run(run()) < 0.5
