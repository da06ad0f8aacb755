"""Log-probabilities in the API's two shapes: chat's `logprobs.content` entries and the legacy completions'
parallel lists. The engine hands over LogprobEntry values (token ids and numbers); the text and bytes of each
token come from the served tokenizer here."""

from __future__ import annotations

from collections.abc import Iterable

from neurond.engine.request import LogprobEntry
from neurond.engine.tokenizer import ChatTokenizer


def chat(entries: Iterable[LogprobEntry], tokenizer: ChatTokenizer) -> dict:
    """`{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`."""
    def one(token_id: int, logprob: float) -> dict:
        raw = tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion(entries: Iterable[LogprobEntry], tokenizer: ChatTokenizer, offset: int) -> dict:
    """The legacy shape: `tokens`, `token_logprobs`, `top_logprobs` (one {token: logprob} per token) and
    `text_offset` (where each token's text starts in the choice's text, `offset` being the first's)."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for e in entries:
        text = tokenizer.token_text(e.token_id)
        tokens.append(text)
        logprobs.append(e.logprob)
        top: dict[str, float] = {}
        for t, lp in e.top:  # tokens that read the same (e.g. partial characters) keep the likeliest
            top.setdefault(tokenizer.token_text(t), lp)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
