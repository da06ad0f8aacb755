"""Which KV cache a rank's runner gets, and how large: `kv_cache_blocks` = 0 the static cache (every slot its
whole window), N a paged pool of N blocks, -1 (`KV_BLOCKS_FROM_MEMORY`) a pool of as many blocks as fit.

Decided once, before anything is allocated, from the model's config and the runner's settings: the cache's
geometry (layers x this rank's KV heads x head dim, the window capped at the model's own context + the trash
position) and, for a cache whose size is known, the fit check (`kv_budget.check_fits`), which refuses it with
the numbers instead of a CUDA out-of-memory later. Sizing from memory needs the rest of the runner built (its
own layers' fused weights in place) and able to run a prefill, so the runner is built on a one-block
placeholder (`first`) and then measures one prefill on it (`measured`: `kv_budget.blocks_that_fit`). On a CPU
nothing is measured: -1 is the static cache's memory as paged blocks (`kv_budget.static_blocks`). The caches
themselves: `kv_cache.py`.
"""

from __future__ import annotations

from neurond.protocol import KV_BLOCKS_FROM_MEMORY
from neurond.worker import kv_budget
from neurond.worker.kv_cache import PagedKVCache, SlotKVCache


class KVCachePlan:
    def __init__(self, config, *, layers: int, dtype, world_size: int, slots: int, max_len: int, device,
                 block_size: int, blocks: int, in_place: bool | None, utilization: float) -> None:
        heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads  # the layers' too
        self.kv_heads = (getattr(config, "num_key_value_heads", None) or heads) // world_size  # this rank's
        self.max_len = min(max_len, int(getattr(config, "max_position_embeddings", max_len) or max_len) + 1)
        self.layers, self.slots, self.dtype, self.device = layers, slots, dtype, device
        self.block_size, self.in_place, self.utilization = block_size, in_place, utilization
        if blocks == KV_BLOCKS_FROM_MEMORY and device.type != "cuda":
            blocks = kv_budget.static_blocks(slots, self.max_len, block_size)
        self.blocks = blocks
        #: Sized from memory once everything else of the runner is built (`measured`).
        self.from_memory = blocks == KV_BLOCKS_FROM_MEMORY
        self.per_position = kv_budget.block_bytes(layers, 1, self.kv_heads, self.head_dim, dtype)
        if not self.from_memory:
            positions = (blocks + 1) * block_size if blocks else slots * self.max_len
            kv_budget.check_fits(device, positions * self.per_position,
                                 f"{blocks} blocks" if blocks else f"{slots} slots x {self.max_len - 1} tokens",
                                 utilization)

    def make(self, blocks: int) -> SlotKVCache | PagedKVCache:
        """The static cache for 0 blocks, else a paged pool of `blocks` (plus its trash block)."""
        if not blocks:
            return SlotKVCache(self.layers, self.slots, self.max_len, self.kv_heads, self.head_dim, self.dtype,
                               self.device)
        return PagedKVCache(self.layers, self.slots, self.max_len, self.kv_heads, self.head_dim, self.dtype,
                            self.device, self.block_size, blocks, self.in_place)

    def first(self) -> SlotKVCache | PagedKVCache:
        """The cache the runner is built with: the planned one, or where it is sized from memory a one-block
        paged placeholder (every read and write of the measuring prefill lands in its trash block)."""
        return self.make(1 if self.from_memory else self.blocks)

    def measured(self, runner, prefill_chunk_tokens: int) -> SlotKVCache | PagedKVCache:
        """Where sized from memory: the cache of as many blocks as fit beside what a prefill of `prefill_chunk_tokens`
        needs, measured on `runner` (built, and holding `first`'s placeholder until this one replaces it)."""
        return self.make(kv_budget.blocks_that_fit(runner, self.utilization, prefill_chunk_tokens,
                                                   self.per_position * self.block_size))
