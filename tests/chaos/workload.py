"""What each soak request asks for: drawn from a seeded RNG, so a failing seed can be replayed.

Requests differ where the daemon's code paths differ: prompt length (prefill deadline per token), max_tokens
(1 = no decode step at all), greedy or seeded sampling, stop strings (the detokeniser's hold-back), streaming
or not, and streaming clients that hang up after a few chunks. Every prompt carries a unique marker word: the
daemon must never write prompt text to its logs or journal, so no marker may ever appear there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MODEL = "neurond-builtin"

_WORDS = ("the quick brown fox jumps over a lazy dog while tensor parallel ranks hold their shards and the "
          "leader streams tokens back to every patient client who asked a question about recovery").split()
# Short and common in the built-in model's random output, so some generations really end on a stop string.
_STOPS = ("e", "th", ".", "\n", " a")


@dataclass(frozen=True, slots=True)
class WorkloadShape:
    """The ranges requests are drawn from."""

    max_prompt_words: int = 60  # ~1.5 tokens a word: well inside the 2,048-token context
    max_tokens: int = 24
    stream_share: float = 0.5
    hang_up_share: float = 0.2  # of streaming requests: the client closes after a few chunks
    stop_share: float = 0.25


@dataclass(frozen=True, slots=True)
class RequestPlan:
    index: int
    marker: str  # unique word in the prompt; must never show up in the daemon's output
    prompt: str
    max_tokens: int
    stream: bool
    stop: tuple[str, ...]
    temperature: float
    seed: int | None
    include_usage: bool
    hang_up_after: int | None  # streaming only: content chunks read before the client closes the connection

    def body(self) -> dict:
        body = {"model": MODEL, "messages": [{"role": "user", "content": self.prompt}],
                "max_tokens": self.max_tokens, "temperature": self.temperature, "stream": self.stream}
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = list(self.stop)
        if self.stream and self.include_usage:
            body["stream_options"] = {"include_usage": True}
        return body


def draw(rng: random.Random, index: int, shape: WorkloadShape) -> RequestPlan:
    marker = f"qzx{index:05d}{rng.getrandbits(32):08x}"
    words = [rng.choice(_WORDS) for _ in range(rng.randint(1, shape.max_prompt_words))]
    words.insert(rng.randrange(len(words) + 1), marker)
    stream = rng.random() < shape.stream_share
    greedy = rng.random() < 0.5
    return RequestPlan(
        index=index,
        marker=marker,
        prompt=" ".join(words),
        max_tokens=rng.randint(1, shape.max_tokens),
        stream=stream,
        stop=tuple(rng.sample(_STOPS, rng.randint(1, 2))) if rng.random() < shape.stop_share else (),
        temperature=0.0 if greedy else round(rng.uniform(0.3, 1.2), 2),
        seed=None if greedy else rng.getrandbits(31),
        include_usage=rng.random() < 0.5,
        hang_up_after=rng.randint(1, 4) if stream and rng.random() < shape.hang_up_share else None,
    )
