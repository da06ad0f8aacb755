"""A paged KV cache end to end (TP=2, gloo): more sequences than the pool holds at full length all complete with
the answers they get alone (the newest are preempted and replayed), a request the pool could never hold gets a
400 with the numbers, a rank killed mid-decode under paging is repaired with every answer intact, and a fault in
the first chunk of a long prompt's chunked prefill ends that request cleanly or replays it."""

from __future__ import annotations

import concurrent.futures

import pytest

from tests.conftest import chat_body
from tests.faults import fault_daemon, wait_ready

BLOCKS, BLOCK = 10, 16  # 160 positions: about two of the sequences below at full length
CHUNK = 16  # prefill_chunk_tokens: the long prompts below (about 60 tokens) are prefilled in 4 chunks


@pytest.fixture(scope="module")
def daemon(start_daemon, tmp_path_factory):
    d = fault_daemon(start_daemon, tmp_path_factory.mktemp("paged"), 2, kv_cache_blocks=BLOCKS,
                     kv_block_size=BLOCK, max_batch_size=4, decode_steps_per_call=4, prefill_chunk_tokens=CHUNK)
    yield d
    d.stop()


def _bodies():
    return [chat_body(f"Request number {i}", max_tokens=48, temperature=0) for i in range(4)]


def _together(d, bodies):
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(d.chat, bodies))
    assert [r[0] for r in results] == [200] * len(bodies), results
    return [r[2]["choices"][0]["message"]["content"] for r in results]


def test_more_sequences_than_the_pool_holds_complete_with_their_own_answers(daemon):
    alone = [daemon.chat(b)[2] for b in _bodies()]
    assert all(a["choices"][0]["finish_reason"] == "length" for a in alone)  # each grows to 48 tokens
    # Each needs 4-5 blocks at full length, 10 are there: the ones admitted last are preempted and replayed.
    before = daemon.metrics().get("neurond_preemptions_total", 0.0)
    assert _together(daemon, _bodies()) == [a["choices"][0]["message"]["content"] for a in alone]
    after = daemon.metrics()
    assert after["neurond_preemptions_total"] > before
    assert after['neurond_kv_cache_blocks{state="used"}'] == 0.0
    assert after['neurond_kv_cache_blocks{state="total"}'] == BLOCKS


def test_a_request_the_pool_could_never_hold_is_a_400_with_the_numbers(daemon):
    status, _, body = daemon.chat(chat_body("hello", max_tokens=BLOCKS * BLOCK))
    assert status == 400
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "context_length_exceeded"
    assert f"the KV cache has {BLOCKS} blocks ({BLOCKS * BLOCK} positions)" in err["message"]
    assert daemon.chat(chat_body("hello", max_tokens=4))[0] == 200  # and serving goes on


def test_a_rank_killed_mid_decode_under_paging_is_repaired_and_every_answer_replayed(daemon):
    alone = [daemon.chat(b)[2]["choices"][0]["message"]["content"] for b in _bodies()]
    assert daemon.admin.inject(1, "sigkill", "decode").status_code == 200
    assert _together(daemon, _bodies()) == alone
    assert daemon.get("/ready")[0] == 200


def test_a_repeated_long_prompt_is_served_from_the_prefix_cache_with_the_same_answer(daemon):
    system = " ".join(f"rule {i}." for i in range(8))  # most of the 160 positions (a byte-level test tokenizer)
    body = chat_body("What is the rule?", max_tokens=8, temperature=0)
    body["messages"].insert(0, {"role": "system", "content": system})
    status, _, first = daemon.chat(body)
    assert status == 200, first
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert BLOCK * 3 < prompt_tokens + 8 <= BLOCKS * BLOCK, prompt_tokens
    before = daemon.metrics()
    status, _, second = daemon.chat(body)
    assert status == 200
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    after = daemon.metrics()
    key = 'neurond_prefix_cache_tokens_total{result="%s"}'
    hits = after.get(key % "hit", 0.0) - before.get(key % "hit", 0.0)
    # Every full block of the prompt but the one holding its last token (which is always prefilled).
    assert hits == (prompt_tokens - 1) // BLOCK * BLOCK > 0
    assert after.get(key % "miss", 0.0) - before.get(key % "miss", 0.0) == prompt_tokens - hits
    assert after['neurond_kv_cache_blocks{state="used"}'] == 0.0


def _long(first_word: str) -> dict:
    body = chat_body("What is the rule?", max_tokens=8, temperature=0)
    rules = " ".join(f"rule {i}." for i in range(7))
    body["messages"].insert(0, {"role": "system", "content": f"{first_word} {rules}"})
    return body


def test_a_fault_in_a_long_chunked_prefill_ends_the_request_cleanly_or_replays_it(daemon):
    """Prompts no earlier request shared (so nothing comes from the prefix cache): the fault fires in the first
    of their prefill chunks. A killed rank is replaced and the request replayed from its first chunk, with the
    answer it gets unfaulted; an out-of-memory fails it with a clean 503, and the next one is served."""
    killed = daemon.admin.status()["pids"]["1"]
    assert daemon.admin.inject(1, "sigkill", "prefill").status_code == 200
    status, _, faulted = daemon.chat(_long("Alpha"))
    assert status == 200, faulted
    assert daemon.admin.status()["pids"]["1"] != killed  # the fault fired: rank 1 was replaced
    assert faulted["usage"]["prompt_tokens"] > 3 * CHUNK  # a chunked prefill
    assert daemon.chat(_long("Alpha"))[2]["choices"][0]["message"] == faulted["choices"][0]["message"]
    assert daemon.admin.inject(0, "oom", "prefill").status_code == 200
    status, _, failed = daemon.chat(_long("Beta"))
    assert status == 503 and failed["error"]["code"] == "out_of_memory", failed
    wait_ready(daemon)  # new requests get a retriable 503 while the communicator is rebuilt
    again = daemon.chat(_long("Beta"))
    assert again[0] == 200, again


def test_blocks_sized_by_the_ranks_are_served_and_kept_by_a_replaced_rank(start_daemon, tmp_path_factory):
    """kv_cache_blocks = -1: each rank makes as many blocks as fit (on a CPU: the static cache's memory, every slot
    its window and the trash column); the leader serves that count, and a rank replaced later makes the same."""
    d = fault_daemon(start_daemon, tmp_path_factory.mktemp("sized"), 1, kv_cache_blocks=-1, kv_block_size=BLOCK,
                     max_batch_size=2, max_model_len=100)
    try:
        want = 2 * -(-101 // BLOCK)  # slots x blocks of (window + trash column)
        status = d.admin.status()
        assert (status["kv_cache_blocks"], status["rank_kv_cache_blocks"]) == (want, {"0": want})
        assert d.metrics()['neurond_kv_cache_blocks{state="total"}'] == want
        first = status["pids"]["0"]
        assert d.admin.inject(0, "sigkill", "decode").status_code == 200
        assert d.chat(chat_body("again", max_tokens=8, temperature=0))[0] == 200  # replayed after the repair
        wait_ready(d)
        status = d.admin.status()
        assert status["pids"]["0"] != first
        assert (status["kv_cache_blocks"], status["rank_kv_cache_blocks"]) == (want, {"0": want})
    finally:
        d.stop()
