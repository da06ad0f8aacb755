"""Constrained decoding on the rank: one llguidance matcher per constrained slot, and the tokens each allows next.

Every rank runs the same matchers over the same drawn tokens (the sampler makes every rank draw the same one),
so every rank masks its logits alike and nothing is broadcast. A matcher lives as long as its slot's sequence:
it starts at the sequence's last prefill chunk, from the tokens the sequence generated before (a replay after a
fault continues in the same grammar state), and consumes each token once the host has it.

llguidance (not xgrammar or outlines-core): it needs no torch, so the leader validates a schema with the same
library and the same version the ranks compile it with, and a mask costs tens of microseconds per token
(`scripts/bench-grammar`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from neurond.protocol import Grammar

if TYPE_CHECKING:
    from llguidance import LLExecutor, LLMatcher, LLTokenizer


class GrammarError(ValueError):
    """A grammar the rank cannot follow (the leader validated it, so this is a bug or a version skew)."""


class Constraints:
    """The matchers of a rank's constrained slots. `vocab`: the logits' width (the model's embedding rows; the
    tokenizer's ids beyond it never occur, rows beyond the tokenizer's are never allowed)."""

    def __init__(self, model_dir: str, vocab: int) -> None:
        self.model_dir = model_dir
        self.vocab = vocab
        self._matchers: dict[int, LLMatcher] = {}
        self._tokenizers: dict[tuple[int, ...], LLTokenizer] = {}
        self._executor: LLExecutor | None = None
        self._tokenizer_json: str | None = None

    def __contains__(self, slot: int) -> bool:
        """Whether the slot's sequence has a grammar."""
        return slot in self._matchers

    def start(self, slot: int, grammar: Grammar | None, history: tuple[int, ...] = ()) -> None:
        """The slot's new sequence follows `grammar` (or nothing), having generated `history` already."""
        self._matchers.pop(slot, None)
        if grammar is None:
            return
        from llguidance import LLMatcher

        matcher = LLMatcher(self._tokenizer(grammar.end_ids), grammar.text)
        if history and not matcher.is_error():
            matcher.consume_tokens(list(history))
        if matcher.is_error():
            raise GrammarError(f"grammar: {matcher.get_error()}")
        self._matchers[slot] = matcher

    def advance(self, slot: int, token: int) -> None:
        """The slot's sequence drew `token`. (Once the grammar is complete only its end tokens were allowed and
        the sequence is over: what a pipelined step draws after that is ignored, as the leader ignores it.)"""
        matcher = self._matchers.get(slot)
        if matcher is None or matcher.is_stopped():
            return
        if not matcher.consume_token(token):
            raise GrammarError(f"slot {slot}: token {token} breaks its grammar: {matcher.get_error()}")

    def allowed(self, slots: list[int], device) -> torch.Tensor:
        """[len(slots), vocab] bool on `device`: the tokens each slot's grammar allows next (all of them for a
        slot without one). The masks are computed on the host, in parallel over the rows."""
        from llguidance import LLExecutor

        words = (self.vocab + 31) // 32
        # Pinned on a GPU: the copy then queues behind the step's forward instead of waiting for it.
        bitmask = torch.full((len(slots), words), -1, dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
        rows = [(self._matchers[s], i) for i, s in enumerate(slots) if s in self._matchers]
        if rows:
            if self._executor is None:
                self._executor = LLExecutor()
            self._executor.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), words * 4, len(slots))
        bitmask = bitmask.to(device, non_blocking=True)
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        bits = (bitmask.view(len(slots), words, 1) >> shifts) & 1
        return bits.view(len(slots), words * 32)[:, : self.vocab].bool()

    def _tokenizer(self, end_ids: tuple[int, ...]) -> LLTokenizer:
        """llguidance's view of the checkpoint's tokenizer (tokenizer.json), ending sequences with `end_ids`;
        made once per distinct end set."""
        tokenizer = self._tokenizers.get(end_ids)
        if tokenizer is None:
            from llguidance import LLTokenizer

            if self._tokenizer_json is None:
                self._tokenizer_json = (Path(self.model_dir) / "tokenizer.json").read_text()
            tokenizer = LLTokenizer(self._tokenizer_json, n_vocab=self.vocab, eos_token=list(end_ids))
            self._tokenizers[end_ids] = tokenizer
        return tokenizer
