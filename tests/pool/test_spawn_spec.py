"""What the supervisor says in a rank's spec as it is spawned: a rank started by a repair captures its decode
graphs on first use (ready sooner); a first start captures them all before it reports loaded."""

from __future__ import annotations

from neurond.config import Config
from neurond.pool.supervisor import Supervisor


def test_a_repair_spawns_ranks_that_capture_lazily():
    sup = Supervisor(Config(), "/nonexistent-model", 4096)
    spec = sup._specs()[0]
    assert spec.capture_at_load is True
    assert sup._at_spawn(spec).capture_at_load is True  # first start: everything captured before `loaded`
    sup._incident = "feed1234"  # a recovery is under way
    assert sup._at_spawn(spec).capture_at_load is False
    sup._load_faults[0] = ["exit"]
    armed = sup._at_spawn(spec)
    assert armed.capture_at_load is False and armed.faults == (("exit", "load", 1),)


def test_every_rank_is_told_the_kv_cache_layout():
    """0: the static slot cache, no block tables; N: a paged cache of exactly the N blocks the leader hands out."""
    sup = Supervisor(Config(max_batch_size=4, max_model_len=100, kv_block_size=16, kv_cache_blocks=0),
                     "/nonexistent-model", 64)
    assert [(s.kv_blocks, s.kv_block_size, s.max_len) for s in sup._specs()] == [(0, 16, 64)]
    sup = Supervisor(Config(kv_cache_blocks=123, kv_block_size=32), "/nonexistent-model", 4096)
    assert sup._specs()[0].kv_blocks == 123 and sup._specs()[0].kv_block_size == 32
