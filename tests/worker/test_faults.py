"""Fault injection on a rank: the arming is acknowledged before the fault can fire.

Found by the chaos soak (seed 673586450, once in a full test run): a fault that ends the process, armed while
a step was just starting, could fire between the control thread's arming and its reply. The rank died
without answering, the leader failed the admin call (503 rank_died, "arming refused"), and the incident the
fault did cause belonged to no volley.
"""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

from neurond import protocol as p
from neurond.worker.faults import FaultPlan, InjectedFault
from neurond.worker.main import Worker


class _SlowControlPipe:
    """The control pipe of a rank whose reply takes a while to leave (a loaded box: the control thread is
    preempted in the middle of writing it)."""

    def __init__(self) -> None:
        self.commands: queue.Queue = queue.Queue()
        self.sent: list[tuple[float, object]] = []

    def recv(self):
        return self.commands.get()

    def send(self, reply) -> None:
        time.sleep(0.3)
        self.sent.append((time.monotonic(), reply))


def test_the_arming_is_acknowledged_before_the_fault_can_fire():
    pipe = _SlowControlPipe()
    worker = Worker(SimpleNamespace(rank=0, fault_injection=True), step_conn=None, ctrl_conn=pipe)
    worker.faults = FaultPlan()
    threading.Thread(target=worker._control_loop, daemon=True).start()
    fired: list[float] = []

    def compute() -> None:  # steps back to back, each starting at its fault point
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                worker.faults.fire("decode")
            except InjectedFault:
                fired.append(time.monotonic())
                return
            time.sleep(0.0005)

    steps = threading.Thread(target=compute)
    steps.start()
    pipe.commands.put(p.InjectFault(7, "raise", "decode", 1))
    steps.join(15)
    deadline = time.monotonic() + 5
    while not pipe.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fired, "the armed fault never fired"
    assert [type(r).__name__ for _, r in pipe.sent] == ["Done"] and pipe.sent[0][1].call_id == 7
    assert pipe.sent[0][0] <= fired[0], "the fault fired before the rank acknowledged arming it"


def test_a_bad_fault_is_refused_and_nothing_is_armed():
    plan, acks = FaultPlan(), []
    for kind, phase, count in (("melt", "decode", 1), ("raise", "teatime", 1), ("raise", "decode", 0)):
        try:
            plan.arm(kind, phase, count, acknowledge=lambda: acks.append(1))
        except ValueError:
            pass
        else:
            raise AssertionError(f"{kind}/{phase}/{count} was armed")
    assert not acks and not plan.armed("decode")


def test_a_fault_armed_after_n_calls_lets_them_pass_then_fires_count_times():
    plan = FaultPlan()
    plan.arm("raise", "decode", count=2, after=3)
    for _ in range(3):
        plan.fire("decode")  # passes
        plan.fire("prefill")  # another phase never counts
    for _ in range(2):
        try:
            plan.fire("decode")
        except InjectedFault:
            continue
        raise AssertionError("the armed fault did not fire")
    plan.fire("decode")  # spent
    assert not plan.armed("decode")
