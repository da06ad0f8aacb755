"""What the supervisor says in a rank's spec as it is spawned: a rank started by a repair captures its decode
graphs on first use (ready sooner); a first start captures them all before it reports loaded."""

from __future__ import annotations

from neurond.config import Config
from neurond.pool.supervisor import Supervisor


def test_a_repair_spawns_ranks_that_capture_lazily():
    sup = Supervisor(Config(), "/nonexistent-model")
    spec = sup._specs()[0]
    assert spec.capture_at_load is True
    assert sup._at_spawn(spec).capture_at_load is True  # first start: everything captured before `loaded`
    sup._incident = "feed1234"  # a recovery is under way
    assert sup._at_spawn(spec).capture_at_load is False
    sup._load_faults[0] = ["exit"]
    armed = sup._at_spawn(spec)
    assert armed.capture_at_load is False and armed.faults == (("exit", "load", 1),)
