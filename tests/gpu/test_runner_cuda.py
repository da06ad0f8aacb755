"""The runner on a real GPU (skipped without one; run on the device machine: `python3 -m pytest -m gpu`).

The built-in model in bfloat16 on CUDA: graph-replayed decode steps give the tokens eager steps give, and a KV
cache that cannot fit is refused at load with the numbers, not a CUDA out-of-memory later."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from neurond.protocol import BlockRow, PrefillChunk, SamplingParams  # noqa: E402
from neurond.worker.runner import ModelRunner  # noqa: E402
from neurond.worker.tp import CollectiveGuard  # noqa: E402
from tests.harness import ranks  # noqa: E402

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def shard_placement():
    """conftest's `shard`, in bfloat16 on the GPU."""
    return "bfloat16", "cuda"


def _decode(runner: ModelRunner, prompts: dict[int, list[int]], steps: int) -> dict[int, list[int]]:
    first = runner.prefill([PrefillChunk(slot, tuple(p), 0, True, GREEDY, 0) for slot, p in prompts.items()])
    out = {slot: [tok] for slot, tok in zip(prompts, first, strict=True)}
    slots = tuple(prompts)
    for _ in range(steps):
        for slot, tok in zip(slots, runner.decode(slots), strict=True):
            out[slot].append(tok)
    return out


@pytest.mark.parametrize("kv_blocks,in_place", [(0, None), (100, False), (100, True)])
def test_graph_replay_gives_the_eager_tokens(shard, kv_blocks, in_place):
    """Static slots, and the paged cache with every slot's blocks scattered (the decode graphs read the block
    table, which changes between replays), its decode reading blocks gathered or in place (the kernel)."""
    prompts = {0: [5, 17, 300, 42, 7], 1: list(range(40, 300)), 3: [1, 2, 3]}  # slot 2 idle; one crosses 256

    def runner(use_graphs: bool) -> ModelRunner:
        r = ranks.runner(shard, slots=4, max_len=600, cuda_graphs=use_graphs, kv_block_size=16,
                         kv_cache_blocks=kv_blocks, paged_in_place=in_place)
        if kv_blocks:
            free = list(range(kv_blocks))[::-1][::2] + list(range(kv_blocks))[::-1][1::2]  # interleaved, descending
            r.apply_tables(tuple(BlockRow(s, 0, tuple(free.pop() for _ in range(-(-(len(p) + 21) // 16))))
                                 for s, p in prompts.items()))
        return r

    want = _decode(runner(False), prompts, 20)
    graphs = runner(True)
    graphs.warm_up()
    assert graphs.graphs is not None and len(graphs.graphs._graphs) == len(graphs.graphs.shapes())
    if in_place:
        assert graphs.info()["kv_reads"] == "in_place"
    assert _decode(graphs, prompts, 20) == want


@pytest.mark.parametrize("batch,lens", [(1, [1]), (3, [1, 300, 17]), (32, [2048] * 31 + [5])])
def test_paged_decode_kernel_matches_sdpa(batch, lens):
    """The in-place kernel against SDPA over the same keys and values, 8B shapes (32 query heads, 8 KV heads,
    head dim 128, bf16), blocks scattered across the pool, every split count the daemon may pick."""
    from neurond.worker.paged_attention import paged_decode

    dev, bs = torch.device("cuda", 0), 16
    gen = torch.Generator(device=dev).manual_seed(0)
    cols = -(-max(lens) // bs)
    blocks = batch * cols
    k_pool = torch.randn(blocks + 1, bs, 8, 128, device=dev, dtype=torch.bfloat16, generator=gen)
    v_pool = torch.randn(blocks + 1, bs, 8, 128, device=dev, dtype=torch.bfloat16, generator=gen)
    table = torch.randperm(blocks, device=dev, generator=gen).view(batch, cols)
    query = torch.randn(batch, 32, 128, device=dev, dtype=torch.bfloat16, generator=gen)
    want = []
    for b, n in enumerate(lens):
        pos = torch.arange(n, device=dev)
        k = k_pool[table[b, pos // bs], pos % bs].transpose(0, 1)  # [8, n, 128]
        v = v_pool[table[b, pos // bs], pos % bs].transpose(0, 1)
        out = torch.nn.functional.scaled_dot_product_attention(query[b].view(8, 4, 128), k, v)
        want.append(out.view(32, 128))
    lens_t = torch.tensor(lens, device=dev, dtype=torch.int32)
    for splits in (1, 2, 8, 32):
        got = paged_decode(query, k_pool, v_pool, table, lens_t, 128 ** -0.5, splits)
        torch.testing.assert_close(got, torch.stack(want), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("starts,counts", [((0,), (512,)), ((1500, 0, 37), (512, 300, 1))])
def test_paged_prefill_kernel_and_folded_sdpa_match_sdpa(starts, counts):
    """The in-place prefill kernel, and attention.attend's folded SDPA over gathered keys (the static cache's and
    the gather's path on CUDA), against per-row causal SDPA with grouped heads, 8B shapes, blocks scattered,
    rows padded to the widest chunk."""
    from neurond.worker.attention import attend
    from neurond.worker.paged_attention import paged_prefill

    dev, bs, trash = torch.device("cuda", 0), 16, 4095
    gen = torch.Generator(device=dev).manual_seed(1)
    batch, width = len(starts), max(counts)
    lens = [s + n for s, n in zip(starts, counts, strict=True)]
    cols = -(-max(lens) // bs)
    k_pool = torch.randn(batch * cols + 1, bs, 8, 128, device=dev, dtype=torch.bfloat16, generator=gen)
    v_pool = torch.randn_like(k_pool)
    table = torch.randperm(batch * cols, device=dev, generator=gen).view(batch, cols)
    query = torch.randn(batch, width, 32, 128, device=dev, dtype=torch.bfloat16, generator=gen).transpose(1, 2)
    positions = torch.full((batch, width), trash, device=dev)
    for b, (s, n) in enumerate(zip(starts, counts, strict=True)):
        positions[b, :n] = torch.arange(s, s + n, device=dev)
    got = paged_prefill(query, k_pool, v_pool, table, positions, torch.tensor(lens, device=dev, dtype=torch.int32),
                        128 ** -0.5)
    kv_len = cols * bs
    gathered_k = k_pool[table].view(batch, kv_len, 8, 128).transpose(1, 2)
    gathered_v = v_pool[table].view(batch, kv_len, 8, 128).transpose(1, 2)
    allowed = torch.arange(kv_len, device=dev).view(1, 1, 1, kv_len) <= positions.view(batch, 1, width, 1)
    folded = attend(query, gathered_k, gathered_v, allowed, 128 ** -0.5)
    for b, (s, n) in enumerate(zip(starts, counts, strict=True)):
        want = torch.nn.functional.scaled_dot_product_attention(
            query[b : b + 1, :, :n], gathered_k[b : b + 1, :, : s + n], gathered_v[b : b + 1, :, : s + n],
            attn_mask=allowed[b : b + 1, :, :n, : s + n], enable_gqa=True)
        torch.testing.assert_close(got[b : b + 1, :, :n], want, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(folded[b : b + 1, :, :n], want, atol=2e-2, rtol=2e-2)


def test_a_kv_cache_that_does_not_fit_is_refused_with_the_numbers(shard):
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(MemoryError, match="lower max_batch_size, max_model_len"):
        # 2 layers x 4 KV heads x 32 dims x 2 bytes x K and V = 1 KiB per token, 2049 positions per slot (the
        # model's context + the trash column): this asks for about twice the free memory
        ranks.runner(shard, slots=int(2 * free / 1024 / 2049) + 1, max_len=2049)
    assert torch.cuda.mem_get_info()[0] > free * 0.9  # nothing was allocated for it


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_own_compiled_layers_in_graphs_give_transformers_tokens(model_type):
    """neurond's layers with torch.compile'd kernels, replayed as CUDA graphs, against transformers' layers run
    eagerly (float32, so the comparison is about the math, not bfloat16 rounding)."""
    from tests.worker.test_decoder import run, tiny

    dev = torch.device("cuda", 0)
    model = tiny(model_type).to(dev)
    eager = ModelRunner(model, slots=4, max_len=300, device=dev, guard=CollectiveGuard(), world_size=1,
                        own_layers=False)
    theirs = run(eager)
    del eager
    ours = ModelRunner(model, slots=4, max_len=300, device=dev, guard=CollectiveGuard(), world_size=1,
                       cuda_graphs=True, compile_kernels=True)
    ours.warm_up()
    assert ours.info()["compiled_kernels"] and ours.info()["cuda_graphs"]
    assert run(ours) == theirs
