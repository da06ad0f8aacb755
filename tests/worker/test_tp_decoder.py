"""neurond's own decoder layers (decoder.py) split over two ranks (tp.py, gloo on this host) give the greedy
tokens of one rank, for tiny grouped-query models (4 query heads, 2 KV heads: one KV head and two query heads
per rank) of each kind the own layers handle differently: llama (also with biases on every projection, so
the row-wise o/down biases that only rank 0 holds are covered), qwen2 (q/k/v biases), qwen3 (q/k norms, and
heads x head_dim wider than hidden, as in Qwen3-0.6B).

The checkpoints are written once; the two rank processes are started once and run every model."""

from __future__ import annotations

from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")

from neurond.protocol import PrefillChunk, SamplingParams  # noqa: E402
from tests.harness import ranks  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
CASES = {
    "llama": ("llama", {}),
    "llama-biased": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),
}
TIMEOUT_S = 120


def write_checkpoint(path, model_type: str, extra: dict) -> None:
    """test_decoder's tiny random model (its config updated with `extra`) as a safetensors checkpoint."""
    from tests.worker.test_decoder import tiny

    tiny(model_type, **extra).save_pretrained(path, safe_serialization=True)


def run(model_dir: str, rank: int, world_size: int) -> dict:
    """Load this rank's shard, then a batched prefill, decode steps, a chunked prefill joining the batch and
    more decode steps. Every rank runs the same steps (the collectives pair up); each returns its tokens."""
    shard = ranks.load_shard(model_dir, torch.device("cpu"), "float32", rank, world_size)
    runner = ranks.runner(shard, slots=4, max_len=300)
    layer = runner.own[0] if runner.own is not None else None
    # Slot 1's 250-token prompt crosses the 256-position decode kv bucket; slot 2 idles in the first decodes
    # (a padding row of the batch of 4).
    prompts = {0: [3, 14, 15, 92, 65, 35], 1: [(7 * i + 5) % 101 for i in range(250)], 3: [7]}
    tokens = runner.prefill([PrefillChunk(s, tuple(p), 0, True, GREEDY) for s, p in prompts.items()])
    for steps in (1, 4, 12):
        tokens += runner.decode((0, 1, 3), steps)
    late = [(11 * i + 2) % 101 for i in range(30)]
    tokens += runner.prefill([PrefillChunk(2, tuple(late[:17]), 0, False, GREEDY)])
    tokens += runner.prefill([PrefillChunk(2, tuple(late[17:]), 17, True, GREEDY)])
    tokens += runner.decode((0, 1, 2, 3), 10)
    return {"tokens": tokens, "info": runner.info(),
            "heads": None if layer is None else (layer.q_heads, layer.kv_heads),
            "cache_kv_heads": runner.cache.k[0].shape[1]}


def rank_main(rank: int, world_size: int, port: int, model_dirs: dict, results) -> None:
    """One rank of the TP=2 run (a spawned process): join the gloo group on the test's store, run every model.
    An exception ends the process with its traceback on stderr and a non-zero exit, which run_ranks reports."""
    import torch.distributed as dist

    dev = ranks.bind_device("cpu", threads=1)  # two ranks on a small machine
    ranks.join_group(rank, world_size, dev, port, store_opened=True, timeout_s=TIMEOUT_S)
    out = {case: run(d, rank, world_size) for case, d in model_dirs.items()}
    dist.destroy_process_group()
    results.put((rank, out))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp-decoder")
    dirs = {}
    for case, (model_type, extra) in CASES.items():
        dirs[case] = str(root / case)
        write_checkpoint(dirs[case], model_type, extra)
    return dirs


@pytest.fixture(scope="module")
def tp2(model_dirs) -> dict[str, dict]:
    """Rank 0's results of every model at TP=2 (rank 1's tokens checked equal to them)."""
    import torch.distributed as dist

    # The rendezvous store lives here, on a port the OS picks; the ranks connect to it.
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=TIMEOUT_S), wait_for_workers=False)
    try:
        got = dict(ranks.run_ranks(rank_main, 2, 2, store.port, model_dirs, timeout_s=2 * TIMEOUT_S).results)
    except ranks.RanksFailed as exc:
        pytest.fail(f"{exc} (their output above)")
    for case in model_dirs:
        assert got[1][case]["tokens"] == got[0][case]["tokens"], case  # every rank draws the same tokens
    return got[0]


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_own_layers_give_tp1_greedy_tokens(case, model_dirs, tp2):
    one = run(model_dirs[case], 0, 1)
    two = tp2[case]
    assert one["info"]["own_layers"] and two["info"]["own_layers"]
    assert one["heads"] == (4, 2) and two["heads"] == (2, 1)  # this rank's query / KV heads
    assert one["cache_kv_heads"] == 2 and two["cache_kv_heads"] == 1
    assert len(one["tokens"]) == 3 + 3 * 17 + 2 + 4 * 10
    assert two["tokens"] == one["tokens"]
    assert len(set(one["tokens"])) > 10  # not a degenerate model that says one token
