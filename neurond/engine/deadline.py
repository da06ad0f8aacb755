"""The step deadline: how long to wait for one step before calling a rank wedged.

A fixed timeout is wrong both ways: 120 s leaves clients hanging for minutes, and anything short fails a big
prefill on a slow box. The deadline follows what the pool has actually been doing, per step kind:

    deadline = clamp(factor x expected time of this step, floor, ceiling)

Decode: the expected time of a step is the 90th percentile of the recent ones (the slowest while fewer than
ten were seen). Not the slowest: a call that captured a CUDA graph on first use of a shape takes ~6x a replay,
and with the slowest of the window deciding, a wedge after a repair was found at 5.7 s instead of 4.5 s
(8B, TP=2, H100; benchmarks.md).

Prefill: each recent prefill of n tokens in s seconds says "at most s x max(1, tokens / n)" for a prefill of
`tokens` (time grows with the prompt; a step also has a fixed cost, so scaling a short one up over-estimates);
the smallest of those is the expected time. Not a per-token rate times the prompt: a 1-token prefill of 40 ms
made a 20-token prompt's deadline 16 s, and a wedge in it was found that late.

Before any step has been observed (first request after a (re)load) the ceiling applies.
"""

from __future__ import annotations

import math
from collections import deque

# Which recent decode step decides the decode deadline (the rest are outliers: first-use graph captures).
DECODE_QUANTILE = 0.9


class StepDeadline:
    """`floor_s`, `ceiling_s` and `factor` are the settings step_deadline_floor_s, step_deadline_ceiling_s and
    step_deadline_factor, named here without the prefix this class stands for."""

    def __init__(self, floor_s: float, ceiling_s: float, factor: float, window: int = 64) -> None:
        self.floor_s = floor_s
        self.ceiling_s = ceiling_s
        self.factor = factor
        self._decode: deque[float] = deque(maxlen=window)
        self._prefill: deque[tuple[float, int]] = deque(maxlen=window)  # (seconds, tokens)

    def _clamp(self, seconds: float) -> float:
        return min(self.ceiling_s, max(self.floor_s, seconds))

    def decode(self, steps: int = 1) -> float:
        """For a call of `steps` decode steps: the floor and ceiling bound the call, not each step (a wedge
        is still detected at the floor)."""
        if not self._decode:
            return self.ceiling_s
        ordered = sorted(self._decode)
        step = ordered[math.ceil(DECODE_QUANTILE * len(ordered)) - 1]
        return self._clamp(self.factor * step * steps)

    def prefill(self, tokens: int) -> float:
        if not self._prefill:
            return self.ceiling_s
        expected = min(seconds * max(1.0, tokens / seen) for seconds, seen in self._prefill)
        return self._clamp(self.factor * expected)

    def observe_decode(self, seconds: float) -> None:
        """`seconds` per step of a decode call."""
        self._decode.append(seconds)

    def observe_prefill(self, seconds: float, tokens: int) -> None:
        self._prefill.append((seconds, max(1, tokens)))

    def reset(self) -> None:
        """After a reload the new processes may be slower or faster (cold caches): start over."""
        self._decode.clear()
        self._prefill.clear()
