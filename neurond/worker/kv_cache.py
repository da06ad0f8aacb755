"""The rank's KV cache: a static block of `slots` sequences x `max_len` positions per layer, allocated once.

Static, because fixed shapes are what CUDA graphs replay and because memory known up front is admission
control: a request the cache has a slot and room for cannot run the rank out of memory later. A sequence
lives in one slot (row) from its prefill to its end; the leader hands out slots. The last position of every
row is a trash column: rows that are in a batch but not active write there (see ModelRunner).

transformers' attention modules call `update(key, value, layer_idx, ...)` on whatever object is passed as
`past_key_values`; that is all this class offers them. Where to write and what to return are set by the runner
before each forward with `bind`.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, dtype, device) -> None:
        shape = (slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots = slots
        self.max_len = max_len
        self.trash = max_len - 1
        self._rows = slice(0, 0)
        self._write_rows = None
        self._write_pos = None
        self._kv_len = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bind(self, rows: slice, write_rows, write_pos, kv_len: int) -> None:
        """For the next forward: the batch is cache rows `rows`; token t of batch row b is written at
        (write_rows[b, 0], write_pos[b, t]); attention reads the first `kv_len` positions of each row."""
        self._rows = rows
        self._write_rows = write_rows
        self._write_pos = write_pos
        self._kv_len = kv_len

    def update(self, key, value, layer_idx: int, *args, **kwargs):
        """transformers' Cache interface. key/value: [batch, kv_heads, tokens, head_dim]."""
        return self.write(layer_idx, key.transpose(1, 2), value.transpose(1, 2))

    def write(self, layer_idx: int, key, value):
        """key/value [batch, tokens, kv_heads, head_dim] into the bound positions; returns the bound rows' first
        kv_len positions as [batch, kv_heads, kv_len, head_dim] views. Index tensors, not Python ints:
        graph-capturable."""
        k, v = self.k[layer_idx], self.v[layer_idx]
        k[self._write_rows, :, self._write_pos] = key
        v[self._write_rows, :, self._write_pos] = value
        return k[self._rows, :, : self._kv_len], v[self._rows, :, : self._kv_len]
