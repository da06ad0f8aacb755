"""The ranks' specs: what each rank is told at spawn, and the one owner of the KV cache's agreed size.

Every setting keeps its configuration's name on the way to the rank (WorkerSpec), but `context_len`, the served
context window (resolved once from the model and max_model_len: neurond/served_model.py). The KV cache's block count is
the one fact that changes after the start: with kv_cache_blocks = -1 each rank of the first load makes as many
blocks as fit its GPU and reports it (LoadReport); the least of those is agreed, and from then on every rank,
of this pool or of a later one (a replaced rank, a full reload), makes exactly that many, and the engine hands
out exactly those (it reads `kv_cache_blocks` through the supervisor). Nothing else holds that count.
"""

from __future__ import annotations

import dataclasses

from neurond import protocol as p
from neurond.config import Config


class RankSpecs:
    def __init__(self, config: Config, model_dir: str, context_len: int, env: tuple[tuple[str, str], ...]) -> None:
        c = config
        self.world_size = c.tp_size
        #: Blocks in every rank's paged KV cache: 0 static, -1 until the first load measured how many fit.
        self.kv_cache_blocks = c.kv_cache_blocks
        self._base = p.WorkerSpec(
            rank=0, world_size=c.tp_size, model_dir=model_dir, dtype=c.dtype, device=c.device, backend=c.backend,
            env=env, log_level=c.log_level, fault_injection=c.fault_injection, max_batch_size=c.max_batch_size,
            context_len=context_len, kv_block_size=c.kv_block_size, kv_cache_blocks=c.kv_cache_blocks,
            gpu_memory_utilization=c.gpu_memory_utilization, prefill_chunk_tokens=c.prefill_chunk_tokens,
            cuda_graphs=c.cuda_graphs, torch_compile=c.torch_compile, cpu_threads=c.cpu_threads)

    def for_rank(self, rank: int) -> p.WorkerSpec:
        """Rank `rank`'s spec now (the agreed block count once there is one)."""
        return dataclasses.replace(self._base, rank=rank, kv_cache_blocks=self.kv_cache_blocks)

    def agree(self, reports: dict[int, p.LoadReport]) -> None:
        """Ranks reported their loads: with the count still to be measured, agree on the least any made."""
        if self.kv_cache_blocks == p.KV_BLOCKS_FROM_MEMORY and reports:
            self.kv_cache_blocks = min(r.kv_cache_blocks for r in reports.values())
