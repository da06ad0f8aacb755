"""How many paged KV blocks fit on this rank's GPU (`kv_cache_blocks = -1`): the memory left, after the weights
and what a step needs on top of them, within `gpu_memory_utilization` of the card.

What a step needs is measured, not estimated (vLLM profiles the same way): with a one-block cache, the runner
prefills one row of `prefill_chunk_tokens` tokens at the end of the context window, which is the largest transient
a step allocates (activations and, where the pool is read gathered rather than in place, the mask over the
whole window and the row's keys and values gathered into one copy: the scheduler batches no more rows than one
window of context, engine/scheduler.py). Its peak above the
memory in use before it is the headroom kept free. CUDA graphs of the decode step, captured after the cache,
come out of the same headroom: their pool is a few MiB per shape.

On a CPU nothing is measured: the pool gets the static cache's memory (every slot its whole window).

A cache of a given size (static, `kv_cache_blocks = N`, or the count a first load measured, which a rank started
by a repair makes again) is checked against the same budget, less the step's peak: a replaced rank must accept
the count its peers measured (on 2xH100 a stricter rule refused it, and every full reload failed the same way).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("neurond.worker")

#: Left free beyond the measured step peak: the allocator's fragmentation, NCCL's buffers, the graphs' pools.
SLACK_BYTES = 512 * 2**20


def block_bytes(layers: int, block_size: int, kv_heads: int, head_dim: int, dtype) -> int:
    """Bytes one block takes across every layer, keys and values."""
    return 2 * layers * block_size * kv_heads * head_dim * dtype.itemsize


def static_blocks(slots: int, max_len: int, block_size: int) -> int:
    """As many blocks as the static cache's memory: every slot its max_len positions."""
    return slots * -(-max_len // block_size)


def check_fits(device, nbytes: int, what: str, utilization: float) -> None:
    """Refuse a KV cache that does not fit in `utilization` of the GPU beside what is in use, with the numbers an
    operator needs (not a bare CUDA out-of-memory later)."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    usable = int(total * utilization) - (total - free) - SLACK_BYTES
    if nbytes > usable:
        raise MemoryError(
            f"the KV cache of {what} needs {nbytes / 2**30:.1f} GiB but {max(usable, 0) / 2**30:.1f} GiB is usable "
            f"in gpu_memory_utilization = {utilization:g} of {total / 2**30:.1f} GiB after the weights: lower "
            f"max_batch_size, max_model_len or kv_cache_blocks")


def blocks_that_fit(runner, utilization: float, prefill_chunk_tokens: int, per_block: int) -> int:
    """Blocks of `per_block` bytes that fit in `utilization` of the runner's GPU, after one profiling prefill
    (the runner's cache must be a one-block paged cache: every read and write lands in its trash block).
    Raises MemoryError with the numbers when not even one fits."""
    from neurond.protocol import PrefillChunk, SamplingParams

    device = runner.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    window = runner.cache.trash  # positions a sequence may use
    tokens = max(1, min(prefill_chunk_tokens, window))
    with runner.guard.local():  # alone: every rank measures its own, no collective (peers load at their pace)
        runner.prefill([PrefillChunk(0, (0,) * tokens, window - tokens, False, SamplingParams(temperature=0.0), 0)])
    torch.cuda.synchronize(device)
    step_peak = torch.cuda.max_memory_allocated(device) - before
    runner.reset()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free  # weights, this process's CUDA context, and anyone else on the card
    budget = int(total * utilization) - in_use - step_peak - SLACK_BYTES
    blocks = budget // per_block
    log.info("KV cache sized from memory: %.1f GiB of %.1f GiB in use after the weights, a prefill of %d tokens "
             "at %d peaks at %.2f GiB: %d blocks of %.1f MiB fit in %.0f %% of the card", in_use / 2**30,
             total / 2**30, tokens, window, step_peak / 2**30, blocks, per_block / 2**20, utilization * 100)
    if blocks < 1:
        raise MemoryError(
            f"no KV cache block fits in gpu_memory_utilization = {utilization:g} of {total / 2**30:.1f} GiB: "
            f"{in_use / 2**30:.1f} GiB is in use after the weights and a prefill of {tokens} tokens needs "
            f"{step_peak / 2**30:.2f} GiB more; raise gpu_memory_utilization or lower max_model_len or "
            f"prefill_chunk_tokens")
    return int(blocks)
