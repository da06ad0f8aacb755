"""The rank's KV cache, allocated once at load, in one of two layouts fixed for the cache's life:

- `SlotKVCache` (`kv_cache_blocks = 0`): a static block of `slots` sequences x `max_len` positions per
  layer; a sequence lives in one slot (row) from its prefill to its end, and attention reads its row as a view.
- `PagedKVCache` (`kv_cache_blocks = N`): per layer a pool of N fixed-size blocks, and a block table that says which
  blocks hold each slot's sequence: position p of slot s lives in block `table[s, p // block_size]` at offset
  `p % block_size`. The leader owns the blocks (engine/blocks.py) and sends table rows with each step
  (protocol.BlockRow), so every rank's table is the same and a sequence holds the blocks it needs instead of a
  whole `max_len` row: more sequences fit the same memory. Columns no block was given point to a trash block,
  whose contents are never read unmasked. On CUDA attention reads the blocks in place, through
  worker/paged_attention.py's kernels (one for decode steps, one for prefill chunks): `write` returns a
  `PagedRead` that attention.attend hands to them (why a kernel for prefill too: paged_attention.py). On a
  CPU (or with `in_place=False`) a step reads a row's blocks gathered into one contiguous copy per layer
  (torch's own indexing: any device, capturable in CUDA graphs).

Fixed shapes either way, which is what CUDA graphs replay, and memory known up front. The last position of
every slot (`trash`) is where rows that are in a batch but not active write (see ModelRunner).

transformers' attention modules call `update(key, value, layer_idx, ...)` on whatever object is passed as
`past_key_values`; that is all these classes offer them. Where to write and what to return are set by the
runner before each forward with `bind`.
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

import torch

from neurond.protocol import BlockRow


class _BoundCache:
    """What both layouts share: per-layer tensors `k` and `v`, and the positions the next forward writes and
    reads, set by the runner with `bind` (transformers' layers reach `write` through `update`)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    def __init__(self, slots: int, max_len: int) -> None:
        self.slots = slots
        self.trash = max_len - 1
        self._rows: slice | torch.Tensor = slice(0, 0)
        self._write_rows = None
        self._write_pos: torch.Tensor | None = None
        self._kv_len = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bind(self, rows, write_rows, write_pos, kv_len: int) -> None:
        """For the next forward: the batch is cache rows `rows` (a slice or an index tensor); token t of batch
        row b is written at (write_rows[b, 0], write_pos[b, t]); attention reads the first `kv_len` positions
        of each row (`round_up`'s length)."""
        self._rows = rows
        self._write_rows = write_rows
        self._write_pos = write_pos
        self._kv_len = kv_len

    def update(self, key, value, layer_idx: int, *args, **kwargs):
        """transformers' Cache interface. key/value: [batch, kv_heads, tokens, head_dim]."""
        return self.write(layer_idx, key.transpose(1, 2), value.transpose(1, 2))

    def write(self, layer_idx: int, key, value):
        raise NotImplementedError


class SlotKVCache(_BoundCache):
    def __init__(self, layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, dtype, device) -> None:
        super().__init__(slots, max_len)
        shape = (slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.max_len = max_len
        self.blocks, self.block_size, self.paged, self.in_place = 0, 0, False, False

    def round_up(self, kv_len: int) -> int:
        return kv_len

    def apply(self, rows: tuple[BlockRow, ...]) -> None:
        if rows:
            raise ValueError("block table rows for the static KV cache (kv_cache_blocks = 0)")

    def write(self, layer_idx: int, key, value):
        """key/value [batch, tokens, kv_heads, head_dim] into the bound positions; returns the bound rows' first
        kv_len positions as [batch, kv_heads, kv_len, head_dim] views. Index tensors, not Python ints:
        graph-capturable."""
        k, v = self.k[layer_idx], self.v[layer_idx]
        k[self._write_rows, :, self._write_pos] = key
        v[self._write_rows, :, self._write_pos] = value
        return k[self._rows, :, : self._kv_len], v[self._rows, :, : self._kv_len]

    def copy(self, src: int, dsts: tuple[int, ...], length: int) -> None:
        """Positions [0, length) of slot `src` into slots `dsts`."""
        for k, v in zip(self.k, self.v, strict=True):
            for d in dsts:
                k[d, :, :length].copy_(k[src, :, :length])
                v[d, :, :length].copy_(v[src, :, :length])


class PagedRead(NamedTuple):
    """What a paged cache's `write` returns, for keys and values alike, when attention is to read the pool in
    place: the layer's pools, the batch's table rows, how many positions each row attends to, the decode
    kernel's split count (paged_attention.paged_decode) and, for a prefill step, each query token's position
    (the causal limit; paged_attention.paged_prefill)."""

    k_pool: torch.Tensor
    v_pool: torch.Tensor
    table: torch.Tensor
    lens: torch.Tensor
    splits: int
    positions: torch.Tensor | None

    def attend(self, query, scale: float):
        """query [B, Hq, T, D] -> [B, Hq, T, D]."""
        from neurond.worker.paged_attention import paged_decode, paged_prefill

        batch, heads, _, dim = query.shape
        if self.positions is not None:
            return paged_prefill(query, self.k_pool, self.v_pool, self.table, self.positions, self.lens, scale)
        out = paged_decode(query.view(batch, heads, dim), self.k_pool, self.v_pool, self.table, self.lens, scale,
                           self.splits)
        return out.view(batch, heads, 1, dim)


def in_place_available(device) -> bool:
    """Whether decode can read the pool in place: the kernel is Triton's, for CUDA devices."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


class PagedKVCache(_BoundCache):
    def __init__(self, layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, dtype, device,
                 block_size: int, blocks: int, in_place: bool | None = None) -> None:
        # A power of two up to the smallest decode read (graphs.MIN_KV_BUCKET): every read is whole blocks.
        if not (0 < block_size <= 256 and block_size & (block_size - 1) == 0) or blocks < 1:
            raise ValueError(f"need a block size that is a power of two up to 256 and blocks >= 1, not "
                             f"{block_size} and {blocks}")
        super().__init__(slots, max_len)
        self.block_size = block_size
        self.cols = -(-max_len // block_size)  # columns of the table: blocks that cover max_len positions
        self.paged = True
        self.blocks = blocks
        self.trash_block = self.blocks  # one block past the pool's: where unassigned columns point
        shape = (self.blocks + 1, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.table = torch.full((slots, self.cols), self.trash_block, dtype=torch.long, device=device)
        self.max_len = self.cols * block_size  # positions a read may cover (kv_len <= max_len)
        self.in_place = in_place_available(device) if in_place is None else in_place
        self._sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self._read: tuple | None = None  # PagedRead's fields after the pools, once per forward

    def bind(self, rows, write_rows, write_pos, kv_len: int) -> None:
        super().bind(rows, write_rows, write_pos, kv_len)
        self._read = None
        if not self.in_place:
            return
        # Made once per forward (tensor ops: captured with the decode graph), not once per layer. Tokens written
        # to the trash column (a decode batch's inactive rows, a prefill's padding) are nobody's: a row that has
        # only those reads one position, whose output nobody uses (not the whole window up to the trash column).
        from neurond.worker.paged_attention import splits_for

        real = torch.where(write_pos == self.trash, -1, write_pos)
        lens = torch.clamp(real.amax(1) + 1, min=1).to(torch.int32)
        if write_pos.shape[1] == 1:
            splits = splits_for(write_pos.shape[0], self.k[0].shape[2], kv_len, self._sms)
            self._read = (self.table[rows], lens, splits, None)
        else:
            self._read = (self.table[rows], lens, 1, write_pos)

    def round_up(self, kv_len: int) -> int:
        """Reads cover whole blocks: the length a read of `kv_len` positions covers."""
        return min(-(-kv_len // self.block_size) * self.block_size, self.max_len)

    def apply(self, rows: tuple[BlockRow, ...]) -> None:
        """The leader's table rows (before the step that uses them). Refused, before any changes, for blocks or
        columns out of range (a leader bug must not write into another sequence's blocks)."""
        for row in rows:
            end = row.start + len(row.blocks)
            if not 0 <= row.slot < self.slots or row.start < 0 or end > self.cols \
                    or any(not 0 <= b < self.blocks for b in row.blocks):
                raise ValueError(f"block row for slot {row.slot} at column {row.start}: {len(row.blocks)} blocks "
                                 f"do not fit {self.slots} slots x {self.cols} columns of {self.blocks} blocks")
        for row in rows:
            if row.start == 0:
                self.table[row.slot].fill_(self.trash_block)
            if row.blocks:
                end = row.start + len(row.blocks)
                self.table[row.slot, row.start:end] = torch.tensor(row.blocks, device=self.table.device)

    def write(self, layer_idx: int, key, value):
        """key/value [batch, tokens, kv_heads, head_dim] into the bound positions; returns the bound rows' first
        kv_len positions as [batch, kv_heads, kv_len, head_dim]. Index tensors, not Python ints:
        graph-capturable."""
        k, v = self.k[layer_idx], self.v[layer_idx]
        bs, pos = self.block_size, self._write_pos
        assert pos is not None  # bound
        block = self.table[self._write_rows, pos // bs]
        offset = pos % bs
        k[block, offset] = key
        v[block, offset] = value
        if self._read is not None:
            paged = PagedRead(k, v, *self._read)
            return paged, paged
        return self.read(k, self._rows, self._kv_len), self.read(v, self._rows, self._kv_len)

    def read(self, pool, rows, kv_len: int):
        """[batch, kv_heads, kv_len, head_dim] of `rows`' first kv_len positions (a copy)."""
        columns = self.table[rows, : kv_len // self.block_size]  # [batch, kv_len / block_size]
        gathered = pool[columns]  # [batch, columns, block_size, kv_heads, head_dim]: a copy
        return gathered.view(gathered.shape[0], kv_len, *pool.shape[2:]).transpose(1, 2)

    def copy(self, src: int, dsts: tuple[int, ...], length: int) -> None:
        """Positions [0, length) of slot `src` into slots `dsts` (their blocks must be in the table already)."""
        pos = torch.arange(length, device=self.table.device)
        col, offset = pos // self.block_size, pos % self.block_size
        src_blocks = self.table[src, col]
        for k, v in zip(self.k, self.v, strict=True):
            for d in dsts:
                dst_blocks = self.table[d, col]
                k[dst_blocks, offset] = k[src_blocks, offset]
                v[dst_blocks, offset] = v[src_blocks, offset]
