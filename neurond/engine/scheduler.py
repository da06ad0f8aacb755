"""The engine: continuous batching of generation requests over the rank pool's KV cache slots.

Requests wait in a bounded queue, take a free slot, are prefilled in chunks and then decoded together: each
loop turn runs at most one prefill step (chunks of the oldest requests still prefilling, up to
prefill_chunk tokens in all) and one decode step for every request that is decoding, so a long prompt never
stalls the others for more than a chunk, and a burst of short prompts is prefilled together. Requests join and
leave the batch at step boundaries, each with its own sampling parameters, stop strings and max_tokens.

Faults (policy in docs/recovery.md): when a step fails, the request(s) in that step may have caused it.
- A rank *reported an error* (exception, out of memory, CUDA error) for a step that held exactly one request:
  that request is the cause; it fails at once with the error.
- Otherwise (a death, a timeout, an error in a batch) every request in the step gets a strike; one that reaches
  `max_request_faults` strikes is quarantined (fails, never retried; the journal entry names it).
- Every other request that held a slot is replayed after the repair: its prompt plus the tokens generated so
  far are prefilled again and its stream continues. Requests wait for the repair at most `resume_wait_s` from
  the fault (or from when they were queued), then get a retriable 503.
Nothing here waits without a bound: every call to the ranks has the step deadline.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import time
from typing import Literal, TypedDict

from neurond import protocol as p
from neurond.engine.deadline import StepDeadline
from neurond.engine.detok import StopStringDetokenizer
from neurond.engine.request import (
    ChoiceGroup,
    Failed,
    Finished,
    FinishReason,
    GenerationRequest,
    LogprobEntry,
    TextDelta,
)
from neurond.lifecycle import LifecycleState
from neurond.observe.events import Event, emit
from neurond.pool.faults import PoolFault, PoolUnavailable, RankFailed

log = logging.getLogger("neurond.engine")

RETRY_AFTER_S = 2.0

# Faults a rank reports about the step itself (as opposed to deaths and timeouts, which say nothing about
# which request caused them).
_RAISED = (p.FaultKind.EXCEPTION, p.FaultKind.OUT_OF_MEMORY, p.FaultKind.CUDA_ERROR)


class EngineBusy(Exception):
    """The queue is full."""


class EngineStats(TypedDict):
    """Engine.stats: request outcomes since start (for the admin status and `neurond status`)."""

    completed: int
    failed: int
    cancelled: int
    replayed: int
    quarantined: int
    repair_wait_expired: int
    last_cancelled_tokens: int | None
    max_batch_seen: int


def _slot(req: GenerationRequest) -> int:
    """The slot of a running request (it holds one from admission until it is released)."""
    assert req.slot is not None, f"request {req.request_id} holds no slot"
    return req.slot


class Engine:
    def __init__(self, supervisor, tokenizer, *, deadline: StepDeadline, max_queued: int, metrics=None,
                 resume_wait_s: float = 30.0, max_batch: int = 1, prefill_chunk: int = 512,
                 max_request_faults: int = 2, decode_steps: int = 1) -> None:
        self.supervisor = supervisor
        self.tokenizer = tokenizer
        self.deadline = deadline
        self.max_queued = max_queued
        self.metrics = metrics  # a MetricsSink, or None
        self.resume_wait_s = resume_wait_s
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_request_faults = max_request_faults
        self.decode_steps = decode_steps
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._running: list[GenerationRequest] = []  # holding a slot, in admission order
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        #: Outcomes since start, for the admin status (and `neurond status`).
        #: (quarantined and repair_wait_expired are failed requests, counted in `failed` too.)
        self.stats: EngineStats = {"completed": 0, "failed": 0, "cancelled": 0, "replayed": 0, "quarantined": 0,
                                   "repair_wait_expired": 0, "last_cancelled_tokens": None, "max_batch_seen": 0}

    # ------------------------------------------------------------------ public
    def submit(self, req: GenerationRequest) -> None:
        self.submit_all([req])

    def submit_all(self, reqs: list[GenerationRequest]) -> None:
        """Queue every request or none (the n choices of one API request). Several with the same prompt form
        a ChoiceGroup: their prompt is prefilled once."""
        if not self.supervisor.serving:
            raise PoolUnavailable(None, f"model is {self.supervisor.state}")
        if len(self._waiting) + len(reqs) > self.max_queued:
            raise EngineBusy(f"{len(self._waiting)} requests are already waiting")
        for req in reqs:
            if req.sampling.seed is None and not req.sampling.greedy:
                # Every rank, and a replay after a fault, must draw the same tokens: the seed is fixed here.
                req.sampling = dataclasses.replace(req.sampling, seed=random.getrandbits(63))
        shared = len(reqs[0].prompt_ids) - 1
        if len(reqs) > 1 and shared > 0 and all(r.prompt_ids == reqs[0].prompt_ids for r in reqs):
            group = ChoiceGroup(list(reqs), shared)
            for req in reqs:
                req.group = group
        self._waiting.extend(reqs)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="neurond-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for req in [*self._running, *self._waiting]:
            req.emit(Failed(503, "shutting_down", "the server is shutting down", RETRY_AFTER_S))
        self._running.clear()
        self._waiting.clear()

    # ------------------------------------------------------------------ loop
    async def _run(self) -> None:
        while True:
            self._drop_cancelled()
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self.supervisor.serving:
                await self._wait_for_repair()
                continue
            self._admit()
            try:
                await self._turn()
            except Exception as exc:  # noqa: BLE001 - a bug must fail the requests involved, not the engine
                log.exception("engine error")
                for req in list(self._running):
                    self._fail(req, Failed(500, "internal_error", f"{type(exc).__name__}: {exc}"))

    async def _turn(self) -> None:
        """One prefill step (if any request is prefilling) and one decode step (if any is decoding)."""
        for group, source, targets in self._copies():
            if not await self._step([source, *targets], self._copy(group, source, targets)):
                return
        prefilling = self._prefill_batch()
        if prefilling:
            if not await self._step([r for r, _ in prefilling], self._prefill(prefilling)):
                return
        # Requests that were in a faulted step before decode alone (like their prefill), so a fault that
        # follows one of them is its own and the clean batch takes no strike for it.
        decoding = [r for r in self._running if r.decoding]
        batches = [[r for r in decoding if not r.faults]] + [[r] for r in decoding if r.faults]
        for batch in batches:
            if batch and not await self._step(batch, self._decode(batch)):
                return

    async def _step(self, members: list[GenerationRequest], step) -> bool:
        try:
            await step
            return True
        except PoolFault as fault:
            self._on_fault(fault, members)
            return False

    def _admit(self) -> None:
        used = {r.slot for r in self._running}
        free = [s for s in range(self.max_batch) if s not in used]
        while free and self._waiting:
            req = self._waiting.popleft()
            if req.cancelled:
                continue
            req.slot = free.pop(0)  # the lowest free slot keeps the decode batch (rows 0..max slot) small
            req.prefilled = 0
            req.decoding = False
            req.interrupted_at = None
            if req.detok is None:
                req.detok = StopStringDetokenizer(self.tokenizer, req.stop)
            self._running.append(req)

    def _prefill_batch(self) -> list[tuple[GenerationRequest, int]]:
        """The next chunk of each prefilling request, oldest first, up to prefill_chunk tokens in all (at least
        one chunk). A request that was in a faulted step before is prefilled alone: if it faults again, the
        fault is its own and nobody else takes a strike for it."""
        batch: list[tuple[GenerationRequest, int]] = []
        budget = self.prefill_chunk
        for req in self._running:
            if req.decoding:
                continue
            target = len(req.context)
            group = req.group
            if group is not None and req.prefilled < group.shared:
                # A choice of n: one member prefills the shared prompt, the others get it copied (_copies).
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

    def _copies(self) -> list[tuple[ChoiceGroup, GenerationRequest, list[GenerationRequest]]]:
        """For each group whose shared prompt is in a member's slot: the members holding a slot with nothing
        prefilled yet, to copy it to."""
        out = []
        for group in {id(r.group): r.group for r in self._running if r.group is not None}.values():
            source = group.source()
            targets = [r for r in group.members if r in self._running and r.prefilled == 0 and r is not source]
            if source is not None and targets:
                out.append((group, source, targets))
        return out

    async def _copy(self, group: ChoiceGroup, source: GenerationRequest, targets: list[GenerationRequest]) -> None:
        dsts = tuple(_slot(r) for r in targets)
        await self.supervisor.call(lambda cid: p.CopyPrefix(cid, _slot(source), dsts, group.shared),
                                   self.deadline.prefill(1), "copy prefix", None)
        for req in targets:
            req.prefilled = group.shared

    async def _prefill(self, batch: list[tuple[GenerationRequest, int]]) -> None:
        chunks = []
        for req, n in batch:
            context = req.context
            start = req.prefilled
            last = start + n == len(context)
            history = tuple(req.generated) if last and req.sampling.needs_history else ()
            chunks.append(p.PrefillChunk(_slot(req), tuple(context[start : start + n]), start, last, req.sampling,
                                         len(req.generated), history))
        tokens = sum(n for _, n in batch)
        t0 = time.monotonic()
        replies = await self.supervisor.call(
            lambda cid: p.Prefill(cid, tuple(chunks)), self.deadline.prefill(tokens), "prefill",
            batch[0][0].request_id if len(batch) == 1 else None)
        took = time.monotonic() - t0
        self.deadline.observe_prefill(took, tokens)
        if self.metrics is not None:
            self.metrics.step("prefill", took)
        logprobs = replies[0].logprobs or (None,) * len(chunks)
        # The rank's tokens and logprobs are one per chunk; strict=False keeps zip's behaviour with a reply from
        # another process (a short one is not a ValueError here).
        for (req, n), chunk, token, logprob in zip(batch, chunks, replies[0].tokens, logprobs, strict=False):
            req.prefilled = chunk.start + n
            if chunk.last:
                req.decoding = True
                self._accept(req, token, logprob)

    async def _decode(self, batch: list[GenerationRequest]) -> None:
        """Decode steps for `batch`: several per call while nobody waits for a prefill (the round trip to the
        ranks is paid once per call), never more than the batch's smallest remaining max_tokens. Tokens a
        sequence draws after it finished (its end-of-text or stop string came earlier in the call) are
        dropped; its slot went one step further, which the cache's trash column absorbs."""
        slots = tuple(_slot(r) for r in batch)
        steps = 1
        if not self._waiting and all(r.decoding for r in self._running):
            steps = max(1, min(self.decode_steps, *(r.max_tokens - len(r.generated) for r in batch)))
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))
        t0 = time.monotonic()
        replies = await self.supervisor.call(lambda cid: p.Decode(cid, slots, steps),
                                             self.deadline.decode(steps), "decode",
                                             batch[0].request_id if len(batch) == 1 else None)
        took = (time.monotonic() - t0) / steps
        self.deadline.observe_decode(took)
        if self.metrics is not None:
            for _ in range(steps):
                self.metrics.step("decode", took)
        tokens = replies[0].tokens
        logprobs = replies[0].logprobs or (None,) * len(tokens)
        for step in range(steps):
            for i, req in enumerate(batch):
                if req.slot is not None:  # not finished earlier in this call (a finished request has none)
                    self._accept(req, tokens[step * len(batch) + i], logprobs[step * len(batch) + i])

    def _accept(self, req: GenerationRequest, token: int, logprob: p.TokenLogprob | None = None) -> None:
        """A token drawn for `req`: stream it (with its log-probabilities, if asked for), and finish the request
        if it is done."""
        if req.cancelled:
            self._cancel(req)
            return
        if token in req.stop_token_ids:
            self._finish(req, FinishReason.STOP)
            return
        req.generated.append(token)
        if logprob is not None:
            req.pending_logprobs.append(LogprobEntry(token, logprob.logprob, logprob.top))
        detok = req.detok
        assert detok is not None  # made when the request was admitted
        text = detok.add(token)
        if text:
            req.emit(TextDelta(text, self._take_logprobs(req)))
        if detok.stopped:
            self._finish(req, FinishReason.STOP)
        elif len(req.generated) >= req.max_tokens:
            self._finish(req, FinishReason.LENGTH)

    def _finish(self, req: GenerationRequest, reason: FinishReason) -> None:
        self._release(req)
        assert req.detok is not None  # made when the request was admitted
        tail = req.detok.flush()
        if tail or req.pending_logprobs:
            req.emit(TextDelta(tail, self._take_logprobs(req)))
        self._outcome("completed", len(req.generated))
        req.emit(Finished(reason, len(req.prompt_ids), len(req.generated)))

    @staticmethod
    def _take_logprobs(req: GenerationRequest) -> tuple[LogprobEntry, ...]:
        taken = tuple(req.pending_logprobs)
        req.pending_logprobs.clear()
        return taken

    def _release(self, req: GenerationRequest) -> None:
        if req in self._running:
            self._running.remove(req)
        req.slot = None
        req.decoding = False

    def _cancel(self, req: GenerationRequest) -> None:
        """The client went away: free the slot, count it."""
        self._release(req)
        self.stats["last_cancelled_tokens"] = len(req.generated)
        self._outcome("cancelled", len(req.generated))

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._running if r.cancelled]:
            self._cancel(req)
        if any(r.cancelled for r in self._waiting):
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)

    def _outcome(self, outcome: Literal["completed", "cancelled", "repair_wait_expired"], tokens: int) -> None:
        self.stats[outcome] += 1
        if self.metrics is not None:
            self.metrics.request_done(outcome, tokens)

    def _fail(self, req: GenerationRequest, failed: Failed, fault: PoolFault | None = None) -> None:
        self._release(req)
        if req in self._waiting:
            self._waiting.remove(req)
        self.stats["failed"] += 1
        if self.metrics is not None:
            self.metrics.request_done("failed", len(req.generated))
        req.emit(failed)
        if fault is not None and not isinstance(fault, PoolUnavailable):
            emit(self.supervisor.events, Event.REQUEST_FAILED, request_id=req.request_id, cause=failed.code,
                 rank=fault.rank, incident=self.supervisor.current_incident, status=failed.status,
                 prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.generated), faults=req.faults)

    # ------------------------------------------------------------------ faults
    def _on_fault(self, fault: PoolFault, members: list[GenerationRequest]) -> None:
        if isinstance(fault, PoolUnavailable):
            members = []  # the step never ran: nobody is implicated
        raised = isinstance(fault, RankFailed) and fault.kind in _RAISED
        if raised and len(members) == 1:
            self._fail(members[0], _fault_event(fault), fault)
        else:
            for req in members:
                req.faults += 1
                if req.faults >= self.max_request_faults:
                    self.stats["quarantined"] += 1
                    self._fail(req, Failed(
                        500, "request_quarantined",
                        f"this request was in {req.faults} steps that failed ({fault.code}); it is not retried "
                        f"again"), fault)
        self._interrupt_running()

    def _interrupt_running(self) -> None:
        """Everyone who still holds a slot loses it (the repair may replace ranks and their caches): they are
        replayed after the repair, first, in their order, ahead of requests that were only queued."""
        now = time.monotonic()
        interrupted = list(self._running)
        for req in interrupted:
            self._release(req)
            req.interrupted_at = now
            req.prefilled = 0
            self.stats["replayed"] += 1
        self._waiting.extendleft(reversed(interrupted))
        if interrupted:
            log.info("%d request(s) will be replayed after the repair", len(interrupted))

    async def _wait_for_repair(self) -> None:
        """Wait (bounded) until the pool serves again; fail the requests whose wait is over, or all of them if
        recovery gave up."""
        self._interrupt_running()  # a rank died between steps: the slots' caches may not survive the repair
        while not self.supervisor.serving:
            gone = self.supervisor.state in (LifecycleState.UNLOADED, LifecycleState.STOPPED)
            now = time.monotonic()
            for req in list(self._waiting):
                since = req.interrupted_at if req.interrupted_at is not None else req.queued_at
                if gone or now - since >= self.resume_wait_s:
                    self._waiting.remove(req)
                    if not gone:
                        # Its own count: how often repairs outlast resume_wait_s is what tunes that setting.
                        self._outcome("repair_wait_expired", 0)
                    self._fail(req, Failed(
                        503, "model_unavailable",
                        f"model is {self.supervisor.state}: not repaired within {self.resume_wait_s:.0f}s"
                        if not gone else f"model is {self.supervisor.state}", RETRY_AFTER_S))
            self._drop_cancelled()
            if not self._waiting and not self._running:
                return
            try:
                await asyncio.wait_for(self.supervisor.healthy.wait(), 0.25)
            except TimeoutError:
                pass


# The status a request gets when a rank fault ended it. All are retriable server errors: the pool repairs itself.
FAULT_STATUS = {
    "rank_failed": 500,
    "cuda_error": 500,
    "out_of_memory": 503,
    "rank_died": 503,
    "rank_timeout": 504,
    "model_unavailable": 503,
}


def _fault_event(fault: PoolFault) -> Failed:
    return Failed(FAULT_STATUS.get(fault.code, 500), fault.code, fault.message, RETRY_AFTER_S)
