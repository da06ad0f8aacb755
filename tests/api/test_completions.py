"""POST /v1/completions (the legacy completions API) against a real daemon, with the official openai client:
a raw prompt (string or token ids, no chat template) on the same engine as chat, plain and streamed."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import MODEL, chat_body, http

PROMPT = "The quick brown fox"


def _stream(client, **kw):
    chunks = list(client.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    return text, finishes, chunks[-1].usage


def test_string_prompt_plain_and_streamed(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == MODEL
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.index == 0
    # No chat template: the prompt is exactly the tokenizer's encoding of the raw text.
    assert out.usage.prompt_tokens == len(tokenizer.encode_prompt(PROMPT))
    chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    assert out.usage.prompt_tokens < len(chat_ids)
    assert 0 < out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    text, finishes, usage = _stream(client, prompt=PROMPT, max_tokens=12, temperature=0)
    assert text == choice.text  # the same greedy answer, streamed
    assert finishes == [choice.finish_reason]
    assert usage.model_dump() == out.usage.model_dump()


def test_token_id_prompt_equals_its_text(client, tokenizer):
    ids = tokenizer.encode_prompt(PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch_of_one = client.completions.create(model=MODEL, prompt=[ids], max_tokens=10, temperature=0)
    assert batch_of_one.choices[0].text == by_text.choices[0].text
    text, _, usage = _stream(client, prompt=ids, max_tokens=10, temperature=0)
    assert text == by_text.choices[0].text and usage.prompt_tokens == len(ids)


def test_echo_prepends_the_prompt(client, tokenizer):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert echoed.usage.model_dump() == plain.usage.model_dump()
    text, _, _ = _stream(client, prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
    assert text == PROMPT + plain.choices[0].text
    ids = tokenizer.encode_prompt(PROMPT)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, echo=True)
    assert by_ids.choices[0].text == tokenizer.decode(ids) + plain.choices[0].text


def test_seed_gives_the_same_text_twice(client):
    kw = dict(model=MODEL, prompt="Sample something", max_tokens=24, temperature=1.0, seed=4321)
    first = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == first
    assert _stream(client, **{k: v for k, v in kw.items() if k != "model"})[0] == first
    assert client.completions.create(**dict(kw, seed=7)).choices[0].text != first


def test_stop_string_ends_the_text(client):
    full = client.completions.create(model=MODEL, prompt="Stop test", max_tokens=40, temperature=0).choices[0].text
    visible = full.strip()
    assert len(visible) > 8, full
    stop = visible[len(visible) // 2 : len(visible) // 2 + 3]
    out = client.completions.create(model=MODEL, prompt="Stop test", max_tokens=40, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert stop not in out.choices[0].text and full.startswith(out.choices[0].text)
    text, finishes, _ = _stream(client, prompt="Stop test", max_tokens=40, temperature=0, stop=stop)
    assert text == out.choices[0].text and finishes == ["stop"]


def test_length_finish(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    if out.usage.completion_tokens == 2:
        assert out.choices[0].finish_reason == "length"


def _bad(client, **kw) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**{"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **kw})
    assert info.value.status_code == 400
    return info.value


def test_suffix_is_refused_clearly(client):
    err = _bad(client, suffix="the end")
    assert err.body["message"] == "suffix is not supported"
    assert (err.body["param"], err.body["code"]) == ("suffix", "unsupported_parameter")
    assert _bad(client, suffix="x", stream=True).body["message"] == "suffix is not supported"


@pytest.mark.parametrize("kw,param,words", [
    (dict(best_of=3), "best_of", "best_of"),
    (dict(prompt=["one", "two"]), "prompt", "one prompt per request"),
    (dict(prompt=[[1, 2], [3, 4]]), "prompt", "one prompt per request"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate", "unrecognized request argument"),
], ids=["best_of", "batch of strings", "batch of token lists", "unknown field"])
def test_unsupported_options_are_400(client, kw, param, words):
    err = _bad(client, **kw)
    assert err.body["code"] == "unsupported_parameter" and err.body["param"] == param, err.body
    assert words in err.body["message"], err.body


@pytest.mark.parametrize("body,param,code", [
    ({"prompt": ""}, "prompt", None),
    ({"prompt": []}, "prompt", None),
    ({"prompt": [1, -2]}, "prompt", "invalid_value"),
    ({"prompt": [10**9]}, "prompt", "invalid_value"),
    ({"prompt": [1, True]}, "prompt", "invalid_value"),
    ({"prompt": 5}, "prompt", "invalid_value"),
    ({}, "prompt", None),
    ({"model": "gpt-3.5-turbo-instruct"}, "model", "model_not_found"),
    ({"max_tokens": 100_000}, "max_tokens", "context_length_exceeded"),
    ({"prompt": "word " * 5000}, "prompt", "context_length_exceeded"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "unsupported_parameter"),
], ids=["empty string", "empty ids", "negative id", "id outside the vocabulary", "bool id", "number",
        "no prompt", "unknown model", "over the context", "prompt over the context", "stream_options alone",
        "chat fields"])
def test_bad_input_is_a_clear_400(daemon_tp1, body, param, code):
    full = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **body}
    if "prompt" not in body and not body:
        del full["prompt"]
    status, _, answer = http("POST", daemon_tp1.url("/v1/completions"), json.dumps(full).encode(),
                             {"Content-Type": "application/json"})
    assert status == 400, answer
    err = answer["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert daemon_tp1.chat(chat_body(max_tokens=2))[0] == 200


def test_openapi_describes_completions(daemon_tp1):
    spec = daemon_tp1.get("/openapi.json")[2]
    op = spec["paths"]["/v1/completions"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
    schema = spec["components"]["schemas"]["CompletionRequest"]
    assert schema["properties"]["model"]["enum"] == [MODEL]
    assert {"prompt", "echo", "stream", "max_tokens", "seed", "stop"} <= set(schema["properties"])


def test_rank_fault_mid_completion_is_replayed_like_chat(start_daemon, tmp_path, tokenizer):
    """The same engine path as chat: a rank killed during a completion's decode is replaced, the request is
    replayed (prompt + tokens so far, same sampling state) and the answer is exactly the one without a fault,
    plain and streamed, and so is a chat answer under a JSON schema. A rank that raises in a step holding only
    this request fails it, as for chat."""
    from tests.faults import fault_daemon, wait_ready

    d = fault_daemon(start_daemon, tmp_path, 2)
    client = openai.OpenAI(base_url=d.url("/v1"), api_key="x", max_retries=0)
    # Penalties, a bias and logprobs too: a replay rebuilds the penalty counts from the tokens so far.
    kw = dict(model=MODEL, prompt=tokenizer.encode_prompt("Replay me"), max_tokens=48, temperature=1.0, seed=99,
              echo=True, presence_penalty=0.8, frequency_penalty=0.6, logit_bias={"300": 1.5}, logprobs=2)
    clean = client.completions.create(**kw)
    assert len(clean.choices[0].logprobs.tokens) == clean.usage.completion_tokens
    replayed_before = d.admin.status()["requests"].get("replayed", 0)
    # Deep into the answer (three decode calls of 8 steps pass first: 25 tokens drawn), so the penalty counts the
    # replay must rebuild are many, not the one token drawn by the prefill.
    assert d.admin.inject(1, "sigkill", "decode", after=3).status_code == 200
    faulted = client.completions.create(**kw)
    assert faulted.choices[0].text == clean.choices[0].text and faulted.usage == clean.usage
    assert faulted.choices[0].logprobs.tokens == clean.choices[0].logprobs.tokens
    assert faulted.choices[0].logprobs.token_logprobs == pytest.approx(clean.choices[0].logprobs.token_logprobs,
                                                                       abs=1e-3)
    wait_ready(d)
    # Sampled from a random model, tokens seldom repeat, so penalties seldom change a draw; greedy, they do.
    # Where the penalized greedy answer first leaves the unpenalized one (token `split`), the unpenalized choice is
    # a token the answer drew before (token j): the penalty steered away from it. A fault after token j and before
    # `split`, then, is caught only by the penalty counts the replay rebuilds from the tokens so far: forget them,
    # and the replay draws the unpenalized token at `split`.
    greedy = dict(kw, temperature=0.0, presence_penalty=1.5, frequency_penalty=1.5, echo=False, logprobs=1)
    penalized = client.completions.create(**greedy).choices[0]
    raw = client.completions.create(**dict(greedy, presence_penalty=0, frequency_penalty=0)).choices[0]
    pen_tokens, raw_tokens = penalized.logprobs.tokens, raw.logprobs.tokens
    split = next(i for i, (a, b) in enumerate(zip(pen_tokens, raw_tokens, strict=False)) if a != b)
    j = max(i for i in range(split) if pen_tokens[i] == raw_tokens[split])
    # The prefill draws token 0, each decode call of 8 steps the next 8: a fault in decode call k (after=k) is
    # replayed with tokens 0 .. 8k as its history.
    k = next((k for k in range(1, 6) if j < 1 + 8 * k <= split), None)
    assert k is not None, f"no decode call between tokens {j} and {split}: choose another prompt"
    assert d.admin.inject(0, "sigkill", "decode", after=k).status_code == 200
    assert client.completions.create(**greedy).choices[0].text == penalized.text
    wait_ready(d)
    assert d.admin.inject(0, "sigkill", "decode").status_code == 200
    text, _, usage = _stream(client, **{k: v for k, v in kw.items() if k != "model"})
    assert text == clean.choices[0].text and usage == clean.usage
    wait_ready(d)
    # A constrained chat answer (a JSON schema, sampled) too: the rank's grammar matcher is rebuilt from the
    # tokens so far and the replay draws exactly what it would have drawn.
    from tests.api.test_structured_output import JSON_SCHEMA

    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Forecast?"}], max_tokens=120, temperature=1.0,
                seed=4, response_format=JSON_SCHEMA)
    clean_chat = client.chat.completions.create(**chat)
    assert clean_chat.choices[0].finish_reason == "stop" and clean_chat.usage.completion_tokens > 8
    assert d.admin.inject(1, "sigkill", "decode").status_code == 200
    assert client.chat.completions.create(**chat).choices[0].message.content == clean_chat.choices[0].message.content
    wait_ready(d)
    assert d.admin.status()["requests"].get("replayed", 0) >= replayed_before + 4
    assert d.admin.inject(0, "raise", "decode").status_code == 200
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(**kw)
    assert info.value.status_code == 500 and info.value.body["code"] == "rank_failed"
    wait_ready(d)
    assert client.completions.create(**kw).choices[0].text == clean.choices[0].text
    d.stop()
