"""A rank process that dies is noticed at once, the request it was serving gets a clean error, and the pool
repairs itself without a human: /ready returns to 200 and the next request succeeds.

The tests share one TP=2 daemon: each starts from a healthy pool, whatever repairs came before, and nothing here
depends on a fresh one. Its stop at the end still checks that no worker (replaced or not) is left over."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from tests.conftest import chat_body
from tests.faults import wait_ready


@pytest.fixture(scope="module")
def d(start_daemon):
    daemon = start_daemon(2)
    yield daemon
    daemon.stop()  # asserts that no worker process is left


@pytest.mark.parametrize("victim", [0, 1])
def test_idle_rank_killed_pool_repairs_itself(d, victim):
    wait_ready(d, {200})
    before = d.worker_pids()
    killed = sorted(before)[victim]
    # What a rank starts (on a GPU: torch's compile workers) is in its process group; this one stands in for them.
    below = subprocess.Popen(["sleep", "600"], process_group=os.getpgid(killed))
    assert os.getpgid(killed) == killed  # the rank leads its own group
    os.kill(killed, signal.SIGKILL)
    wait_ready(d, {503}, timeout=10)
    assert below.wait(timeout=10) == -signal.SIGKILL  # killed with the rank, not left to run on
    wait_ready(d, {200})
    after = d.worker_pids()
    # Only the dead rank is replaced; the other keeps its process (and its weights).
    assert len(after) == 2 and killed not in after and set(before) - {killed} <= set(after)
    status, _, body = d.chat(chat_body(max_tokens=5, temperature=0))
    assert status == 200, body


def test_rank_killed_mid_request_is_replayed_and_completes(d):
    """A death says nothing about the request in flight: it is replayed (prompt + tokens so far) after the
    repair and gets exactly the answer it gets without a fault."""
    wait_ready(d, {200})
    request = chat_body("a long answer please", max_tokens=1500, temperature=0)
    result = {}

    def long_request():
        result["response"] = d.chat(request)
        result["answered_at"] = time.monotonic()

    calls = d.steps()
    t = threading.Thread(target=long_request)
    t.start()
    d.wait_steps(calls)  # inside the generation (364 tokens, about 3 s at TP=2 on an idle 2-core box)
    killed_at = time.monotonic()
    os.kill(sorted(d.worker_pids())[1], signal.SIGKILL)
    t.join(60)
    assert not t.is_alive(), "the request hung after its rank died"
    status, _, body = result["response"]
    assert status == 200, body
    assert result["answered_at"] > killed_at
    wait_ready(d, {200})
    again = d.chat(request)[2]
    assert body["choices"] == again["choices"] and body["usage"] == again["usage"]
    assert body["usage"]["completion_tokens"] > 100
