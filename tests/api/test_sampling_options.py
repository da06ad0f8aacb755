"""logprobs / top_logprobs, logit_bias and presence/frequency penalties, end to end with the official openai
client against a real daemon (built-in model, random weights). The numbers are checked against their
definitions: the reported log-probabilities are the model's own distribution (a greedy token is its argmax),
and a greedy draw with bias and penalties is the argmax of the adjusted scores, step by step."""

from __future__ import annotations

import json
import math

import openai
import pytest

from tests.conftest import MODEL, http

MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse."}]
PROMPT = "Once upon a time"


def _greedy_chat(client, **kw):
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, **kw)


def test_chat_logprobs_are_the_model_distribution_plain_and_streamed(client):
    out = _greedy_chat(client, logprobs=True, top_logprobs=5)
    choice = out.choices[0]
    content = choice.logprobs.content
    assert len(content) == out.usage.completion_tokens > 0
    for entry in content:
        tops = entry.top_logprobs
        assert len(tops) == 5
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert all(t.logprob <= 0 for t in tops) and sum(math.exp(t.logprob) for t in tops) <= 1 + 1e-4
        # Greedy: the drawn token is the model's likeliest, with that log-probability.
        assert entry.token == tops[0].token and entry.logprob == pytest.approx(tops[0].logprob, abs=1e-5)
        assert bytes(entry.bytes) == entry.token.encode() or "\ufffd" in entry.token
    joined = b"".join(bytes(e.bytes) for e in content)
    if choice.finish_reason == "length" and "\ufffd" not in joined.decode(errors="replace"):
        assert joined.decode() == choice.message.content  # random weights: only where the bytes are whole text
    streamed = list(_greedy_chat(client, logprobs=True, top_logprobs=5, stream=True))
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in entries] == [(e.token, round(e.logprob, 4)) for e in content]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == choice.message.content


def test_logprobs_only_when_asked_and_top_logprobs_zero_gives_the_token_alone(client):
    assert _greedy_chat(client).choices[0].logprobs is None
    content = _greedy_chat(client, logprobs=True).choices[0].logprobs.content
    assert content and all(e.top_logprobs == [] for e in content)


def test_sampled_tokens_have_their_logprob_and_the_seed_repeats_them(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=7, logprobs=True, top_logprobs=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    la, lb = a.choices[0].logprobs.content, b.choices[0].logprobs.content
    assert [e.token for e in la] == [e.token for e in lb]
    assert all(e.logprob <= 0 and e.logprob >= e.top_logprobs[-1].logprob - 50 for e in la)
    assert any(e.token != e.top_logprobs[0].token for e in la) or len(la) < 4  # sampled, not always the argmax


def test_completions_logprobs_legacy_shape(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=4)
    lp = out.choices[0].logprobs
    n = out.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(len(t) <= 4 and max(t.values()) == pytest.approx(v, abs=1e-5)
               for t, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=4,
                                       echo=True).choices[0].logprobs
    assert echoed.text_offset[0] == len(PROMPT) and echoed.tokens == lp.tokens
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4).choices[0].logprobs is None


def _adjusted_argmax_holds(entries, bias: dict[bytes, float], presence: float, frequency: float) -> None:
    """Each greedy token is the argmax of logprob + bias - penalties among the step's top candidates (tokens
    told apart by their bytes: several partial characters all read as U+FFFD)."""
    counts: dict[bytes, int] = {}
    for entry in entries:
        def score(token: bytes, logprob: float) -> float:
            seen = counts.get(token, 0)
            return logprob + bias.get(token, 0.0) - presence * (seen > 0) - frequency * seen

        best = score(bytes(entry.bytes), entry.logprob)
        assert all(best >= score(bytes(t.bytes), t.logprob) - 1e-4 for t in entry.top_logprobs), entry
        counts[bytes(entry.bytes)] = counts.get(bytes(entry.bytes), 0) + 1


def test_penalties_and_bias_steer_greedy_decoding_exactly_as_defined(client, tokenizer):
    plain = _greedy_chat(client, logprobs=True, top_logprobs=20, max_tokens=40)
    plain_tokens = [bytes(e.bytes) for e in plain.choices[0].logprobs.content]
    penalized = _greedy_chat(client, logprobs=True, top_logprobs=20, max_tokens=40, presence_penalty=1.5,
                             frequency_penalty=1.0)
    entries = penalized.choices[0].logprobs.content
    _adjusted_argmax_holds(entries, {}, 1.5, 1.0)
    assert [bytes(e.bytes) for e in entries] != plain_tokens, "the penalties changed nothing"
    # A bias on the second likeliest first token makes it the first token; the rest follows the definition.
    ids = {tokenizer.token_bytes(i): i for i in range(len(tokenizer))}
    second = plain.choices[0].logprobs.content[0].top_logprobs[1]
    gap = plain.choices[0].logprobs.content[0].logprob - second.logprob
    biased = _greedy_chat(client, logprobs=True, top_logprobs=20, max_tokens=8,
                          logit_bias={str(ids[bytes(second.bytes)]): gap + 1.0})
    content = biased.choices[0].logprobs.content
    assert bytes(content[0].bytes) == bytes(second.bytes)
    _adjusted_argmax_holds(content, {bytes(second.bytes): gap + 1.0}, 0.0, 0.0)
    # -100 bans a token outright.
    banned = _greedy_chat(client, logprobs=True, logit_bias={str(ids[plain_tokens[0]]): -100})
    assert plain_tokens[0] not in [bytes(e.bytes) for e in banned.choices[0].logprobs.content]


@pytest.mark.parametrize("body, param", [
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"12": 101}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
])
def test_bad_sampling_options_are_a_clear_400(daemon_tp1, body, param):
    payload = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **body}).encode()
    status, _, out = http("POST", daemon_tp1.url("/v1/chat/completions"), payload,
                          {"Content-Type": "application/json"})
    assert status == 400, out
    assert out["error"]["type"] == "invalid_request_error"
    assert out["error"]["param"] == param or param in out["error"]["message"], out


def test_tp2_reports_the_same_greedy_tokens_and_logprobs(daemon_tp2, client):
    tp2 = openai.OpenAI(base_url=daemon_tp2.url("/v1"), api_key="x", max_retries=0)
    kw = dict(logprobs=True, top_logprobs=3, presence_penalty=0.5, logit_bias={"300": 2.0})
    one = _greedy_chat(client, **kw).choices[0].logprobs.content
    two = _greedy_chat(tp2, **kw).choices[0].logprobs.content
    assert [e.token for e in two] == [e.token for e in one]
    assert [e.logprob for e in two] == pytest.approx([e.logprob for e in one], abs=1e-3)


def test_n_choices_are_the_answers_of_seed_plus_i_and_their_prompt_counts_once(client):
    """Choice i of n is exactly the answer of the same request with seed + i: its prompt, prefilled once and
    copied into each choice's slot, gives what a prefill of its own gives."""
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0)
    out = client.chat.completions.create(n=3, seed=11, logprobs=True, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(seed=11 + i, logprobs=True, **kw) for i in range(3)]
    for choice, single in zip(out.choices, alone, strict=True):
        assert choice.message.content == single.choices[0].message.content
        assert [e.token for e in choice.logprobs.content] == [e.token for e in single.choices[0].logprobs.content]
    assert len({c.message.content for c in out.choices}) > 1, "three seeds, one answer"
    assert out.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert out.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    streamed = list(client.chat.completions.create(n=3, seed=11, stream=True,
                                                   stream_options={"include_usage": True}, **kw))
    texts = ["", "", ""]
    finishes = {}
    for c in streamed:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == [c.message.content for c in out.choices]
    assert finishes == {c.index: c.finish_reason for c in out.choices}
    assert streamed[-1].usage.total_tokens == out.usage.total_tokens


def test_n_greedy_choices_agree_and_completions_take_n_too(client):
    out = _greedy_chat(client, n=2)
    alone = _greedy_chat(client).choices[0].message.content
    assert out.choices[0].message.content == out.choices[1].message.content == alone
    comp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, n=2, echo=True)
    assert [c.index for c in comp.choices] == [0, 1] and comp.choices[0].text == comp.choices[1].text
    assert comp.choices[0].text.startswith(PROMPT)
