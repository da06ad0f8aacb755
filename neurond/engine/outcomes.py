"""What becomes of the requests the engine runs, and the count of it.

A token the ranks drew for a request is accepted here (`Outcomes.accept`): detokenised (the request's own
detokeniser, made when it is first admitted and kept across a replay), streamed with its log-probabilities, and
the request finished at its end-of-text token, a stop string or max_tokens. Every way a request leaves the
engine but shutting down ends here too: finished, cancelled (its client went away), failed (a fault, an engine
error, a repair that did not come within resume_wait_s). Each gives the request's slot and blocks back to the
scheduler and is counted: `stats` for the admin status and `neurond status`, and the metrics.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal, TypedDict

from neurond import protocol as p
from neurond.engine.detok import Decoder, StopStringDetokenizer
from neurond.engine.request import Failed, Finished, FinishReason, GenerationRequest, LogprobEntry, TextDelta
from neurond.engine.scheduler import Scheduler

if TYPE_CHECKING:
    from neurond.observe.metrics import MetricsSink

log = logging.getLogger("neurond.engine")


class EngineStats(TypedDict):
    """Engine.stats: request outcomes since start (for the admin status and `neurond status`)."""

    completed: int
    failed: int
    cancelled: int
    replayed: int
    quarantined: int
    repair_wait_expired: int
    preempted: int
    last_cancelled_tokens: int | None
    max_batch_seen: int


class Outcomes:
    """The requests' tokens and ends, for one engine: its scheduler (which frees what they held), its tokenizer
    and its metrics."""

    def __init__(self, scheduler: Scheduler, tokenizer: Decoder, metrics: MetricsSink | None = None) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.metrics = metrics
        #: Outcomes since start, for the admin status (and `neurond status`).
        #: (quarantined and repair_wait_expired are failed requests, counted in `failed` too.)
        self.stats: EngineStats = {"completed": 0, "failed": 0, "cancelled": 0, "replayed": 0, "quarantined": 0,
                                   "repair_wait_expired": 0, "preempted": 0, "last_cancelled_tokens": None,
                                   "max_batch_seen": 0}
        self._drawn = 0  # tokens accepted in the current step, not yet counted in the metrics

    def start(self, req: GenerationRequest) -> None:
        """A request was given a slot: it streams text through its own detokeniser (kept across a replay)."""
        if req.detok is None:
            req.detok = StopStringDetokenizer(self.tokenizer, req.stop)

    def accept(self, req: GenerationRequest, token: int, logprob: p.TokenLogprob | None = None) -> None:
        """A token drawn for `req`: stream it (with its log-probabilities, if asked for), and finish the request
        if it is done."""
        if req.cancelled:
            self.cancel(req)
            return
        if token in req.stop_token_ids:
            self._finish(req, FinishReason.STOP)
            return
        req.generated.append(token)
        self._drawn += 1
        if logprob is not None:
            req.pending_logprobs.append(LogprobEntry(token, logprob.logprob, logprob.top))
        detok = req.detok
        assert detok is not None  # made when the request was admitted
        text = detok.add(token)
        if text:
            req.emit(TextDelta(text, _take_logprobs(req)))
        if detok.stopped:
            self._finish(req, FinishReason.STOP)
        elif len(req.generated) >= req.max_tokens:
            self._finish(req, FinishReason.LENGTH)

    def count_drawn(self) -> None:
        """The tokens accepted since the last count, to the metrics (once per call: `accept` runs per token)."""
        if self._drawn and self.metrics is not None:
            self.metrics.generated(self._drawn)
        self._drawn = 0

    def _finish(self, req: GenerationRequest, reason: FinishReason) -> None:
        self.scheduler.release(req)
        assert req.detok is not None  # made when the request was admitted
        tail = req.detok.flush()
        if tail or req.pending_logprobs:
            req.emit(TextDelta(tail, _take_logprobs(req)))
        self._outcome("completed")
        req.emit(Finished(reason, len(req.prompt_ids), len(req.generated)))

    def cancel(self, req: GenerationRequest) -> None:
        """The client went away: free the slot, count it."""
        self.scheduler.release(req)
        self.stats["last_cancelled_tokens"] = len(req.generated)
        self._outcome("cancelled")

    def fail(self, req: GenerationRequest, failed: Failed, *, wait_expired: bool = False) -> None:
        """`req` ends with the error `failed` (`wait_expired`: it waited for a repair for as long as it may).
        One failed by a rank's fault is journaled by the engine, which blamed it."""
        self.scheduler.forget(req)
        if wait_expired:
            # Its own count: how often repairs outlast resume_wait_s is what tunes that setting.
            self._outcome("repair_wait_expired")
        self.stats["failed"] += 1
        if self.metrics is not None:
            self.metrics.request_done("failed")
        req.emit(failed)

    def preempted(self, n: int) -> None:
        """`n` requests gave their slot back for the KV cache's blocks, to be replayed."""
        if n:
            self.stats["preempted"] += n
            log.info("KV cache full: %d request(s) preempted, to be replayed (%d of %d blocks in use)", n,
                     self.scheduler.pool.used, self.scheduler.pool.num_blocks)
            if self.metrics is not None:
                self.metrics.preempted(n)

    def _outcome(self, outcome: Literal["completed", "cancelled", "repair_wait_expired"]) -> None:
        self.stats[outcome] += 1
        if self.metrics is not None:
            self.metrics.request_done(outcome)


def _take_logprobs(req: GenerationRequest) -> tuple[LogprobEntry, ...]:
    """The log-probabilities of the text about to be streamed: those its detokeniser held back so far."""
    taken = tuple(req.pending_logprobs)
    req.pending_logprobs.clear()
    return taken
