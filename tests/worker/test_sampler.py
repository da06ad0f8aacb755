"""The sampler's pure pieces: logit_bias and penalties (`adjust`) and the reported log-probabilities."""

from __future__ import annotations

import pytest
import torch

from neurond.protocol import SamplingParams
from neurond.worker.sampler import adjust, logprobs_of, sample


def test_adjust_adds_bias_and_subtracts_penalties_per_row():
    logits = torch.zeros(3, 6)
    counts = torch.tensor([[0] * 6, [0, 2, 0, 1, 0, 0], [0] * 6], dtype=torch.int32)
    params = [SamplingParams(logit_bias=((2, 5.0), (4, -100.0))),
              SamplingParams(presence_penalty=0.5, frequency_penalty=1.0),
              SamplingParams()]
    out = adjust(logits, params, counts)
    assert out[0].tolist() == [0, 0, 5, 0, -100, 0]
    assert out[1].tolist() == [0, -2.5, 0, -1.5, 0, 0]  # presence once, frequency per occurrence
    assert out[2].tolist() == [0] * 6 and logits.abs().sum() == 0  # untouched rows; the input is not modified
    assert adjust(logits, [SamplingParams()] * 3) is logits  # nothing to do: no copy


def test_greedy_with_a_bias_takes_the_biased_token():
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    p = [SamplingParams(temperature=0.0, logit_bias=((2, 4.0),))]
    assert sample(adjust(logits, p), p, [0]).tolist() == [2]


def test_logprobs_are_the_unadjusted_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    chosen, ids, values = logprobs_of(logits, torch.tensor([1]), 2)
    expected = torch.log_softmax(logits, -1)
    assert chosen.tolist() == pytest.approx([expected[0, 1].item()])
    assert ids.tolist() == [[0, 1]] and values.tolist()[0] == pytest.approx(expected[0, :2].tolist())
    chosen, ids, values = logprobs_of(logits, torch.tensor([3]), 0)
    assert ids.shape == (1, 0) and chosen.tolist() == pytest.approx([expected[0, 3].item()])


def test_plain_greedy_is_only_greedy_with_nothing_to_apply_or_report():
    assert SamplingParams(temperature=0.0).plain_greedy
    for kw in (dict(temperature=0.5), dict(presence_penalty=0.1), dict(frequency_penalty=-0.1),
               dict(logit_bias=((1, 1.0),)), dict(logprobs=0)):
        assert not SamplingParams(**{"temperature": 0.0, **kw}).plain_greedy, kw
