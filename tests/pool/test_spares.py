"""Spare worker processes (pool/spares.py): a rank replaced in a repair takes the spare (its imports done)
instead of starting a fresh interpreter, a new spare is started once the model is healthy again, a spare's own
death is nobody's incident, and none outlives the daemon.

These daemons start workers from scratch (worker_zygote off), as CUDA ranks do: that is where spares save the
imports. (With the zygote, a spare is forked from it like any rank: tests/pool/test_fault_matrix.py.)"""

from __future__ import annotations

import os
import signal
import time

from tests.conftest import alive, chat_body
from tests.faults import fault_daemon, wait_ready

FROM_SCRATCH = {"NEUROND_WORKER_ZYGOTE": "off"}


def _spares(d, timeout: float = 30) -> list[int]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        pids = d.admin.status()["spare_pids"]
        if pids:
            return pids
        time.sleep(0.1)
    raise TimeoutError(f"no spare worker started:\n{d.log()}")


def _wait_imported(d, count: int, timeout: float = 90) -> None:
    """Until `count` spares said their imports are done (p.Imported on the control pipe)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if d.admin.status()["spares_ready"] == count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"spares never reported their imports done:\n{d.log()}")


def _replaced(d, rank_pid: int, timeout: float = 90) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status = d.admin.status()
        if status["state"] == "healthy" and status["pids"].get("0") not in (None, rank_pid):
            return status
        time.sleep(0.1)
    raise TimeoutError(f"rank 0 was not replaced:\n{d.log()}")


def test_a_replaced_rank_takes_the_spare(start_daemon, tmp_path):
    d = fault_daemon(start_daemon, tmp_path, 1, env={"NEUROND_SPARE_WORKERS": "1", **FROM_SCRATCH})
    (spare,) = _spares(d)
    _wait_imported(d, 1)
    rank = d.admin.status()["pids"]["0"]
    assert sorted(d.worker_pids()) == sorted([rank, spare])  # the spare is the daemon's child, not a rank
    incidents = d.admin.status()["incidents"]

    os.kill(rank, signal.SIGKILL)
    status = _replaced(d, rank)
    assert status["pids"]["0"] == spare, "the replacement must be the spare, not a fresh process"
    assert status["incidents"] == incidents + 1
    (new_spare,) = _spares(d)
    assert new_spare not in (rank, spare)
    assert sorted(d.worker_pids()) == sorted([spare, new_spare]) and not alive(rank)
    wait_ready(d)
    assert d.chat(chat_body(max_tokens=6, temperature=0))[0] == 200

    # An idle spare that dies is dropped: no incident, still healthy; the next repair starts a fresh process.
    os.kill(new_spare, signal.SIGKILL)
    time.sleep(1.0)
    status = d.admin.status()
    assert status["state"] == "healthy" and status["incidents"] == incidents + 1
    os.kill(spare, signal.SIGKILL)
    status = _replaced(d, spare)
    assert status["pids"]["0"] not in (rank, spare, new_spare)
    assert status["incidents"] == incidents + 2
    (third_spare,) = _spares(d)
    assert third_spare not in (rank, spare, new_spare, status["pids"]["0"])
    wait_ready(d)
    assert d.chat(chat_body(max_tokens=6, temperature=0))[0] == 200
    workers = d.worker_pids()
    d.stop()  # asserts no child (rank or spare) is left
    assert not any(alive(pid) for pid in workers)
