"""Both ranks die in the same step (found by the chaos soak, seed 11: `same_step: exit@prefill r0 +
sigkill@prefill r1`).

Every rank is dead, so the cheapest rung that fits is a full reload, at the first attempt. What happens instead:
the supervisor lists the victims as soon as the first death is reported; the second rank's exit is noticed
(its pidfd) a moment later, while the abort runs, and nothing looks again before the rung is chosen. So it
takes replace_ranks for the first rank alone, the respawned rank's communicator join fails against the dead
peer, and only the second attempt, a full reload, repairs: ~10 s more on this box, and the daemon's own judge
journals the recovery as `degraded` (2 attempts, full_reload where replace_ranks fits).
"""

from __future__ import annotations

import pytest

from tests.conftest import chat_body
from tests.faults import fault_daemon, wait_ready


@pytest.mark.xfail(strict=False, reason="supervisor: a rank that dies during the abort is not counted as a victim "
                                        "before the rung is chosen (neurond/pool/supervisor.py _unblock)")
def test_both_ranks_dying_in_one_step_take_one_full_reload(start_daemon, tmp_path):
    d = fault_daemon(start_daemon, tmp_path, 2)
    seen = len(d.admin.status()["transitions"])
    # Armed while no request runs, so the next prefill fires both.
    assert d.admin.inject(0, "exit", "prefill").status_code == 200
    assert d.admin.inject(1, "sigkill", "prefill").status_code == 200
    status, _, body = d.chat(chat_body(max_tokens=4))
    assert (status, body["error"]["code"]) == (503, "rank_died")
    wait_ready(d)
    assert d.chat(chat_body(max_tokens=4))[0] == 200
    transitions = d.admin.status()["transitions"][seen:]
    d.stop()
    assert [(t[0], t[4]) for t in transitions] == [("fault", None), ("abort", None), ("repair", "full_reload"),
                                                   ("recovered", "full_reload")], transitions
