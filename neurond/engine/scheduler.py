"""The engine: takes validated requests, drives prefill and decode steps through the supervisor, streams
events back.

Requests are served one at a time for now (a queue in front of one engine task): simple, and correct for any
number of concurrent clients. No lock is held anywhere; every wait on the ranks has the step deadline, and a
request that cannot be served right now gets a clean 503 instead of queueing behind a broken pool.
"""

from __future__ import annotations

import asyncio
import logging
import time

from neurond.engine.deadline import StepDeadline
from neurond.engine.detok import StopStringDetokenizer
from neurond.engine.request import Failed, FinishReason, Finished, GenerationRequest, TextDelta
from neurond.observe.events import Event, emit
from neurond.pool import protocol as p
from neurond.pool.faults import PoolFault, PoolUnavailable

log = logging.getLogger("neurond.engine")

RETRY_AFTER_S = 2.0


class EngineBusy(Exception):
    """The queue is full."""


class Engine:
    def __init__(self, supervisor, tokenizer, *, deadline: StepDeadline, max_queued: int) -> None:
        self.supervisor = supervisor
        self.tokenizer = tokenizer
        self.deadline = deadline
        self._queue: asyncio.Queue[GenerationRequest] = asyncio.Queue(maxsize=max_queued)
        self._task: asyncio.Task | None = None
        self.current: GenerationRequest | None = None
        supervisor.on_unhealthy.append(self._on_unhealthy)

    # ------------------------------------------------------------------ public
    def submit(self, req: GenerationRequest) -> None:
        if not self.supervisor.serving:
            raise PoolUnavailable(None, f"model is {self.supervisor.state}")
        try:
            self._queue.put_nowait(req)
        except asyncio.QueueFull:
            raise EngineBusy(f"{self._queue.maxsize} requests are already waiting") from None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="neurond-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._fail_queued(503, "shutting_down", "the server is shutting down")

    # ------------------------------------------------------------------ loop
    async def _run(self) -> None:
        while True:
            req = await self._queue.get()
            if req.cancelled:
                continue
            self.current = req
            try:
                await self._generate(req)
            except PoolFault as fault:
                failed = _fault_event(fault)
                req.emit(failed)
                if not isinstance(fault, PoolUnavailable):
                    emit(self.supervisor.events, Event.REQUEST_FAILED, request_id=req.request_id, cause=fault.code,
                         rank=fault.rank, incident=self.supervisor.current_incident, status=failed.status,
                         prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.generated))
            except asyncio.CancelledError:
                req.emit(Failed(503, "shutting_down", "the server is shutting down", RETRY_AFTER_S))
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must fail one request, not the engine
                log.exception("request %s: engine error", req.request_id)
                req.emit(Failed(500, "internal_error", f"{type(exc).__name__}: {exc}"))
            finally:
                self.current = None

    async def _generate(self, req: GenerationRequest) -> None:
        sup = self.supervisor
        detok = StopStringDetokenizer(self.tokenizer, req.stop)
        n_prompt = len(req.prompt_ids)
        t0 = time.monotonic()
        replies = await sup.call(
            lambda cid: p.Prefill(cid, req.seq_id, tuple(req.prompt_ids), req.sampling),
            self.deadline.prefill(n_prompt),
            "prefill",
            req.request_id,
        )
        self.deadline.observe_prefill(time.monotonic() - t0, n_prompt)
        reason = FinishReason.LENGTH
        try:
            while True:
                token = replies[0].token_id
                if token in req.stop_token_ids:
                    reason = FinishReason.STOP
                    break
                req.generated.append(token)
                text = detok.add(token)
                if text:
                    req.emit(TextDelta(text))
                if detok.stopped:
                    reason = FinishReason.STOP
                    break
                if len(req.generated) >= req.max_tokens or req.cancelled:
                    break
                t0 = time.monotonic()
                replies = await sup.call(
                    lambda cid: p.Decode(cid, req.seq_id, token), self.deadline.decode(), "decode", req.request_id
                )
                self.deadline.observe_decode(time.monotonic() - t0)
        finally:
            if sup.serving:
                try:
                    await sup.call(lambda cid: p.Release(cid, req.seq_id), self.deadline.decode(), "release")
                except PoolFault:
                    pass  # reported by the supervisor; the request's own outcome stands
        tail = detok.flush()
        if tail:
            req.emit(TextDelta(tail))
        req.emit(Finished(reason, n_prompt, len(req.generated)))

    # ------------------------------------------------------------------ faults
    def _on_unhealthy(self, fault) -> None:
        """The pool went unhealthy: waiting requests get a retriable 503 now instead of waiting for it."""
        self._fail_queued(503, "model_unavailable", f"model is recovering from a fault ({fault.cause})")

    def _fail_queued(self, status: int, code: str, message: str) -> None:
        while True:
            try:
                req = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            req.emit(Failed(status, code, message, RETRY_AFTER_S))


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
