"""The scheduler: which requests hold KV cache slots, and what each turn of the engine runs.

Pure and synchronous (nano-vllm's schedule): no I/O, no awaits, no rank calls. The engine (`engine.py`) asks
for a turn's work (prefix copies, one prefill batch, the decode batches), runs it on the ranks and reports
back by updating the requests. Requests wait in a queue and take the lowest free slot (keeping the decode batch,
rows 0..highest slot, small); a long prompt is prefilled in chunks of at most `prefill_chunk_tokens` tokens a turn,
so it never stalls the others for more than a chunk. A request that was in a faulted step before runs alone
(its prefill and its decode), so a fault that follows it is its own and nobody else takes a strike for it.

The KV cache is counted in blocks (`blocks.py`): a request is admitted only when the blocks for its context and
its first decode step can be had too, and a decode call first takes the blocks for every position it writes.
When the pool runs short there, the requests admitted last are preempted: they give back their slot and blocks
and go back to the front of the queue, to be replayed later like a request interrupted by a fault (the client
sees a slower stream, nothing else). With a paged cache on the ranks (`kv_cache_blocks` N > 0, or -1, the default:
sized by the ranks from their memory at the first load, `resize`) the rows of the block table that changed wait
in `_rows` until the engine sends them with its next command (`take_rows`). With the static slot cache
(`kv_cache_blocks` = 0) the count is of the same memory (every slot its context_len) and can never run short, so nothing
waits for blocks or is preempted, and no rows are sent.

Prefix caching (paged cache only): a request's full blocks are shared with later requests whose context starts
with the same tokens (`prefix.py` names a block by a hash chain over everything up to its end). A block is
published for sharing once it is full and written: every one of its positions holds a context token the ranks
have written, i.e. it lies within the first `prefilled` positions of a prefilling request, or the first
len(context) - 1 of a decoding one (the last drawn token is written by the next step), and before the slot's
trash position (`context_len`, where idle rows write). Requests publish when they are released and, for those still
running, before every admission. A new request (not one of n choices: those keep the copy of `copies`) takes
the longest run of published blocks its context starts with, but never all of its context: at least its last
token is prefilled (the rank draws the next token from its logits), so at most len(context) - 1 tokens, rounded
down to whole blocks. Its row starts with the shared blocks and `prefilled` with their positions; it never
writes into them (its writes are all past them), and nor does anyone else (a block is published only once its
owner is past it). A block nobody holds stays cached until `take` evicts it (`blocks.py`). After a fault
(`interrupt`) the whole cache is forgotten.

The n choices of one API request (a ChoiceGroup, `choices.py`) share their prompt but for its last token: one
member prefills it, and it is copied into the others' slots (`copies`, static cache) or they take its blocks
(`share_choices`, paged).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from neurond.engine.blocks import BlockPool, default_blocks
from neurond.engine.choices import ChoiceGroup, group_choices, groups
from neurond.engine.prefix import chain
from neurond.engine.request import GenerationRequest
from neurond.protocol import BlockRow


class Scheduler:
    """The settings keep their configuration's names, but `context_len` (the served context window: Engine)."""

    def __init__(self, *, max_batch_size: int, prefill_chunk_tokens: int, context_len: int = 2048,
                 kv_cache_blocks: int = 0, kv_block_size: int = 16) -> None:
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.context_len = context_len  # tokens per sequence at most (a slot's positions, but for its trash column)
        # kv_cache_blocks -1 (sized by the ranks from their memory): the static cache's count until `resize` says.
        self.pool = BlockPool(kv_cache_blocks if kv_cache_blocks > 0
                              else default_blocks(max_batch_size, context_len, kv_block_size), kv_block_size)
        self.paged = kv_cache_blocks != 0  # the ranks keep block tables (else their static slots need no rows)
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.running: list[GenerationRequest] = []  # holding a slot, in admission order
        self._rows: dict[int, BlockRow] = {}  # by slot: rows of the block table the ranks have not seen yet
        self.preemptions = 0  # requests preempted since start (the engine counts them out)
        # Context tokens of admitted requests (replays included) found in the prefix cache / to be prefilled,
        # since start (the engine counts them out); a choice of n counts when it shares blocks or starts its
        # prefill.
        self.prefix_hits = 0
        self.prefix_misses = 0

    # ------------------------------------------------------------------ blocks
    def resize(self, num_blocks: int) -> None:
        """The ranks' caches hold `num_blocks` blocks (measured at their first load): before anything holds one."""
        if num_blocks != self.pool.num_blocks:
            assert self.pool.used == 0, "the block pool is resized only before any request holds a block"
            self.pool = BlockPool(num_blocks, self.pool.block_size)

    def limit(self, req: GenerationRequest) -> int:
        """The most positions `req`'s sequence ever fills: its prompt and max_tokens, within a slot's
        context_len + 1 (a position past that goes to the trash on the ranks). Every need below is capped by it,
        so a request whose limit fits the pool (`never_fits`) never waits for blocks that cannot be had."""
        return min(len(req.prompt_ids) + req.max_tokens, self.context_len + 1)

    def never_fits(self, req: GenerationRequest) -> str | None:
        """Why `req` could never be given the blocks it may need, even with the whole pool free; None if it
        can."""
        tokens = len(req.prompt_ids) + req.max_tokens
        need = self.pool.blocks_for(self.limit(req))
        if need <= self.pool.num_blocks:
            return None
        size = self.pool.block_size
        return (f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) = {tokens} tokens need "
                f"{need} KV cache blocks of {size} positions; the KV cache has {self.pool.num_blocks} blocks "
                f"({self.pool.num_blocks * size} positions)")

    def _grow(self, req: GenerationRequest, positions: int) -> bool:
        """`req` holds the blocks for its first `positions` positions (capped by its limit), taking the missing
        ones; False (and nothing taken) if the pool has too few. Its row's new columns wait to be sent."""
        missing = self.pool.blocks_for(min(positions, self.limit(req))) - len(req.blocks)
        if missing <= 0:
            return True
        new = self.pool.take(missing)
        if new is None:
            return False
        assert req.slot is not None
        pending = self._rows.get(req.slot)
        if pending is not None:  # not sent yet: the new columns join it
            self._rows[req.slot] = BlockRow(req.slot, pending.start, pending.blocks + tuple(new))
        else:
            self._rows[req.slot] = BlockRow(req.slot, len(req.blocks), tuple(new))
        req.blocks.extend(new)
        return True

    def _publish(self, req: GenerationRequest) -> None:
        """`req`'s blocks that are full and written are named for others to share (the module docstring)."""
        if not self.paged:
            return
        written = len(req.context) - 1 if req.decoding else req.prefilled
        full = min(min(written, self.context_len) // self.pool.block_size, len(req.blocks))
        if full <= req.published:
            return
        chain(req.context, self.pool.block_size, req.hashes, full)
        for i in range(req.published, full):
            self.pool.publish(req.blocks[i], req.hashes[i])
        req.published = full

    def _cached_prefix(self, req: GenerationRequest) -> list[int]:
        """The published blocks `req`'s context starts with, at most len(context) - 1 tokens of it."""
        if not self.paged or req.group is not None:
            return []
        context = req.context
        full = (len(context) - 1) // self.pool.block_size
        if full <= 0:
            return []
        return self.pool.match(chain(context, self.pool.block_size, req.hashes, full))

    def _count(self, req: GenerationRequest) -> None:
        """`req`'s context tokens found cached (its `prefilled` so far) and to be prefilled (the rest)."""
        self.prefix_hits += req.prefilled
        self.prefix_misses += len(req.context) - req.prefilled

    def drop_prefix_cache(self) -> None:
        """Forget every cached block (the ranks' caches may not hold them any more)."""
        self.pool.drop_cached()

    def take_rows(self) -> tuple[BlockRow, ...]:
        """The rows of the block table that changed since the last call, for the engine's next command (the
        ranks apply them before they run it)."""
        rows = tuple(self._rows[s] for s in sorted(self._rows)) if self.paged else ()
        self._rows.clear()
        return rows

    def reserve_decode(self, batch: list[GenerationRequest], steps: int) -> list[GenerationRequest]:
        """Before `steps` decode steps of `batch`: each of its requests (oldest first) takes the blocks for
        every position they write. A decoding request's cache holds its context but for the last drawn token,
        which the first step writes: the steps write positions len(context) - 1 .. len(context) - 2 + steps.
        Where the pool runs short, the request admitted last is preempted (`preempt`), until the blocks can be
        had or the request itself was the one preempted. Returns the members of `batch` still holding a slot."""
        for req in batch:
            if req.slot is None:  # preempted for an older member
                continue
            while not self._grow(req, len(req.context) - 1 + steps):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is req:
                    break
        return [r for r in batch if r.slot is not None]

    def preempt(self, req: GenerationRequest) -> None:
        """`req` gives back its slot and blocks for others to grow into, and goes to the front of the queue: it
        is replayed (prompt + tokens so far) when it is admitted again, as after a fault."""
        self.release(req)
        req.prefilled = 0
        self.waiting.appendleft(req)
        self.preemptions += 1

    # ------------------------------------------------------------------ turns

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def queue(self, reqs: list[GenerationRequest]) -> None:
        """Queue the requests of one API request. Several with the same prompt (its n choices) form a
        ChoiceGroup: their prompt, but for its last token, is prefilled once and copied."""
        group_choices(reqs)
        self.waiting.extend(reqs)

    def admit(self, start: Callable[[GenerationRequest], None]) -> None:
        """Give free slots to waiting requests, oldest first, while the blocks for their context and their
        first decode step can be had too (the oldest waits for them, and nobody overtakes it); `start(req)`
        for each one admitted. Its row of the block table is sent whole (start 0), the blocks it shares from
        the prefix cache first (with `prefilled` past them)."""
        used = {r.slot for r in self.running}
        free = [s for s in range(self.max_batch_size) if s not in used]
        if free and self.waiting:
            for running in self.running:
                self._publish(running)
        while free and self.waiting:
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                continue
            shared = self._cached_prefix(req)
            self.pool.share(shared)  # first: taking the rest must not evict them
            new = self.pool.take(self.pool.blocks_for(min(len(req.context) + 1, self.limit(req))) - len(shared))
            if new is None:
                self.pool.give(shared)
                break
            self.waiting.popleft()
            req.slot = free.pop(0)  # the lowest free slot keeps the decode batch (rows 0..max slot) small
            req.blocks = shared + new
            req.published = len(shared)
            self._rows[req.slot] = BlockRow(req.slot, 0, tuple(req.blocks))
            req.prefilled = len(shared) * self.pool.block_size
            if self.paged and req.group is None:  # n choices are counted when they share or start prefilling
                self._count(req)
            req.decoding = False
            req.interrupted_at = None
            start(req)
            self.running.append(req)

    def share_choices(self) -> int:
        """Paged: members of a group whose shared prompt is in a member's blocks, holding a slot with nothing
        prefilled yet, take that member's whole blocks of it (in place of as many of their own) and count as
        prefilled up to them. Before the turn's prefill batch. Returns the blocks shared."""
        if not self.paged:
            return 0
        shared = 0
        for group in groups(self.running):
            for req, blocks in group.shares(self.running, self.pool.block_size):
                assert req.slot is not None
                whole = len(blocks)
                self.pool.share(blocks)  # first: the source's blocks stay held whatever `give` frees
                self.pool.give(req.blocks[:whole])
                req.blocks[:whole] = blocks
                self._rows[req.slot] = BlockRow(req.slot, 0, tuple(req.blocks))
                req.prefilled = whole * self.pool.block_size
                self._count(req)
                shared += whole
        return shared

    def copies(self) -> list[tuple[ChoiceGroup, GenerationRequest, list[GenerationRequest]]]:
        """The static cache: for each group whose shared prompt is in a member's slot, the members holding a
        slot with nothing prefilled yet, to copy it to. Paged there are none (`share_choices`)."""
        if self.paged:
            return []
        copies = ((group, group.copy(self.running)) for group in groups(self.running))
        return [(group, *copy) for group, copy in copies if copy is not None]

    def prefill_batch(self) -> list[tuple[GenerationRequest, int]]:
        """The next chunk of each prefilling request, oldest first, up to prefill_chunk_tokens in all (at least
        one chunk). A request that was in a faulted step before is prefilled alone."""
        batch: list[tuple[GenerationRequest, int]] = []
        budget = self.prefill_chunk_tokens
        longest = 0  # the batch's longest row end so far
        for req in self.running:
            if req.decoding:
                continue
            target = len(req.context)
            group = req.group
            if group is not None and req.prefilled < group.shared:
                # A choice of n: one member prefills the shared prompt; the others get it copied (copies()), or,
                # paged, share its whole blocks (share_choices()) and prefill the rest themselves.
                end = group.prefill_end(req, self.paged)
                if end is None:
                    continue
                target = end
            if batch and (req.faults or batch[0][0].faults):
                break
            n = min(target - req.prefilled, budget)
            if n <= 0:
                break
            # Every row of a prefill call reads up to the longest row's end: rows x that end positions of keys
            # and values, per layer (gathered into one copy with a paged cache). At most one context window's
            # worth, which is the step the ranks measure when they size their cache from memory
            # (worker/kv_budget.py); the first row always goes.
            longest = max(longest, req.prefilled + n)
            if batch and (len(batch) + 1) * longest > self.context_len:
                break
            if group is not None and self.paged and req.prefilled == 0:
                self._count(req)  # a choice of n that shared nothing (the prefiller, or a prompt under a block)
            batch.append((req, n))
            budget -= n
        return batch

    def decode_batches(self) -> list[list[GenerationRequest]]:
        """The decoding requests in batches: those never in a faulted step together, each struck one alone."""
        decoding = [r for r in self.running if r.decoding]
        batches = [[r for r in decoding if not r.faults]] + [[r] for r in decoding if r.faults]
        return [b for b in batches if b]

    def only_decoding(self) -> bool:
        """Nobody waits for a slot or a prefill (the engine then runs several decode steps per call)."""
        return not self.waiting and all(r.decoding for r in self.running)

    def release(self, req: GenerationRequest) -> None:
        """`req` gives its slot and its blocks back (finished, failed, cancelled, preempted). The slot's row is
        emptied on the ranks too, so nothing can write through it into blocks that are someone else's now."""
        if req in self.running:
            self.running.remove(req)
        if req.slot is not None:
            self._rows[req.slot] = BlockRow(req.slot, 0, ())
        if req.blocks:
            self._publish(req)  # what it wrote stays cached for later requests with the same prefix
            self.pool.give(req.blocks)
            req.blocks = []
        req.published = 0
        req.slot = None
        req.decoding = False

    def forget(self, req: GenerationRequest) -> None:
        """`req` leaves the scheduler, wherever it is."""
        self.release(req)
        if req in self.waiting:
            self.waiting.remove(req)

    def cancelled(self) -> list[GenerationRequest]:
        """Running requests whose client went away (the engine releases and counts them); waiting ones are
        dropped here."""
        if any(r.cancelled for r in self.waiting):
            self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
        return [r for r in self.running if r.cancelled]

    def interrupt(self, now: float) -> list[GenerationRequest]:
        """Everyone holding a slot loses it (a repair may replace ranks and their caches): they go back to the
        front of the queue, in their order, to be replayed (prompt + tokens so far) ahead of requests that were
        only queued. The prefix cache is dropped too (its blocks go back to the free list, their hashes
        forgotten): replaced ranks start with empty caches, and even ranks that were kept may hold half-written
        blocks of the failed step. Replays then prefill their whole context again."""
        interrupted = list(self.running)
        for req in interrupted:
            self.release(req)
            req.interrupted_at = now
            req.prefilled = 0
        self.drop_prefix_cache()
        self.waiting.extendleft(reversed(interrupted))
        # Ranks may be new processes, or may have missed the rows of the failed command: every row is sent
        # afresh (start 0), empty for a slot nobody holds.
        for slot in range(self.max_batch_size):
            self._rows.setdefault(slot, BlockRow(slot, 0, ()))
        return interrupted
