"""The engine's test doubles: a scripted pool (`FakeSupervisor`) and a tokenizer (`Tokens`), no processes.

mypy checks this module (scripts/test) against the Protocols the engine depends on (`StepPool`, `Decoder`):
a fake that drifts from what the engine calls fails type-checking (`_conforms` below), not a test at run time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from neurond import protocol as p
from neurond.engine.detok import Decoder
from neurond.engine.step_pool import StepPool
from neurond.observe.events import EventSink, Observation


class Tokens:
    """Token i decodes to 't{i} '."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"t{i} " for i in ids)


def next_token(context: list[int]) -> int:
    return (sum(context) * 31 + len(context)) % 97 + 3  # a deterministic "model"; 0..2 never drawn


class Recorder(EventSink):
    """An event sink that keeps every observation it is given, in order (`seen`): the engine's, the supervisor's
    and the load progress tests' one."""

    def __init__(self) -> None:
        self.seen: list[Observation] = []

    def observe(self, o: Observation) -> None:
        self.seen.append(o)


class FakeSupervisor:
    """Serves Prefill/Decode from the tokens its KV cache holds; `faults` maps call number -> exception to raise
    there. A fault makes the pool unserving for a moment, as a real repair does, and wipes the caches.

    It keeps the block tables as a paged rank would (applying each command's rows first) and the token each
    cached position holds, block by block, so a request that shares another's blocks (the prefix cache) reads
    what that one wrote; the next token is drawn from the context read back from the cache. It checks that every
    position a command writes is in a block its slot holds and that no write lands in a block another slot's
    row holds too (a shared block is read-only), that every position read was written, and it writes the
    trash position (`trash`) of the idle rows of a decode batch, as a rank does."""

    def __init__(self, faults: dict[int, Exception] | None = None, block_size: int = 16, paged: bool = True,
                 trash: int = 64) -> None:
        self.faults = faults or {}
        self.paged = paged  # an engine with a paged cache: check its rows (the static cache gets none)
        self.calls: list[p.StepCommand] = []
        self.block_size = block_size
        self.trash = trash  # the engine's context_len: the last position of a slot, where idle rows write
        self.tables: dict[int, list[int]] = {}
        # block (or (slot, column) for the static cache) -> tokens
        self.kv: dict[int | tuple[int, int], list[int | None]] = {}
        self.lengths: dict[int, int] = {}  # slot -> positions written
        self.next: dict[int, int] = {}  # slot -> the last drawn token (the next decode step's input)
        self.shared_writes = 0  # writes into a block two rows hold (must stay 0)
        self.healthy = asyncio.Event()
        self.healthy.set()
        self.events = Recorder()
        self.current_incident: str | None = None
        self.state = "healthy"
        self.epoch = 0
        self.kv_blocks = 0  # as configured (a paged engine's count is its own), or measured: see test_engine.py

    @property
    def serving(self) -> bool:
        return self.state == "healthy"

    def context(self, slot: int, n: int) -> list[int]:
        """The tokens at positions [0, n) of `slot`, as its cache holds them (every one must be written)."""
        out = []
        for pos in range(n):
            token = self.kv.get(self._block(slot, pos), [None] * self.block_size)[pos % self.block_size]
            assert token is not None, (slot, pos, self.tables)
            out.append(token)
        return out

    async def call(self, make: Callable[[int], p.StepCommand], deadline_s: float, what: str,
                   request_id: str | None = None) -> dict[int, object]:
        cmd = make(len(self.calls) + 1)
        self.calls.append(cmd)
        await asyncio.sleep(0)
        fault = self.faults.get(len(self.calls))
        if fault is not None:
            self.state, self.current_incident = "poisoned", f"incident{len(self.calls)}"
            self.epoch += 1
            self.healthy.clear()
            self.tables.clear()  # new rank processes: tables and caches as at load
            self.kv.clear()
            self.lengths.clear()
            asyncio.get_running_loop().call_later(0.05, self._repaired)
            raise fault
        assert isinstance(cmd, p.Prefill | p.CopyPrefix | p.Decode), cmd  # the engine's commands
        self._apply(cmd.tables)
        if isinstance(cmd, p.Prefill):
            tokens = []
            for c in cmd.chunks:
                for i, token in enumerate(c.token_ids):
                    self._write(c.slot, c.start + i, token)
                end = c.start + len(c.token_ids)
                if c.last:
                    tokens.append(next_token(self.context(c.slot, end)))
                    self.lengths[c.slot], self.next[c.slot] = end, tokens[-1]
                else:
                    tokens.append(-1)
            return {0: p.Done(cmd.call_id, 0, tuple(tokens))}
        if isinstance(cmd, p.CopyPrefix):
            for dst in cmd.dsts:
                for pos, token in enumerate(self.context(cmd.src, cmd.length)):
                    self._write(dst, pos, token)
            return {0: p.Done(cmd.call_id, 0)}
        out = []
        for _ in range(cmd.steps):
            for slot in range(max(cmd.slots) + 1):  # the batch's rows: the idle ones write to the trash
                holds_trash = len(self.tables.get(slot, ())) * self.block_size > self.trash
                if slot not in cmd.slots and self.paged and holds_trash:
                    self._write(slot, self.trash, -1)
            for slot in cmd.slots:
                pos = min(self.lengths[slot], self.trash)  # the step writes its input, the last drawn token
                self._write(slot, pos, self.next[slot])
                self.lengths[slot] = min(pos + 1, self.trash)
                out.append(next_token(self.context(slot, pos + 1)))
                self.next[slot] = out[-1]
        return {0: p.Done(cmd.call_id, 0, tuple(out))}

    def _apply(self, rows: tuple[p.BlockRow, ...]) -> None:
        for row in rows:
            table = self.tables.setdefault(row.slot, [])
            if row.start == 0:
                table.clear()
            assert len(table) == row.start, (row, table)  # a grown row continues what the rank has
            table.extend(row.blocks)
            assert len(table) == len(set(table)), table  # a row never holds a block twice

    def _block(self, slot: int, pos: int) -> int | tuple[int, int]:
        return self.tables.get(slot, [])[pos // self.block_size] if self.paged else (slot, pos // self.block_size)

    def _write(self, slot: int, pos: int, token: int) -> None:
        """The command writes `token` at `slot`'s position `pos`: its row must hold the block, and no other row."""
        if self.paged:
            table = self.tables.get(slot, ())
            assert pos < len(table) * self.block_size, (slot, pos, self.tables)
            others = [s for s, t in self.tables.items() if s != slot and table[pos // self.block_size] in t]
            if others:
                self.shared_writes += 1
            assert not others, (slot, pos, others, self.tables)
        block = self.kv.setdefault(self._block(slot, pos), [None] * self.block_size)
        block[pos % self.block_size] = token

    def _repaired(self) -> None:
        self.state = "healthy"
        self.healthy.set()


# What mypy checks: the fakes are what the engine takes (a member missing or of another type fails here).
if TYPE_CHECKING:
    _pool: StepPool = FakeSupervisor()
    _decoder: Decoder = Tokens()
