"""The step deadline: how long to wait for one step before calling a rank wedged.

A fixed timeout is wrong both ways: 120 s leaves clients hanging for minutes, and anything short fails a big
prefill on a slow box. The deadline follows what the pool has actually been doing:

    deadline = clamp(factor x slowest recent step, floor, ceiling)

per step kind, and for prefill per prompt token (a 4,000-token prompt gets ~4,000 times a token's time).
Before any step has been observed (first request after a (re)load) the ceiling applies.
"""

from __future__ import annotations

from collections import deque


class StepDeadline:
    def __init__(self, floor_s: float, ceiling_s: float, factor: float, window: int = 64) -> None:
        self.floor_s = floor_s
        self.ceiling_s = ceiling_s
        self.factor = factor
        self._decode: deque[float] = deque(maxlen=window)
        self._prefill_per_token: deque[float] = deque(maxlen=window)

    def _clamp(self, seconds: float) -> float:
        return min(self.ceiling_s, max(self.floor_s, seconds))

    def decode(self, steps: int = 1) -> float:
        """For a call of `steps` decode steps: the floor and ceiling bound the call, not each step (a wedge
        is still detected at the floor)."""
        if not self._decode:
            return self.ceiling_s
        return self._clamp(self.factor * max(self._decode) * steps)

    def prefill(self, tokens: int) -> float:
        if not self._prefill_per_token:
            return self.ceiling_s
        return self._clamp(self.factor * max(self._prefill_per_token) * max(1, tokens))

    def observe_decode(self, seconds: float) -> None:
        self._decode.append(seconds)

    def observe_prefill(self, seconds: float, tokens: int) -> None:
        self._prefill_per_token.append(seconds / max(1, tokens))

    def reset(self) -> None:
        """After a reload the new processes may be slower or faster (cold caches): start over."""
        self._decode.clear()
        self._prefill_per_token.clear()
