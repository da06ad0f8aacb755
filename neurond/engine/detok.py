"""Incremental detokenisation with stop strings.

Text is released to the client only once it can no longer become part of a stop string, and never in the
middle of a multi-byte character (the tokenizer shows those as U+FFFD until the last byte arrives).
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    """What the detokeniser needs of a tokenizer (engine/tokenizer.py's ChatTokenizer)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class StopStringDetokenizer:
    def __init__(self, tokenizer: Decoder, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded text of all ids so far (up to a stop string once one is found)
        self.emitted = 0  # characters of self.text already released
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one generated token; return the text that may now be released (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for its next byte
        self.text = text
        if self.stop:
            # Search only where a new match can start: the released part never contains one.
            start = max(0, self.emitted - self._holdback)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._release(len(self.text))
        return self._release(len(self.text) - self._holdback if self.stop else len(self.text))

    def flush(self) -> str:
        """At the end of generation: release whatever was held back."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
