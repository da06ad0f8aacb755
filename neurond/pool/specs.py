"""The ranks' specs: what each rank is told at spawn (its environment included), and the one owner of the KV
cache's agreed size.

Every setting keeps its configuration's name on the way to the rank (WorkerSpec), but `context_len`, the served
context window (resolved once from the model and max_model_len: neurond/served_model.py). The KV cache's block count is
the one fact that changes after the start: with kv_cache_blocks = -1 each rank of the first load makes as many
blocks as fit its GPU and reports it (LoadReport); the least of those is agreed, and from then on every rank,
of this pool or of a later one (a replaced rank, a full reload), makes exactly that many, and the engine hands
out exactly those (it reads `kv_cache_blocks` through the supervisor). Nothing else holds that count.
"""

from __future__ import annotations

import dataclasses
import os

from neurond import protocol as p
from neurond.config import Config

# Environment every rank gets, over the operator's own (neurond's recovery depends on these values):
RANK_ENV = (
    # NVLink multicast stays off: it can take the host's shared GPUs out of service.
    ("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1"),
    # torch's NCCL watchdog must not act on an error: its default (3) ends the process on any NCCL or CUDA
    # error it sees, so a survivor could die for its peer's fault and lose weights it could have kept. The
    # leader decides: it aborts the communicator and replaces only the ranks that must go.
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0"),
    # Nor end the process when the watchdog thread looks stuck (after 480 s): the leader's own deadlines are
    # seconds, and a rank it gave up on is killed by it.
    ("TORCH_NCCL_ENABLE_MONITORING", "0"),
    # No flight-recorder dumps into /tmp on a timeout: the leader's journal entry and the rank's stack dump
    # (SIGUSR1 before a kill) say what happened.
    ("TORCH_NCCL_DUMP_ON_TIMEOUT", "0"),
)


def rank_env(config: Config) -> tuple[tuple[str, str], ...]:
    """Every rank's environment: RANK_ENV, then where compiled kernels go."""
    return RANK_ENV + _compile_env(config)


def _compile_env(config: Config) -> tuple[tuple[str, str], ...]:
    """torch.compile's and Triton's kernels under neurond's cache directory (kept across restarts; the default,
    /tmp, is private to each start of the unit), unless the operator chose a place. Where ranks will compile kernels,
    their processes import torch's compiler before their spec arrives (worker/__main__.py), as spares do."""
    env: tuple[tuple[str, str], ...] = ()
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        env += (("TORCHINDUCTOR_CACHE_DIR", os.path.join(config.cache_dir, "torch-compile")),)
    if "TRITON_CACHE_DIR" not in os.environ:
        # The paged decode kernel's (worker/paged_attention.py) compiled variants: ~1 s each, once per machine.
        env += (("TRITON_CACHE_DIR", os.path.join(config.cache_dir, "triton")),)
    if config.torch_compile and config.device != "cpu":
        env += (("NEUROND_PREIMPORT_COMPILER", "1"),)
    return env


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
