"""Both ranks die in the same step (found by the chaos soak, seed 11: `same_step: exit@prefill r0 +
sigkill@prefill r1`).

Every rank is dead, so the cheapest rung that fits is a full reload, at the first attempt. (It used to take
replace_ranks for the first rank alone: the victims were listed at the first death, and the second rank's exit
— noticed from its pidfd a moment later, while the abort ran — was not looked at again before the rung was
chosen; the respawned rank's join failed against the dead peer and only a second attempt repaired.) The
request in flight is replayed after the reload.
"""

from __future__ import annotations

from tests.conftest import chat_body
from tests.faults import fault_daemon, wait_ready


def test_both_ranks_dying_in_one_step_take_one_full_reload(start_daemon, tmp_path):
    d = fault_daemon(start_daemon, tmp_path, 2)
    seen = len(d.admin.status()["transitions"])
    # Armed while no request runs, so the next prefill fires both.
    assert d.admin.inject(0, "exit", "prefill").status_code == 200
    assert d.admin.inject(1, "sigkill", "prefill").status_code == 200
    status, _, body = d.chat(chat_body(max_tokens=4))
    assert status == 200, body
    wait_ready(d)
    assert d.chat(chat_body(max_tokens=4))[0] == 200
    transitions = d.admin.status()["transitions"][seen:]
    d.stop()
    assert [(t[0], t[4]) for t in transitions] == [("fault", None), ("abort", None), ("repair", "full_reload"),
                                                   ("recovered", "full_reload")], transitions
