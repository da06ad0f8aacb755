"""The rank's forward steps over its slot KV cache: prefill chunks and batched decode steps.

The model code is transformers' (decoder layers, attention projections, rotary embeddings); the runner owns
what a server needs around it: the static KV cache (`kv_cache.py`), the attention over it (`attention.py`),
positions per row, the sampler, and CUDA graphs of the decode step (`graphs.py`). One code path for 1..N ranks:
at TP>1 the row-wise layers all-reduce through their hooks (`tp.py`) and rank 0's sampled tokens are broadcast
so every rank feeds the same tokens next.

Device-side state per slot: `next_tok` (the last sampled token, the next decode input) and `seq_len` (tokens in
the cache = the next write position). Decode steps take them from there, so the leader sends only slot numbers.
Rows of a decode batch that are not active write to the trash column and their results are ignored.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from neurond.pool.protocol import SamplingParams
from neurond.worker import attention
from neurond.worker.kv_cache import SlotKVCache
from neurond.worker.sampler import sample

log = logging.getLogger("neurond.worker")

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def batch_bucket(n: int, max_batch: int) -> int:
    """Decode batches are padded to a power of two (the shapes CUDA graphs are captured for)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max_batch)


# Decode attention reads only the first `kv_len` positions of each row: the smallest power of two (at least
# this) that covers the longest sequence in the batch. Reading all of max_len instead doubles the step time of
# a full batch on a GPU (the whole cache is as large as the weights) and is 10x slower on a CPU.
MIN_KV_BUCKET = 256


def kv_bucket(longest: int, max_len: int) -> int:
    b = MIN_KV_BUCKET
    while b < longest:
        b *= 2
    return min(b, max_len)


class ModelRunner:
    def __init__(self, model, *, slots: int, max_len: int, device, guard, world_size: int,
                 use_graphs: bool = False, mid_forward: Callable[[], None] | None = None,
                 eager_only: Callable[[], bool] = lambda: False) -> None:
        import torch

        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise ValueError(f"model type {cfg.model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")
        self.model = model
        self.device = device
        self.guard = guard
        self.world_size = world_size
        self.slots = slots
        base = getattr(model, model.base_model_prefix)
        self.embed = base.embed_tokens
        self.layers = list(base.layers)
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.lm_head = model.get_output_embeddings()
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = (getattr(cfg, "num_key_value_heads", None) or heads) // world_size
        max_len = min(max_len, int(getattr(cfg, "max_position_embeddings", max_len) or max_len) + 1)
        dtype = next(model.parameters()).dtype
        _check_fits(device, 2 * len(self.layers) * slots * kv_heads * max_len * head_dim * dtype.itemsize, slots,
                    max_len)
        self.cache = SlotKVCache(len(self.layers), slots, max_len, kv_heads, head_dim, dtype, device)
        attention.register(model)
        # Device-side per-slot state, and static inputs of the decode step.
        self.next_tok = torch.zeros(slots, dtype=torch.long, device=device)
        self.seq_len = torch.zeros(slots, dtype=torch.long, device=device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self.row_idx = torch.arange(slots, device=device).view(slots, 1)
        self.key_idx = torch.arange(max_len, device=device)
        self.sampling: list[SamplingParams] = [SamplingParams()] * slots
        self.drawn = [0] * slots  # tokens each slot's sequence has drawn (the sampler's noise index)
        self.lengths = [0] * slots  # host copy of seq_len (picks the decode step's kv_len bucket)
        self._mid_forward = mid_forward
        self._eager_only = eager_only
        self.hooks_enabled = True
        if mid_forward is not None and len(self.layers) > 1:
            self.layers[len(self.layers) // 2].register_forward_pre_hook(self._mid_hook)
        self.graphs = None
        if use_graphs and device.type == "cuda":
            from neurond.worker.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def _mid_hook(self, module, args) -> None:
        if self.hooks_enabled:
            self._mid_forward()

    # ------------------------------------------------------------------ forward
    def forward(self, ids, positions, mask):
        """ids/positions [B, T], mask [B, 1, T, L] -> float32 logits of each row's last position [B, V]."""
        h = self.embed(ids)
        position_embeddings = self.rotary(h, positions)
        for layer in self.layers:
            out = layer(h, attention_mask=mask, position_ids=positions, past_key_values=self.cache, use_cache=True,
                        position_embeddings=position_embeddings)
            h = out[0] if isinstance(out, tuple) else out
        logits = self.lm_head(self.norm(h[:, -1]))
        if hasattr(logits, "full_tensor"):  # a DTensor when transformers' plan leaves logits sharded
            logits = logits.full_tensor()
        return logits.float()

    def decode_forward(self, batch: int, kv_len: int):
        """The decode step on rows [0, batch), attending to positions [0, kv_len), from the device-side state
        only (what a CUDA graph captures). Inactive rows write to the trash column, outside what is read."""
        import torch

        pos = torch.where(self.active[:batch], self.seq_len[:batch], self.cache.trash).view(batch, 1)
        mask = (self.key_idx[:kv_len].view(1, 1, 1, kv_len) <= pos.view(batch, 1, 1, 1))
        self.cache.bind(slice(0, batch), self.row_idx[:batch], pos, kv_len)
        return self.forward(self.next_tok[:batch].view(batch, 1), pos, mask)

    # ------------------------------------------------------------------ steps
    def prefill(self, slot: int, token_ids: tuple[int, ...], start: int, last: bool, sampling: SamplingParams,
                drawn: int) -> int | None:
        """Write one chunk of a sequence's tokens at positions [start, start + len) of its slot. On the last
        chunk, draw the sequence's next token (number `drawn`) and make the slot ready to decode."""
        import torch

        n = len(token_ids)
        end = start + n
        if not 0 <= slot < self.slots or n == 0 or end > self.cache.trash:
            raise ValueError(f"prefill of {n} tokens at {start} does not fit slot {slot} of {self.slots} x "
                             f"{self.cache.trash} positions")
        with torch.inference_mode():
            self.active[slot] = False
            ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
            positions = torch.arange(start, end, device=self.device).view(1, n)
            mask = (self.key_idx[:end].view(1, 1, 1, end) <= positions.view(1, 1, n, 1))
            self.cache.bind(slice(slot, slot + 1), self.row_idx[slot : slot + 1], positions, end)
            logits = self.forward(ids, positions, mask)
            if not last:
                return None
            self.sampling[slot] = sampling
            self.drawn[slot] = drawn
            tokens = self._draw(logits, [slot], torch.tensor([slot], device=self.device))
            self.seq_len[slot] = end
            self.lengths[slot] = end
            self.active[slot] = True
            return tokens[0]

    def decode(self, slots: tuple[int, ...]) -> list[int]:
        """One step for the sequences in `slots` (each feeds its last token). Returns their next tokens."""
        import torch

        if not slots:
            return []
        batch = batch_bucket(max(slots) + 1, self.slots)
        kv_len = kv_bucket(max(self.lengths[s] for s in slots) + 1, self.cache.max_len)
        with torch.inference_mode():
            active = torch.zeros(self.slots, dtype=torch.bool)
            active[list(slots)] = True
            self.active.copy_(active, non_blocking=False)
            if self.graphs is not None and not self._eager_only():
                with self.guard.region(self.world_size > 1):  # a rank waiting inside the graph waits on peers
                    logits = self.graphs.run(batch, kv_len)
            else:
                logits = self.decode_forward(batch, kv_len)
            index = torch.tensor(slots, device=self.device)
            tokens = self._draw(logits.index_select(0, index), list(slots), index)
            self.seq_len.index_add_(0, index, torch.ones(len(slots), dtype=torch.long, device=self.device))
            # Positions past the cache stay on the trash column (a pipelined step may outrun the leader).
            self.seq_len.clamp_(max=self.cache.trash)
            for s in slots:
                self.lengths[s] = min(self.lengths[s] + 1, self.cache.trash)
            return tokens

    def _draw(self, logits, slots: list[int], index) -> list[int]:
        """Sample each row (rank 0's choice is broadcast at TP>1), feed the tokens back, return them."""
        tokens = sample(logits, [self.sampling[s] for s in slots], [self.drawn[s] for s in slots])
        if self.world_size > 1:
            self.guard.broadcast(tokens, 0)
        self.next_tok.index_copy_(0, index, tokens)
        out = tokens.tolist()  # the step's one host sync
        for s in slots:
            self.drawn[s] += 1
        return out

    def reset(self) -> None:
        """After the communicator changed (its graphs hold the old one) or a failed step: nothing in flight."""
        self.active.zero_()
        if self.graphs is not None and self.world_size > 1:
            self.graphs.clear()

    def warm_up(self) -> float:
        """Capture the decode graphs now (at load), so the first requests do not pay for it."""
        t0 = time.monotonic()
        if self.graphs is not None:
            self.graphs.capture_all()
        return time.monotonic() - t0

    def info(self) -> dict:
        return {"slots": self.slots, "max_len": self.cache.trash, "kv_cache_bytes": self.cache.nbytes,
                "cuda_graphs": self.graphs is not None}


# Of the device memory left after the weights, what the KV cache may take; the rest is for prefill activations,
# CUDA graphs and the allocator's slack.
KV_CACHE_SHARE = 0.85


def _check_fits(device, nbytes: int, slots: int, max_len: int) -> None:
    """Refuse a KV cache that does not fit, with the numbers an operator needs (not a bare CUDA OOM later)."""
    if device.type != "cuda":
        return
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    if nbytes > KV_CACHE_SHARE * free:
        raise MemoryError(
            f"the KV cache for {slots} slots x {max_len - 1} tokens needs {nbytes / 2**30:.1f} GiB but "
            f"{KV_CACHE_SHARE * free / 2**30:.1f} GiB is usable after the weights: lower max_batch_size or "
            f"max_model_len")
