"""One generation request as the engine sees it: tokens in, events out."""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from neurond.protocol import SamplingParams

if TYPE_CHECKING:
    from neurond.engine.choices import ChoiceGroup
    from neurond.engine.detok import StopStringDetokenizer

_seq_ids = itertools.count(1)

#: Retry-After (seconds) of the retriable errors a request gets: the pool repairs itself within seconds.
RETRY_AFTER_S = 2.0


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"


@dataclass(frozen=True, slots=True)
class LogprobEntry:
    """A generated token with its log-probability and its likeliest alternatives ((token id, logprob), best
    first), as the request asked (`SamplingParams.logprobs`)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class TextDelta:
    text: str
    #: The log-probabilities of the tokens this text completes (empty unless the request asked for them).
    logprobs: tuple[LogprobEntry, ...] = ()


@dataclass(slots=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class Failed:
    """The request ended in an error: `status` and `code` go into the OpenAI error JSON."""

    status: int
    code: str
    message: str
    retry_after_s: float | None = None


#: What a request streams to its API handler (distinct from observe.events.Event, the journal's vocabulary).
RequestEvent = TextDelta | Finished | Failed


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    queued_at: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    #: Steps this request was in when they faulted (it is quarantined at the engine's limit).
    faults: int = 0
    #: When a fault took the request's slot away (it is replayed after the repair, or fails past the bound).
    interrupted_at: float | None = None
    #: The engine's per-request state while it holds a KV cache slot, and across a replay.
    detok: StopStringDetokenizer | None = None
    slot: int | None = None
    prefilled: int = 0  # tokens of `context` already in the slot's cache
    #: The KV cache blocks the request holds while it has a slot, in position order: its slot's row of the
    #: block table (engine/blocks.py).
    blocks: list[int] = field(default_factory=list)
    #: Names of the context's first full blocks (engine/prefix.py), computed as far as needed so far (the
    #: context only grows, so they stay valid), and how many of `blocks` the scheduler published for sharing.
    hashes: list[bytes] = field(default_factory=list)
    published: int = 0
    decoding: bool = False
    #: Log-probabilities of generated tokens whose text the detokeniser still holds back.
    pending_logprobs: list[LogprobEntry] = field(default_factory=list)
    #: The other choices of the same API request (n > 1: engine/choices.py), or None.
    group: ChoiceGroup | None = None

    @property
    def context(self) -> list[int]:
        """What the slot's cache must hold before the next token: the prompt and what was generated so far
        (after a fault, a replay prefills all of it and the stream continues where it was)."""
        return self.prompt_ids + self.generated

    def emit(self, event: RequestEvent) -> None:
        self.events.put_nowait(event)
