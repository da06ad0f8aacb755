"""The scheduler: which requests hold KV cache slots, and what each turn of the engine runs.

Pure and synchronous (nano-vllm's schedule): no I/O, no awaits, no rank calls. The engine (`engine.py`) asks
for a turn's work (prefix copies, one prefill batch, the decode batches), runs it on the ranks and reports
back by updating the requests. Requests wait in a queue and take the lowest free slot (keeping the decode batch,
rows 0..highest slot, small); a long prompt is prefilled in chunks of at most `prefill_chunk` tokens a turn,
so it never stalls the others for more than a chunk. A request that was in a faulted step before runs alone
(its prefill and its decode), so a fault that follows it is its own and nobody else takes a strike for it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from neurond.engine.request import ChoiceGroup, GenerationRequest


class Scheduler:
    def __init__(self, *, max_batch: int, prefill_chunk: int) -> None:
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.running: list[GenerationRequest] = []  # holding a slot, in admission order

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def queue(self, reqs: list[GenerationRequest]) -> None:
        """Queue the requests of one API request. Several with the same prompt (its n choices) form a
        ChoiceGroup: their prompt, but for its last token, is prefilled once and copied."""
        shared = len(reqs[0].prompt_ids) - 1
        if len(reqs) > 1 and shared > 0 and all(r.prompt_ids == reqs[0].prompt_ids for r in reqs):
            group = ChoiceGroup(list(reqs), shared)
            for req in reqs:
                req.group = group
        self.waiting.extend(reqs)

    def admit(self, start: Callable[[GenerationRequest], None]) -> None:
        """Give free slots to waiting requests, oldest first; `start(req)` for each one admitted."""
        used = {r.slot for r in self.running}
        free = [s for s in range(self.max_batch) if s not in used]
        while free and self.waiting:
            req = self.waiting.popleft()
            if req.cancelled:
                continue
            req.slot = free.pop(0)  # the lowest free slot keeps the decode batch (rows 0..max slot) small
            req.prefilled = 0
            req.decoding = False
            req.interrupted_at = None
            start(req)
            self.running.append(req)

    def copies(self) -> list[tuple[ChoiceGroup, GenerationRequest, list[GenerationRequest]]]:
        """For each group whose shared prompt is in a member's slot: the members holding a slot with nothing
        prefilled yet, to copy it to."""
        out = []
        for group in {id(r.group): r.group for r in self.running if r.group is not None}.values():
            source = group.source()
            targets = [r for r in group.members if r in self.running and r.prefilled == 0 and r is not source]
            if source is not None and targets:
                out.append((group, source, targets))
        return out

    def prefill_batch(self) -> list[tuple[GenerationRequest, int]]:
        """The next chunk of each prefilling request, oldest first, up to prefill_chunk tokens in all (at least
        one chunk). A request that was in a faulted step before is prefilled alone."""
        batch: list[tuple[GenerationRequest, int]] = []
        budget = self.prefill_chunk
        for req in self.running:
            if req.decoding:
                continue
            target = len(req.context)
            group = req.group
            if group is not None and req.prefilled < group.shared:
                # A choice of n: one member prefills the shared prompt, the others get it copied (copies()).
                if group.source() is not None:
                    continue
                if group.prefiller not in (None, req) and group.prefiller.slot is not None:
                    continue
                group.prefiller, target = req, group.shared
            if batch and (req.faults or batch[0][0].faults):
                break
            n = min(target - req.prefilled, budget)
            if n <= 0:
                break
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
        """`req` gives its slot back (finished, failed, cancelled)."""
        if req in self.running:
            self.running.remove(req)
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
        only queued."""
        interrupted = list(self.running)
        for req in interrupted:
            self.release(req)
            req.interrupted_at = now
            req.prefilled = 0
        self.waiting.extendleft(reversed(interrupted))
        return interrupted
