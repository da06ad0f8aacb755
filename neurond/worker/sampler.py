"""Sampling for a batch of rows, each with its own temperature, top_p and seed, with no generator state.

Token i of a sequence is drawn with noise that is a pure function of (the sequence's seed, i, vocabulary
index): a replayed request (prompt + tokens so far, after a fault) draws exactly what it would have drawn, and
every rank computes the same token from the same logits. Gumbel-max: argmax(logits / T + g), g = -log(-log u)
with u uniform from a splitmix64 hash, all rows at once.
"""

from __future__ import annotations

from neurond.pool.protocol import SamplingParams

# A request's temperature below this samples greedily (found by schemathesis: temperature=1e-300 made the
# softmax NaN and the step fail).
MIN_TEMPERATURE = 1e-4

_MASK63 = (1 << 63) - 1


def _hash(x):
    """splitmix64 finalizer on int64 tensors (wrapping arithmetic), result in [0, 2^63)."""
    import torch

    x = x ^ torch.bitwise_right_shift(x, 30) & 0x3FFFFFFFF
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as int64
    x = x ^ torch.bitwise_right_shift(x, 27) & 0x1FFFFFFFFF
    x = x * -7723592293110705685  # 0x94d049bb133111eb as int64
    x = x ^ torch.bitwise_right_shift(x, 31) & 0x1FFFFFFFF
    return x & _MASK63


def sample(logits, params: list[SamplingParams], indices: list[int]):
    """logits [N, V] float32 on the device; params[i] and indices[i] (tokens the row's sequence has drawn
    before) per row. Returns the chosen token ids as an int64 tensor [N] on the device (no host sync)."""
    import torch

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
