"""End to end: real daemons (leader + rank processes over gloo) serving the built-in model over HTTP."""

from __future__ import annotations

import concurrent.futures
import os

import openai
import pytest

from tests.conftest import MODEL, chat_body


def test_health_ready_models(daemon_tp1):
    assert daemon_tp1.get("/health")[0] == 200
    status, _, body = daemon_tp1.get("/ready")
    assert (status, body["state"]) == (200, "healthy")
    status, _, body = daemon_tp1.get("/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [MODEL]


def test_tp2_greedy_tokens_equal_tp1(daemon_tp1, daemon_tp2):
    for prompt in ("Hello there", "Tell me about tensor parallelism.", "1 2 3 4"):
        body = chat_body(prompt, max_tokens=40, temperature=0)
        s1, _, one = daemon_tp1.chat(body)
        s2, _, two = daemon_tp2.chat(body)
        assert s1 == s2 == 200
        assert one["usage"] == two["usage"]
        assert one["choices"][0]["message"]["content"] == two["choices"][0]["message"]["content"]
        assert one["usage"]["completion_tokens"] > 0


def test_openai_client_chat_and_stream(daemon_tp2):
    client = openai.OpenAI(base_url=daemon_tp2.url("/v1"), api_key="unused", max_retries=0)
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=16,
                                         temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 0 and 0 < out.usage.completion_tokens <= 16
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content  # same greedy answer, streamed
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [out.choices[0].finish_reason]


def test_eight_concurrent_requests_all_complete(daemon_tp2):
    bodies = [chat_body(f"Request number {i}", max_tokens=12, temperature=0) for i in range(8)]
    alone = [daemon_tp2.chat(b)[2]["choices"][0]["message"]["content"] for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(daemon_tp2.chat, bodies))
    assert [r[0] for r in results] == [200] * 8
    # Concurrency changes nothing about each answer.
    assert [r[2]["choices"][0]["message"]["content"] for r in results] == alone


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(daemon_tp1):
    body = chat_body("Sample something", max_tokens=30, temperature=1.0, top_p=0.9, seed=1234)
    first = daemon_tp1.chat(body)[2]["choices"][0]["message"]["content"]
    again = daemon_tp1.chat(body)[2]["choices"][0]["message"]["content"]
    other = daemon_tp1.chat(dict(body, seed=99))[2]["choices"][0]["message"]["content"]
    assert first == again
    assert first != other


def test_max_completion_tokens_and_length_finish(daemon_tp1):
    status, _, body = daemon_tp1.chat(chat_body(max_completion_tokens=3, temperature=0))
    assert status == 200
    assert body["usage"]["completion_tokens"] <= 3
    if body["usage"]["completion_tokens"] == 3:
        assert body["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_generation_with_stop(daemon_tp1):
    # Generate greedily once, then ask again with a stop string taken from the middle of that answer.
    full = daemon_tp1.chat(chat_body("Stop test", max_tokens=40, temperature=0))[2]["choices"][0]["message"]["content"]
    visible = full.strip()
    assert len(visible) > 8, full
    stop = visible[len(visible) // 2 : len(visible) // 2 + 3]
    status, _, body = daemon_tp1.chat(chat_body("Stop test", max_tokens=40, temperature=0, stop=[stop]))
    assert status == 200
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert stop not in choice["message"]["content"]
    assert full.startswith(choice["message"]["content"])


def test_leader_never_loads_torch(daemon_tp2):
    """Promise 4: the leader process holds no CUDA context; here stronger: it never maps libtorch at all."""
    maps = open(f"/proc/{daemon_tp2.proc.pid}/maps").read()
    assert "libtorch" not in maps and "libcuda" not in maps
    workers = daemon_tp2.worker_pids()
    assert len(workers) == 2
    assert all("libtorch" in open(f"/proc/{pid}/maps").read() for pid in workers)


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc")
def test_stop_reaps_every_worker(start_daemon):
    d = start_daemon(2)
    workers = d.worker_pids()
    assert len(workers) == 2
    assert d.stop() == 0  # stop() itself asserts that no worker is left


def test_client_disconnect_mid_stream_cancels_generation(start_daemon, tmp_path):
    """A streaming client that goes away stops its generation at the next step and frees the engine."""
    import http.client
    import json as _json
    import time as _time

    from tests.faults import fault_daemon

    d = fault_daemon(start_daemon, tmp_path, 1)
    # Greedy on the built-in model this prompt runs 364 tokens before its end-of-turn token.
    body = chat_body("a long answer please", max_tokens=1500, temperature=0)
    full = d.chat(body)[2]["usage"]["completion_tokens"]
    assert full > 300
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", _json.dumps(dict(body, stream=True)),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(3):
        assert resp.fp.readline()  # SSE lines arrived: the generation is running
    conn.sock.close()  # hang up mid-stream
    conn.close()
    t0 = _time.monotonic()
    while d.admin.status()["requests"]["cancelled"] < 1:
        assert _time.monotonic() - t0 < 30, d.admin.status()["requests"]
        _time.sleep(0.05)
    assert d.admin.status()["requests"]["last_cancelled_tokens"] < full
    assert d.chat(chat_body(max_tokens=4))[0] == 200
    d.stop()


def test_metrics_count_requests_tokens_and_lifecycle(daemon_tp1):
    status, _, body = daemon_tp1.chat(chat_body(max_tokens=5, temperature=0))
    assert status == 200
    metrics = daemon_tp1.metrics()
    assert metrics['neurond_lifecycle_state{state="healthy"}'] == 1.0
    assert metrics['neurond_lifecycle_state{state="poisoned"}'] == 0.0
    assert metrics['neurond_requests_total{outcome="completed"}'] >= 1
    assert metrics["neurond_generated_tokens_total"] >= body["usage"]["completion_tokens"]
    assert metrics['neurond_step_seconds_count{kind="decode"}'] >= 1


def test_generated_tokens_are_counted_as_they_stream(daemon_tp1):
    """`rate(neurond_generated_tokens_total[1m])` is the daemon's throughput: a long answer's tokens count while it
    streams, not all at its end (before: a minute-long answer showed no tokens until it finished)."""
    client = openai.OpenAI(base_url=daemon_tp1.url("/v1"), api_key="unused", max_retries=0)
    before = daemon_tp1.metrics()["neurond_generated_tokens_total"]
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a long answer"}],
                                            max_tokens=600, temperature=1.0, seed=3, stream=True,
                                            stream_options={"include_usage": True})
    seen, during = 0, 0.0
    for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 40 and not during:  # mid-answer: decode calls of 8 tokens have streamed
            during = daemon_tp1.metrics()["neurond_generated_tokens_total"] - before
        usage = chunk.usage
    assert usage is not None and usage.completion_tokens > 100, usage  # long enough to be read mid-answer
    assert 0 < during < usage.completion_tokens, (during, usage)
    assert daemon_tp1.metrics()["neurond_generated_tokens_total"] - before == usage.completion_tokens
