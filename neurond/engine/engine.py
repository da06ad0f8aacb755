"""The engine: continuous batching of generation requests over the rank pool's KV cache slots.

One loop, readable top to bottom (`_run`): drop cancelled requests, wait (bounded) for a repair if the pool is
not serving, admit waiting requests to free slots, run one turn. A turn (`_turn`) is what the scheduler
(`scheduler.py`, pure) says: share (paged) or copy (static) the prompt of n choices, one prefill step, the
decode steps. Each step is one call to the ranks with the step deadline; its tokens go to their requests
(`outcomes.py`: detokenise, stream, stop; there every way a request ends is counted). A failed step is blamed
(`blame.py`: who fails), everyone else is replayed after the repair; requests wait for the repair at most
`resume_wait_s` from the fault (or from when they were queued), then get a retriable 503. Nothing here waits
without a bound.

The KV cache's blocks are the scheduler's to hand out; every command carries the rows of the block table that
changed since the last one (`Scheduler.take_rows`), so the ranks' tables always match what the scheduler gave.
With a paged cache, requests share the cached blocks of a common prefix (the scheduler's prefix cache): a fault
drops it (`Scheduler.interrupt`), and so does any time the pool stopped serving (`supervisor.epoch`), even
while nothing ran, and an engine error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, cast

from neurond import protocol as p
from neurond.engine.blame import blame
from neurond.engine.choices import ChoiceGroup
from neurond.engine.deadline import StepDeadline
from neurond.engine.detok import Decoder
from neurond.engine.outcomes import EngineStats, Outcomes
from neurond.engine.request import RETRY_AFTER_S, Failed, GenerationRequest
from neurond.engine.scheduler import Scheduler
from neurond.engine.step_pool import StepPool
from neurond.lifecycle import LifecycleState
from neurond.observe.events import Event, emit
from neurond.pool.faults import PoolFault, PoolUnavailable

if TYPE_CHECKING:
    from neurond.observe.metrics import MetricsSink

log = logging.getLogger("neurond.engine")


class EngineBusy(Exception):
    """The queue is full."""


class RequestTooLarge(ValueError):
    """A request could never run: the KV cache cannot hold its prompt + max_tokens even when it is empty."""


def _slot(req: GenerationRequest) -> int:
    """The slot of a running request (it holds one from admission until it is released)."""
    assert req.slot is not None, f"request {req.request_id} holds no slot"
    return req.slot


def _rank0(replies: dict[int, object]) -> p.Done:
    """Rank 0's reply to a generation step, which carries the drawn tokens: a `Done` (a rank's StepFailed is raised
    as a PoolFault by the pool, never returned)."""
    return cast(p.Done, replies[0])


class Engine:
    """The loop (the module's docstring), its calls to the ranks and what a fault does to the requests. The
    settings keep their configuration's names, but `context_len`: the served context window, resolved from the
    model and max_model_len (neurond/served_model.py), as the ranks' WorkerSpec calls it."""

    def __init__(self, supervisor: StepPool, tokenizer: Decoder, *, deadline: StepDeadline,
                 max_queued_requests: int, metrics: MetricsSink | None = None, resume_wait_s: float = 30.0,
                 max_batch_size: int = 1, prefill_chunk_tokens: int = 512, max_request_faults: int = 2,
                 decode_steps_per_call: int = 1, context_len: int = 2048, kv_cache_blocks: int = 0,
                 kv_block_size: int = 16) -> None:
        self.supervisor = supervisor
        self.deadline = deadline
        self.max_queued_requests = max_queued_requests
        self.metrics = metrics
        self.resume_wait_s = resume_wait_s
        self.max_request_faults = max_request_faults
        self.decode_steps_per_call = decode_steps_per_call
        self.scheduler = Scheduler(max_batch_size=max_batch_size, prefill_chunk_tokens=prefill_chunk_tokens,
                                   context_len=context_len, kv_cache_blocks=kv_cache_blocks,
                                   kv_block_size=kv_block_size)
        self.outcomes = Outcomes(self.scheduler, tokenizer, metrics)
        self._epoch = supervisor.epoch  # the supervisor's count of times it stopped serving, as last seen
        self._prefix_counted = (0, 0)  # the scheduler's prefix cache hits and misses, as last counted out
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        if metrics is not None:
            metrics.queued_requests.set_function(lambda: len(self.scheduler.waiting))

    # ------------------------------------------------------------------ public
    @property
    def stats(self) -> EngineStats:
        """Request outcomes since start (`Outcomes.stats`)."""
        return self.outcomes.stats

    @property
    def kv_positions(self) -> int:
        """The most tokens (prompt + completion) one sequence can have in the KV cache, with it all to itself."""
        self._sync_blocks()
        pool = self.scheduler.pool
        return pool.num_blocks * pool.block_size

    def submit(self, req: GenerationRequest) -> None:
        self.submit_all([req])

    def submit_all(self, reqs: list[GenerationRequest]) -> None:
        """Queue every request or none (the n choices of one API request). Several with the same prompt form
        a ChoiceGroup: their prompt is prefilled once."""
        if not self.supervisor.serving:
            raise PoolUnavailable(None, f"model is {self.supervisor.state}")
        self._sync_blocks()
        waiting = len(self.scheduler.waiting)
        if waiting + len(reqs) > self.max_queued_requests:
            raise EngineBusy(f"{waiting} requests are already waiting")
        for req in reqs:
            # Admission is oldest first: one that could never get its blocks would hold up everyone behind it.
            why = self.scheduler.never_fits(req)
            if why is not None:
                raise RequestTooLarge(why)
        for req in reqs:
            if req.sampling.seed is None and not req.sampling.greedy:
                # Every rank, and a replay after a fault, must draw the same tokens: the seed is fixed here.
                req.sampling = dataclasses.replace(req.sampling, seed=random.getrandbits(63))
        self.scheduler.queue(reqs)
        self._wake.set()

    def _sync_blocks(self) -> None:
        """With kv_cache_blocks = -1 the ranks' first load measured how many blocks fit (the supervisor has it
        before it serves): the block pool takes that size before the first request is admitted."""
        blocks = self.supervisor.kv_blocks
        if self.scheduler.paged and blocks > 0:
            self.scheduler.resize(blocks)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="neurond-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for req in [*self.scheduler.running, *self.scheduler.waiting]:
            req.emit(Failed(503, "shutting_down", "the server is shutting down", RETRY_AFTER_S))
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()

    # ------------------------------------------------------------------ loop
    async def _run(self) -> None:
        while True:
            self._drop_cancelled()
            if self.scheduler.idle:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self.supervisor.serving:
                await self._wait_for_repair()
                continue
            if self.supervisor.epoch != self._epoch:
                # The pool stopped serving since the last turn (a repair, a reload), maybe while nothing ran:
                # its ranks' caches may be new, so nothing cached from before may be shared.
                self._epoch = self.supervisor.epoch
                self.scheduler.drop_prefix_cache()
            try:  # admission and counting too: a bug anywhere in a turn fails its requests, never stalls the loop
                self.scheduler.admit(self.outcomes.start)
                self._count_prefix()
                await self._turn()
            except Exception as exc:  # a bug must fail the requests involved, not the engine
                log.exception("engine error")
                for req in list(self.scheduler.running):
                    self.outcomes.fail(req, Failed(500, "internal_error", f"{type(exc).__name__}: {exc}"))
                self.scheduler.drop_prefix_cache()  # what the failed step left in the cache is not known
            if self.metrics is not None:
                pool = self.scheduler.pool
                self.metrics.kv_blocks(pool.used, pool.num_blocks, pool.cached)

    async def _turn(self) -> None:
        """One prefill step (if any request is prefilling) and one decode step (if any is decoding)."""
        self.scheduler.share_choices()
        for group, source, targets in self.scheduler.copies():
            if not await self._step([source, *targets], self._copy(group, source, targets)):
                return
        prefilling = self.scheduler.prefill_batch()
        if prefilling and not await self._step([r for r, _ in prefilling], self._prefill(prefilling)):
            return
        for batch in self.scheduler.decode_batches():
            steps = self._decode_steps(batch)
            before = self.scheduler.preemptions
            # The blocks for every position the call writes are taken first, which may preempt the requests
            # admitted last (this batch's or a later one's): they are not in the call, nor blamed for it.
            batch = self.scheduler.reserve_decode(batch, steps)
            self.outcomes.preempted(self.scheduler.preemptions - before)
            if batch and not await self._step(batch, self._decode(batch, steps)):
                return

    async def _step(self, members: list[GenerationRequest], step: Awaitable[None]) -> bool:
        try:
            await step
            return True
        except PoolFault as fault:
            self._on_fault(fault, members)
            return False
        finally:
            self.outcomes.count_drawn()

    async def _copy(self, group: ChoiceGroup, source: GenerationRequest, targets: list[GenerationRequest]) -> None:
        dsts = tuple(_slot(r) for r in targets)
        rows = self.scheduler.take_rows()  # the targets' blocks were taken at their admission
        await self.supervisor.call(lambda cid: p.CopyPrefix(cid, _slot(source), dsts, group.shared, rows),
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
        rows = self.scheduler.take_rows()
        t0 = time.monotonic()
        replies = await self.supervisor.call(
            lambda cid: p.Prefill(cid, tuple(chunks), rows), self.deadline.prefill(tokens), "prefill",
            batch[0][0].request_id if len(batch) == 1 else None)
        took = time.monotonic() - t0
        self.deadline.observe_prefill(took, tokens)
        if self.metrics is not None:
            self.metrics.step("prefill", took)
        done = _rank0(replies)
        logprobs = done.logprobs or (None,) * len(chunks)
        # The rank's tokens and logprobs are one per chunk; strict=False keeps zip's behaviour with a reply from
        # another process (a short one is not a ValueError here).
        for (req, n), chunk, token, logprob in zip(batch, chunks, done.tokens, logprobs, strict=False):
            req.prefilled = chunk.start + n
            if chunk.last:
                req.decoding = True
                self.outcomes.accept(req, token, logprob)

    def _decode_steps(self, batch: list[GenerationRequest]) -> int:
        """Several decode steps per call while nobody waits for a prefill (the round trip to the ranks is paid
        once per call), never more than the batch's smallest remaining max_tokens."""
        if not self.scheduler.only_decoding():
            return 1
        return max(1, min(self.decode_steps_per_call, *(r.max_tokens - len(r.generated) for r in batch)))

    async def _decode(self, batch: list[GenerationRequest], steps: int) -> None:
        """`steps` decode steps for `batch`, whose blocks are reserved. Tokens a sequence draws after it
        finished (its end-of-text or stop string came earlier in the call) are dropped; its slot went one step
        further, into positions it holds blocks for (or the trash)."""
        slots = tuple(_slot(r) for r in batch)
        rows = self.scheduler.take_rows()
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))
        t0 = time.monotonic()
        replies = await self.supervisor.call(lambda cid: p.Decode(cid, slots, steps, rows),
                                             self.deadline.decode(steps), "decode",
                                             batch[0].request_id if len(batch) == 1 else None)
        took = (time.monotonic() - t0) / steps
        self.deadline.observe_decode(took)
        if self.metrics is not None:
            for _ in range(steps):
                self.metrics.step("decode", took)
        done = _rank0(replies)
        tokens = done.tokens
        logprobs = done.logprobs or (None,) * len(tokens)
        for step in range(steps):
            for i, req in enumerate(batch):
                if req.slot is not None:  # not finished earlier in this call (a finished request has none)
                    self.outcomes.accept(req, tokens[step * len(batch) + i], logprobs[step * len(batch) + i])

    def _count_prefix(self) -> None:
        """Context tokens the last admissions found in the prefix cache, and those they prefill, to the metrics."""
        now = (self.scheduler.prefix_hits, self.scheduler.prefix_misses)
        if now != self._prefix_counted and self.metrics is not None:
            self.metrics.prefix_tokens(now[0] - self._prefix_counted[0], now[1] - self._prefix_counted[1])
        self._prefix_counted = now

    def _drop_cancelled(self) -> None:
        for req in self.scheduler.cancelled():
            self.outcomes.cancel(req)

    # ------------------------------------------------------------------ faults
    def _on_fault(self, fault: PoolFault, members: list[GenerationRequest]) -> None:
        """The requests `blame` fails get their error and a journal entry (none for a step that never ran,
        PoolUnavailable); everyone else holding a slot is replayed after the repair."""
        for req, failed, quarantined in blame(fault, members, self.max_request_faults):
            self.stats["quarantined"] += quarantined
            self.outcomes.fail(req, failed)
            emit(self.supervisor.events, Event.REQUEST_FAILED, request_id=req.request_id, cause=failed.code,
                 rank=fault.rank, incident=self.supervisor.current_incident, status=failed.status,
                 prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.generated), faults=req.faults)
        self._interrupt_running()

    def _interrupt_running(self) -> None:
        interrupted = self.scheduler.interrupt(time.monotonic())
        self.stats["replayed"] += len(interrupted)
        if interrupted:
            log.info("%d request(s) will be replayed after the repair", len(interrupted))

    async def _wait_for_repair(self) -> None:
        """Wait (bounded) until the pool serves again; fail the requests whose wait is over, or all of them if
        recovery gave up."""
        self._interrupt_running()  # a rank died between steps: the slots' caches may not survive the repair
        while not self.supervisor.serving:
            gone = self.supervisor.state in (LifecycleState.UNLOADED, LifecycleState.STOPPED)
            now = time.monotonic()
            for req in list(self.scheduler.waiting):
                since = req.interrupted_at if req.interrupted_at is not None else req.queued_at
                if gone or now - since >= self.resume_wait_s:
                    self.outcomes.fail(req, Failed(
                        503, "model_unavailable",
                        f"model is {self.supervisor.state}: not repaired within {self.resume_wait_s:.0f}s"
                        if not gone else f"model is {self.supervisor.state}", RETRY_AFTER_S), wait_expired=not gone)
            self._drop_cancelled()
            if self.scheduler.idle:
                return
            try:
                await asyncio.wait_for(self.supervisor.healthy.wait(), 0.25)
            except TimeoutError:
                pass
