"""What the supervisor says in a rank's spec as it is spawned: a rank started by a repair captures its decode
graphs on first use (ready sooner); a first start captures them all before it reports loaded."""

from __future__ import annotations

from neurond.config import Config
from neurond.pool.supervisor import Supervisor


def test_a_repair_spawns_ranks_that_capture_lazily():
    sup = Supervisor(Config(), "/nonexistent-model", 4096)
    spec = sup.specs.for_rank(0)
    assert spec.capture_at_load is True
    assert sup.spawning(spec).capture_at_load is True  # first start: everything captured before `loaded`
    sup._incident = "feed1234"  # a recovery is under way
    assert sup.spawning(spec).capture_at_load is False
    sup.arming.arm_load(0, "exit")
    armed = sup.spawning(spec)
    assert armed.capture_at_load is False and armed.faults == (("exit", "load", 1),)


def test_every_rank_is_told_the_kv_cache_layout():
    """0: the static slot cache, no block tables; N: a paged cache of exactly the N blocks the leader hands out."""
    sup = Supervisor(Config(max_batch_size=4, max_model_len=100, kv_block_size=16, kv_cache_blocks=0),
                     "/nonexistent-model", 64)
    spec = sup.specs.for_rank(0)
    assert (spec.kv_cache_blocks, spec.kv_block_size, spec.context_len, spec.max_batch_size) == (0, 16, 64, 4)
    sup = Supervisor(Config(kv_cache_blocks=123, kv_block_size=32), "/nonexistent-model", 4096)
    assert sup.specs.for_rank(0).kv_cache_blocks == 123 and sup.specs.for_rank(0).kv_block_size == 32


def test_the_first_load_agrees_on_the_least_blocks_any_rank_made_and_every_later_rank_makes_that_many():
    """Sized from memory (-1): the specs alone own the agreed count; a replaced rank or a new pool gets it."""
    from neurond import protocol as p
    from neurond.pool.specs import RankSpecs

    specs = RankSpecs(Config(tp_size=2, kv_cache_blocks=-1), "/m", 64, ())
    assert [specs.for_rank(r).kv_cache_blocks for r in (0, 1)] == [-1, -1]

    def report(blocks: int) -> p.LoadReport:
        return p.LoadReport(kv_cache_blocks=blocks, kv_block_size=16, kv_cache_bytes=0, kv_layout="paged",
                            kv_reads="gathered", dtype="float32", cuda_graphs=False, own_layers=True,
                            compiled_kernels=False, load_s=0.0, graph_capture_s=0.0)

    specs.agree({0: report(900), 1: report(870)})
    assert specs.kv_cache_blocks == 870 and specs.for_rank(1).kv_cache_blocks == 870
    specs.agree({1: report(5000)})  # a replaced rank's load, told to make 870: the agreement stands
    assert specs.kv_cache_blocks == 870
    fixed = RankSpecs(Config(kv_cache_blocks=123), "/m", 64, ())
    fixed.agree({0: report(99)})
    assert fixed.kv_cache_blocks == 123
