"""The worker's side of an abort, without processes: what a rank reports about a call its communicator was
aborted under, and how it tells waiting on peers from its own work (CollectiveGuard).

The NCCL behaviour itself (the abort releasing a stuck graph replay, the order graphs and abort must go in)
needs two GPUs: tests/gpu/test_tp_faults.py."""

from __future__ import annotations

import threading
import time

import pytest

from neurond import protocol as p
from neurond.worker.main import Worker
from neurond.worker.tp import CollectiveGuard

torch = pytest.importorskip("torch")


class FakeComm:
    def __init__(self) -> None:
        self.aborts = 0
        self.abort_calls: list[str] = []

    def abort_count(self) -> int:
        return self.aborts

    def aborted_since(self, mark: int) -> bool:
        return self.aborts != mark

    def abort(self):
        self.abort_calls.append(threading.current_thread().name)
        self.aborts += 1
        return True, ""


def _worker(dispatch) -> Worker:
    w = Worker.__new__(Worker)
    w.rank, w.device, w.runner, w.comm, w._busy_since = 1, torch.device("cpu"), None, FakeComm(), 0.0
    w._dispatch = dispatch
    return w


def test_a_call_aborted_under_it_is_comm_aborted_whether_it_returned_or_raised():
    def returns(cmd):
        w.comm.aborts += 1  # the control thread aborted while the collective was stuck; it returned garbage
        return [7], {}

    w = _worker(returns)
    reply = w._run(p.Decode(5, (0,)))
    assert isinstance(reply, p.StepFailed) and reply.kind is p.FaultKind.COMM_ABORTED

    def raises(cmd):
        w.comm.aborts += 1
        raise RuntimeError("decode graphs released: the communicator is being aborted")

    w = _worker(raises)
    reply = w._run(p.Decode(6, (0,)))
    assert isinstance(reply, p.StepFailed) and reply.kind is p.FaultKind.COMM_ABORTED and reply.context_ok


def test_a_failure_with_no_abort_is_reported_as_itself():
    def raises(cmd):
        raise MemoryError("injected out-of-memory in decode")

    reply = _worker(raises)._run(p.Decode(7, (0,)))
    assert isinstance(reply, p.StepFailed) and reply.kind is p.FaultKind.OUT_OF_MEMORY


def test_the_abort_runs_on_a_thread_of_its_own_and_is_confirmed():
    w = _worker(None)
    reply = w._abort(p.AbortComm(9))
    assert isinstance(reply, p.Aborted) and reply.ok and reply.call_id == 9
    assert w.comm.abort_calls == ["rank1-abort"]


def test_guard_regions_own_work_and_local_steps():
    guard = CollectiveGuard()
    with guard.region():
        assert guard.inside
        with guard.own_work():  # the fault hook inside a step: not waiting on peers
            assert not guard.inside
            left = guard.left_at
            assert time.monotonic() - left < 1.0
        assert guard.inside
    assert not guard.inside and guard.left_at >= left
    with guard.region(collective=False):  # TP=1: nothing to wait for
        assert not guard.inside

    with guard.local():  # a rank warming up alone calls no collective (dist is not even initialised here)
        guard.all_reduce(torch.ones(2))
    with pytest.raises(ValueError):  # outside local(), it does call one
        guard.all_reduce(torch.ones(2))
