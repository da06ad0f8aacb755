"""Each slot's sampling state on a rank, and the draw that uses it.

A slot's sequence draws its tokens with its own parameters (`SamplingParams`, from its last prefill chunk), its
drawn count (the sampler's noise index: token i is drawn with noise hashed from (seed, i)), for penalties how
often it generated each token (one [slots, vocab] int32 tensor, made when a penalized sequence first needs it)
and, for constrained decoding, its grammar's matcher (`grammar.py`). A replay's last chunk brings the count and
the tokens generated before, so the counts and the matcher start where the original's were: the sampler
(`sampler.py`) is a pure function of the logits and this state, so every rank, and a replay, draws the same
token.

The runner (runner.py) holds one. It starts a slot at its sequence's last prefill chunk (`start`), draws a
step's rows from their logits (`sample`, which also makes each token its slot's next decode input, the runner's
`next_tok`), and after the step's host sync moves the grammars and drawn counts on and reads the
log-probabilities (`logprob_entries`). In a multi-step decode a constrained row's token is copied to the host as
soon as it is drawn (`to_host`) and waited for only when the next step's mask needs it (`advance`).
"""

from __future__ import annotations

import torch

from neurond.protocol import SamplingParams, TokenLogprob
from neurond.worker.grammar import Constraints
from neurond.worker.sampler import adjust, logprobs_of, sample


class SlotSampling:
    def __init__(self, slots: int, device, next_tok: torch.Tensor, constraints: Constraints) -> None:
        self.slots = slots
        self.device = device
        self.next_tok = next_tok  # the runner's device-side next decode input per slot: a draw writes it
        self.params: list[SamplingParams] = [SamplingParams()] * slots
        self.drawn = [0] * slots  # tokens each slot's sequence has drawn (the sampler's noise index)
        # [slots, vocab] int32: how often each slot's sequence generated each token (penalties), made on first use
        self.counts: torch.Tensor | None = None
        # The grammars of constrained slots (the checkpoint's tokenizer.json gives their token strings).
        self.constraints = constraints

    def start(self, chunk, vocab: int) -> None:
        """A sequence's last prefill chunk (protocol.PrefillChunk): its slot draws from now on with the chunk's
        sampling parameters, from its drawn count, with the token counts and grammar state of what the
        sequence generated before (a replay) or of nothing."""
        self.params[chunk.slot] = chunk.sampling
        self.drawn[chunk.slot] = chunk.drawn
        self._start_counts(chunk, vocab)
        self.constraints.start(chunk.slot, chunk.sampling.grammar, chunk.history)

    def sample(self, logits, slots: list[int], index):
        """Draw row i's token with slot slots[i]'s sampling (index: the slots on the device) and make it the
        slot's next input. Returns the tokens on the device, and what `logprobs_of` gives for them where a
        row asked for log-probabilities (else None)."""
        params = [self.params[s] for s in slots]
        counts = None
        if any(sp.penalized for sp in params):
            assert self.counts is not None  # _start_counts made them for the penalized sequence
            counts = self.counts.index_select(0, index)
        allowed = self.constraints.allowed(slots, self.device) if any(s in self.constraints for s in slots) else None
        tokens = sample(adjust(logits, params, counts, allowed), params, [self.drawn[s] for s in slots])
        self.next_tok.index_copy_(0, index, tokens)
        if self.counts is not None:
            self.counts.index_put_((index, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        top = max(sp.logprobs for sp in params)
        return tokens, (logprobs_of(logits, tokens, top) if top >= 0 else None)

    def drew(self, slots: list[int], tokens: list[int], lp) -> list[TokenLogprob | None]:
        """After a prefill's host sync: the `slots` drew `tokens` (what `sample` gave, and `lp` with them): their
        grammars move on and their drawn counts grow. Returns their log-probability entries."""
        for slot, token in zip(slots, tokens, strict=True):
            self.constraints.advance(slot, token)
        entries = self.logprob_entries(slots, lp)
        for slot in slots:
            self.drawn[slot] += 1
        return entries

    def to_host(self, tokens):
        """Start copying `tokens` (on the device) to the host; `advance` waits for the copy alone (a plain
        read would wait for everything queued after it)."""
        if self.device.type != "cuda":
            return tokens, None
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    def advance(self, slots: list[int], tokens, done) -> None:
        """The constrained `slots` drew `tokens` (from `to_host`): their grammars move on."""
        if done is not None:
            done.synchronize()
        for slot, token in zip(slots, tokens.tolist(), strict=True):
            self.constraints.advance(slot, token)

    def _start_counts(self, chunk, vocab: int) -> None:
        """A sequence's last prefill chunk: its slot's token counts start from what it generated before (a
        replay), or from nothing."""
        if self.counts is None and not chunk.sampling.penalized:
            return
        if self.counts is None:
            self.counts = torch.zeros(self.slots, vocab, dtype=torch.int32, device=self.device)
        self.counts[chunk.slot].zero_()
        if chunk.history:
            ids = torch.tensor(chunk.history, device=self.device)
            self.counts[chunk.slot].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    def logprob_entries(self, slots: list[int], lp) -> list[TokenLogprob | None]:
        """`logprobs_of`'s tensors for rows `slots` as one entry per row (host values; after the call's sync)."""
        if lp is None:
            return [None] * len(slots)
        chosen, ids, values = (t.tolist() for t in lp)
        out: list[TokenLogprob | None] = []
        for i, s in enumerate(slots):
            k = self.params[s].logprobs
            out.append(None if k < 0 else TokenLogprob(chosen[i], tuple(zip(ids[i][:k], values[i][:k], strict=True))))
        return out
