"""Bad input gets a clear 4xx in the OpenAI error shape, before anything reaches a rank, and the daemon keeps
serving."""

from __future__ import annotations

import json

import pytest

from tests.api.raw_http import exchange
from tests.conftest import MODEL, chat_body, http


def _error(result, status, code=None, param=None):
    got_status, _, body = result
    assert got_status == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


CASES = [
    ("unknown model", dict(chat_body(), model="gpt-4"), 400, "model_not_found", "model"),
    ("no messages", dict(chat_body(), messages=[]), 400, None, "messages"),
    ("messages not a list", dict(chat_body(), messages="hi"), 400, None, "messages"),
    ("empty message text", dict(chat_body(), messages=[{"role": "user", "content": "   "}]), 400, None, None),
    ("bad role", dict(chat_body(), messages=[{"role": "wizard", "content": "hi"}]), 400, None, None),
    ("n over 16", chat_body(n=17), 400, None, "n"),
    ("unknown field", chat_body(frobnicate=True), 400, "unsupported_parameter", "frobnicate"),
    ("negative max_tokens", chat_body(max_tokens=-5), 400, None, "max_tokens"),
    ("temperature too high", chat_body(temperature=7), 400, None, "temperature"),
    ("top_p zero", chat_body(top_p=0), 400, None, "top_p"),
    ("too many stops", chat_body(stop=["a", "b", "c", "d", "e"]), 400, None, "stop"),
    ("top_logprobs over 20", chat_body(logprobs=True, top_logprobs=21), 400, None, "top_logprobs"),
    ("over the context", chat_body(max_tokens=100_000), 400, "context_length_exceeded", "max_tokens"),
    ("prompt alone over the context", chat_body("word " * 5000), 400, "context_length_exceeded", "messages"),
]


@pytest.mark.parametrize("name,body,status,code,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_400(daemon_tp1, name, body, status, code, param):
    _error(daemon_tp1.chat(body), status, code, param)


def test_stream_options_need_stream(daemon_tp1):
    """As OpenAI answers it: stream_options with stream false or absent is a 400 naming the parameter."""
    for body in (chat_body(max_tokens=2, stream_options={"include_usage": True}),
                 chat_body(max_tokens=2, stream=False, stream_options={"include_usage": False})):
        err = _error(daemon_tp1.chat(body), 400, "invalid_value", "stream_options")
        assert err["type"] == "invalid_request_error" and "stream" in err["message"], err
    assert daemon_tp1.chat(chat_body(max_tokens=2, stream_options=None))[0] == 200  # null is no option at all
    status, _, events = http("POST", daemon_tp1.url("/v1/chat/completions"),
                             json.dumps(chat_body(max_tokens=2, stream=True,
                                                  stream_options={"include_usage": True})).encode(),
                             {"Content-Type": "application/json"})
    assert status == 200 and b'"usage":{"prompt_tokens"' in events and events.endswith(b"data: [DONE]\n\n")


def test_context_error_names_the_numbers(daemon_tp1):
    err = _error(daemon_tp1.chat(chat_body(max_tokens=100_000)), 400, "context_length_exceeded")
    assert "100000" in err["message"] and "2048" in err["message"]


def test_invalid_json_and_non_object(daemon_tp1):
    url = daemon_tp1.url("/v1/chat/completions")
    h = {"Content-Type": "application/json"}
    _error(http("POST", url, b'{"model": ', h), 400, "invalid_json")
    _error(http("POST", url, b"[1, 2]", h), 400)
    _error(http("POST", url, b"\xff\xfe\x00garbage", h), 400, "invalid_json")


def test_wrong_content_type_is_415(daemon_tp1):
    _error(http("POST", daemon_tp1.url("/v1/chat/completions"), json.dumps(chat_body()).encode(),
                {"Content-Type": "text/plain"}), 415)


def test_body_too_large_is_413(daemon_tp1):
    # Declared too large: refused from the headers alone, before any body byte is read.
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2000000\r\n\r\n")
    reply = exchange(daemon_tp1.port, head, [])
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"request_too_large" in reply
    # Not declared (chunked): refused once the bytes read pass the limit.
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 65536
    reply = exchange(daemon_tp1.port, head, (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(40)))
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert daemon_tp1.chat(chat_body(max_tokens=2))[0] == 200


def test_unknown_route_and_method(daemon_tp1):
    _error(daemon_tp1.get("/v1/nope"), 404)
    _error(daemon_tp1.get("/v1/chat/completions"), 405)


def test_daemon_keeps_serving_after_bad_input(daemon_tp1):
    for _, body, *_ in CASES:
        daemon_tp1.chat(body)
    status, _, body = daemon_tp1.chat(chat_body(max_tokens=5, temperature=0))
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    assert daemon_tp1.get("/ready")[0] == 200
    assert daemon_tp1.proc.poll() is None
    assert MODEL in daemon_tp1.get("/v1/models")[2]["data"][0]["id"]
