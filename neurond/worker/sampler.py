"""Sampling for a batch of rows, each with its own temperature, top_p and seed, with no generator state.

Token i of a sequence is drawn with noise that is a pure function of (the sequence's seed, i, vocabulary
index): a replayed request (prompt + tokens so far, after a fault) draws exactly what it would have drawn, and
every rank computes the same token from the same logits. Gumbel-max: argmax(logits / T + g), g = -log(-log u)
with u uniform from a splitmix64 hash, all rows at once.
"""

from __future__ import annotations

import torch

from neurond.protocol import MIN_TEMPERATURE, SamplingParams

_MASK63 = (1 << 63) - 1


def _hash(x):
    """splitmix64 finalizer on int64 tensors (wrapping arithmetic), result in [0, 2^63)."""
    x = x ^ torch.bitwise_right_shift(x, 30) & 0x3FFFFFFFF
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as int64
    x = x ^ torch.bitwise_right_shift(x, 27) & 0x1FFFFFFFFF
    x = x * -7723592293110705685  # 0x94d049bb133111eb as int64
    x = x ^ torch.bitwise_right_shift(x, 31) & 0x1FFFFFFFF
    return x & _MASK63


def adjust(logits, params: list[SamplingParams], counts=None, allowed=None):
    """logits [N, V] float32 with each row's logit_bias added and penalties applied (counts [N, V]: how often
    the row's sequence generated each token so far; needed only when a row has penalties), then every token
    `allowed` [N, V] bool excludes (a grammar's mask) made impossible. A new tensor where anything changes,
    `logits` itself where nothing does."""
    biased = [i for i, sp in enumerate(params) if sp.logit_bias]
    penalized = [i for i, sp in enumerate(params) if sp.penalized]
    if not biased and not penalized:
        return logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
    out = logits.clone()
    device = logits.device
    if biased:
        rows = torch.tensor([i for i in biased for _ in params[i].logit_bias], device=device)
        ids = torch.tensor([t for i in biased for t, _ in params[i].logit_bias], device=device)
        values = torch.tensor([b for i in biased for _, b in params[i].logit_bias], dtype=out.dtype, device=device)
        out.index_put_((rows, ids), values, accumulate=True)
    if penalized:
        pick = torch.tensor(penalized, device=device)
        seen = counts.index_select(0, pick).to(out.dtype)
        presence = torch.tensor([params[i].presence_penalty for i in penalized], dtype=out.dtype, device=device)
        frequency = torch.tensor([params[i].frequency_penalty for i in penalized], dtype=out.dtype, device=device)
        penalty = presence[:, None] * (seen > 0).to(out.dtype) + frequency[:, None] * seen
        out.index_copy_(0, pick, out.index_select(0, pick) - penalty)
    if allowed is not None:
        out.masked_fill_(~allowed, float("-inf"))
    return out


def logprobs_of(logits, tokens, top: int):
    """The model's log-probabilities (logits [N, V] before any adjustment) of the drawn `tokens` [N], and of
    each row's `top` likeliest tokens: (chosen [N], top ids [N, top], top log-probabilities [N, top])."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens.view(-1, 1)).view(-1)
    if top <= 0:
        empty = torch.empty(logits.shape[0], 0, device=logits.device)
        return chosen, empty.long(), empty
    values, ids = torch.topk(logp, top, dim=-1)
    return chosen, ids, values


def sample(logits, params: list[SamplingParams], indices: list[int]):
    """logits [N, V] float32 on the device (adjusted: `adjust`); params[i] and indices[i] (tokens the row's
    sequence has drawn before) per row. Returns the chosen token ids as an int64 tensor [N] on the device (no
    host sync)."""
    tokens = torch.argmax(logits, dim=-1)
    rows = [i for i, sp in enumerate(params) if sp.temperature >= MIN_TEMPERATURE]
    if not rows:
        return tokens
    device = logits.device
    pick = torch.tensor(rows, device=device)
    temps = torch.tensor([params[i].temperature for i in rows], dtype=torch.float64, device=device)
    top_p = torch.tensor([params[i].top_p for i in rows], dtype=torch.float64, device=device)
    seeds = torch.tensor([((params[i].seed or 0) & _MASK63) for i in rows], dtype=torch.int64, device=device)
    steps = torch.tensor([indices[i] for i in rows], dtype=torch.int64, device=device)

    scaled = logits.index_select(0, pick).double() / temps[:, None]
    logp = torch.log_softmax(scaled, dim=-1)
    # Nucleus: keep the smallest prefix (by probability) whose mass reaches top_p; the first token always stays.
    sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
    probs = sorted_logp.exp()
    drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    logp = logp.masked_fill(drop, float("-inf"))

    vocab = torch.arange(logits.shape[-1], dtype=torch.int64, device=device)
    key = _hash(_hash(seeds * 1000003 + steps)[:, None] + vocab[None, :] * 0x9E3779B9)
    u = (torch.bitwise_right_shift(key, 10).double() + 0.5) / float(1 << 53)  # in (0, 1)
    gumbel = -torch.log(-torch.log(u))
    tokens[pick] = torch.argmax(logp + gumbel, dim=-1)
    return tokens
