"""The engine's batching and fault policy, against a scripted pool (no processes): who fails, who is replayed,
who is quarantined, and that a replay continues each stream exactly."""

from __future__ import annotations

import asyncio

import pytest

from neurond import protocol as p
from neurond.engine.blocks import default_blocks
from neurond.engine.deadline import StepDeadline
from neurond.engine.engine import Engine, RequestTooLarge
from neurond.engine.request import Failed, Finished, GenerationRequest, TextDelta
from neurond.observe.events import Event
from neurond.observe.metrics import MetricsSink
from neurond.pool.faults import RankDied, RankFailed, StepTimeout
from tests.engine.fakes import FakeSupervisor, Tokens, next_token


def expected(prompt: list[int], n: int) -> list[int]:
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(next_token(ctx))
    return ctx[len(prompt):]


def request(name: str, prompt: list[int], n: int) -> GenerationRequest:
    return GenerationRequest(name, prompt, n, p.SamplingParams(temperature=0.0))


async def run(sup, reqs, *, max_batch_size=4, chunk=3, delay_s=0.0, decode_steps_per_call=1, together=False,
              kv_cache_blocks=0, metrics=None):
    """`together`: the requests are one API request's choices (Engine.submit_all). A paged cache of
    `kv_cache_blocks` blocks, or (0) of as many as the static cache holds, so the rows are checked in every test;
    the static cache itself where `sup` is not paged."""
    blocks = (kv_cache_blocks or default_blocks(max_batch_size, 64, sup.block_size)) if sup.paged else 0
    engine = Engine(sup, Tokens(), deadline=StepDeadline(1, 10, 20), max_queued_requests=16,
                    max_batch_size=max_batch_size, prefill_chunk_tokens=chunk, max_request_faults=2, resume_wait_s=5,
                    decode_steps_per_call=decode_steps_per_call, context_len=64, kv_cache_blocks=blocks,
                    kv_block_size=sup.block_size, metrics=metrics)
    engine.start()
    if together:
        engine.submit_all(reqs)
    for r in [] if together else reqs:
        engine.submit(r)
        if delay_s:
            await asyncio.sleep(delay_s)
    outcomes = {}
    for r in reqs:
        text = ""
        while True:
            ev = await asyncio.wait_for(r.events.get(), 10)
            if isinstance(ev, TextDelta):
                text += ev.text
            else:
                outcomes[r.request_id] = (ev, text)
                break
    await engine.stop()
    return engine, outcomes


def text_of(tokens):
    return Tokens().decode(tokens)


PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [1, 2], "c": [40, 41, 42, 43]}


def test_requests_batch_together_and_each_gets_its_own_answer():
    sup = FakeSupervisor()
    reqs = [request(k, v, 6) for k, v in PROMPTS.items()]
    engine, out = asyncio.run(run(sup, reqs))
    for k, v in PROMPTS.items():
        assert isinstance(out[k][0], Finished) and out[k][1] == text_of(expected(v, 6))
    decodes = [c for c in sup.calls if isinstance(c, p.Decode)]
    assert max(len(c.slots) for c in decodes) == 3  # they decoded together
    assert engine.stats["max_batch_seen"] == 3
    # At most 3 prompt tokens per prefill step (the chunk budget), oldest request first: "a" (7 tokens) went in
    # chunks of 3, 3, 1; "b" (2) joined a's last chunk; then "c" (4) in 3 + 1.
    steps = [[(c.slot, len(c.token_ids), c.last) for c in call.chunks] for call in sup.calls
             if isinstance(call, p.Prefill)]
    assert steps == [[(0, 3, False)], [(0, 3, False)], [(0, 1, True), (1, 2, True)], [(2, 3, False)],
                     [(2, 1, True)]], steps


def test_more_requests_than_slots_wait_for_one():
    sup = FakeSupervisor()
    reqs = [request(k, v, 4) for k, v in PROMPTS.items()]
    _, out = asyncio.run(run(sup, reqs, max_batch_size=1))
    assert all(out[k][1] == text_of(expected(v, 4)) for k, v in PROMPTS.items())
    assert all(len(c.slots) == 1 for c in sup.calls if isinstance(c, p.Decode))


def test_a_death_replays_every_request_and_streams_continue_exactly():
    # Call 9 is a decode step of the batch: a rank died. Nobody is blamed for good; all are replayed.
    sup = FakeSupervisor({9: RankDied(1, -9)})
    reqs = [request(k, v, 6) for k, v in PROMPTS.items()]
    engine, out = asyncio.run(run(sup, reqs))
    for k, v in PROMPTS.items():
        assert isinstance(out[k][0], Finished), out[k]
        assert out[k][1] == text_of(expected(v, 6))  # no token lost, none repeated
    assert engine.stats["replayed"] >= 1 and engine.stats["failed"] == 0
    replays = [c for call in sup.calls[9:] if isinstance(call, p.Prefill) for c in call.chunks
               if c.start == 0 and c.drawn > 0]
    assert replays, "replays prefill prompt + tokens so far, continuing the draw count"


def test_a_replay_tells_the_ranks_what_each_sequence_generated_if_its_sampling_needs_it():
    """Penalties and grammars are part of a sequence's sampling state: a replay's last prefill chunk carries the
    tokens generated so far (`history`), from which the ranks rebuild the penalty counts or the matcher. Here the
    fault comes after several decode calls, so the history is many tokens long, and only the penalized request
    sends one."""
    sup = FakeSupervisor({8: RankDied(1, -9)})  # the fifth decode call: "a" has drawn 6 tokens
    penalized = GenerationRequest("a", PROMPTS["a"], 12, p.SamplingParams(temperature=0.0, frequency_penalty=0.5))
    plain = request("c", PROMPTS["c"], 12)
    engine, out = asyncio.run(run(sup, [penalized, plain], decode_steps_per_call=2))
    assert engine.stats["replayed"] == 2
    replays = {}  # slot -> the prompt it replays (its first chunk) and its last chunk
    for call in sup.calls[8:]:
        for c in call.chunks if isinstance(call, p.Prefill) else ():
            if c.start == 0:
                replays[c.slot] = [c.token_ids[0], None]
            if c.last and c.slot in replays:
                replays[c.slot][1] = c
    histories = {}
    for first, last in replays.values():
        name = next(k for k, v in PROMPTS.items() if v[0] == first)
        histories[name] = (last.drawn, last.history)
    drawn_a, history_a = histories["a"]
    assert drawn_a >= 4, "the fault came after several decode calls"
    assert history_a == tuple(expected(PROMPTS["a"], drawn_a)), "a replay must send the tokens so far"
    assert histories["c"][1] == (), "a sequence whose sampling needs no history sends none"
    for k in ("a", "c"):
        assert out[k][1] == text_of(expected(PROMPTS[k], 12))


def test_an_error_in_a_single_request_step_fails_that_request_only():
    # Call 1 is "a"'s first prefill chunk: the rank raised about it. "b" and "c" are not involved.
    sup = FakeSupervisor({1: RankFailed(0, p.FaultKind.OUT_OF_MEMORY, "CUDA out of memory")})
    reqs = [request(k, v, 5) for k, v in PROMPTS.items()]
    engine, out = asyncio.run(run(sup, reqs))
    assert isinstance(out["a"][0], Failed) and out["a"][0].code == "out_of_memory" and out["a"][0].status == 503
    for k in ("b", "c"):
        assert out[k][1] == text_of(expected(PROMPTS[k], 5))
    failed = [o for o in sup.events.seen if o.event is Event.REQUEST_FAILED]
    assert [o.request_id for o in failed] == ["a"] and failed[0].incident == "incident1"


def test_request_in_repeated_faults_is_quarantined_and_named():
    # "a" alone: its decode steps time out twice (a wedge says nothing about the cause: strike, replay, strike).
    sup = FakeSupervisor({3: StepTimeout([1], 1.0, "decode"), 6: StepTimeout([1], 1.0, "decode")})
    engine, out = asyncio.run(run(sup, [request("a", [5, 6], 8)]))
    ev = out["a"][0]
    assert isinstance(ev, Failed) and ev.code == "request_quarantined" and ev.status == 500
    assert engine.stats["quarantined"] == 1
    failed = [o for o in sup.events.seen if o.event is Event.REQUEST_FAILED]
    assert failed[-1].request_id == "a" and failed[-1].cause == "request_quarantined"
    assert failed[-1].incident == "incident6" and failed[-1].faults == 2


def test_errors_in_a_batch_strike_everyone_in_it_but_fail_nobody_at_once():
    sup = FakeSupervisor()
    reqs = [request(k, v, 6) for k, v in PROMPTS.items()]

    async def go():
        # Fault the first decode step that holds all three.
        orig = sup.call

        async def call(make, deadline_s, what, request_id=None):
            cmd = make(0)
            if isinstance(cmd, p.Decode) and len(cmd.slots) == 3 and not getattr(sup, "done", False):
                sup.done = True
                sup.faults[len(sup.calls) + 1] = RankFailed(1, p.FaultKind.EXCEPTION, "boom")
            return await orig(make, deadline_s, what, request_id)

        sup.call = call
        return await run(sup, reqs)

    engine, out = asyncio.run(go())
    for k, v in PROMPTS.items():
        assert out[k][1] == text_of(expected(v, 6)), k
    assert all(r.faults == 1 for r in reqs)
    assert engine.stats["failed"] == 0


def test_cancelled_request_leaves_the_batch():
    sup = FakeSupervisor(paged=False)  # the static cache (no rows)
    a, b = request("a", [5, 6], 50), request("b", [7], 6)

    async def go():
        engine = Engine(sup, Tokens(), deadline=StepDeadline(1, 10, 20), max_queued_requests=16, max_batch_size=4,
                        prefill_chunk_tokens=8)
        engine.start()
        engine.submit(a)
        engine.submit(b)
        await asyncio.wait_for(a.events.get(), 5)
        a.cancelled = True
        while not isinstance(await asyncio.wait_for(b.events.get(), 5), Finished):
            pass
        await asyncio.sleep(0.05)
        await engine.stop()
        return engine

    engine = asyncio.run(go())
    assert engine.stats["cancelled"] == 1 and engine.stats["last_cancelled_tokens"] < 50
    last_decodes = [c.slots for c in sup.calls if isinstance(c, p.Decode)][-2:]
    assert all(0 not in slots for slots in last_decodes)


@pytest.mark.parametrize("gone", [False, True])
def test_interrupted_requests_wait_at_most_resume_wait(gone):
    """If the repair takes longer than resume_wait_s (or gives up), the interrupted request gets a 503."""
    sup = FakeSupervisor({2: RankDied(0, -9)}, paged=False)
    sup._repaired = (lambda: setattr(sup, "state", "unloaded")) if gone else (lambda: None)

    metrics = MetricsSink()

    async def go():
        engine = Engine(sup, Tokens(), deadline=StepDeadline(1, 10, 20), max_queued_requests=16, max_batch_size=4,
                        resume_wait_s=0.3, metrics=metrics)
        engine.start()
        r = request("a", [5, 6], 8)
        engine.submit(r)
        while not isinstance(ev := await asyncio.wait_for(r.events.get(), 5), Failed):
            pass
        await engine.stop()
        return engine, ev

    engine, ev = asyncio.run(go())
    assert ev.status == 503 and ev.code == "model_unavailable" and ev.retry_after_s
    # Counted like every other ending: a failure, and (unless recovery gave up) one of its own kind, which is
    # what says resume_wait_s is shorter than the repairs.
    expired = 0 if gone else 1
    assert (engine.stats["failed"], engine.stats["repair_wait_expired"]) == (1, expired), engine.stats
    counts = {s.labels["outcome"]: s.value for s in metrics.requests.collect()[0].samples
              if s.name == "neurond_requests_total"}
    assert counts.get("failed") == 1 and counts.get("repair_wait_expired", 0) == expired, counts


def test_a_request_struck_before_is_prefilled_alone():
    """After a fault in a prefill step of several requests, each of them is prefilled alone, so a request whose
    prompt faults deterministically fails by itself and the others complete."""
    sup = FakeSupervisor()
    real_call = sup.call

    async def call(make, deadline_s, what, request_id=None):
        cmd = make(0)
        if isinstance(cmd, p.Prefill) and any(c.slot == 0 and c.token_ids[:1] == (66,) for c in cmd.chunks):
            sup.faults[len(sup.calls) + 1] = RankFailed(0, p.FaultKind.OUT_OF_MEMORY, "CUDA out of memory")
        return await real_call(make, deadline_s, what, request_id)

    sup.call = call
    bad = request("bad", [66, 1, 1], 4)
    good = [request(k, v, 4) for k, v in (("b", [1, 2]), ("c", [7]))]
    engine, out = asyncio.run(run(sup, [bad, *good], chunk=16))
    assert isinstance(out["bad"][0], Failed) and out["bad"][0].code == "out_of_memory"
    for r in good:
        assert out[r.request_id][1] == text_of(expected(r.prompt_ids, 4))
    assert bad.faults == 1 and all(r.faults == 1 for r in good)  # one shared strike, then isolation


def test_several_decode_steps_per_call_give_the_same_streams():
    """With decode_steps_per_call=4 the leader calls the ranks once per 4 tokens while nobody waits for a prefill;
    tokens past a request's end (max_tokens, here 6 and 9) are dropped, and every stream is exact."""
    sup = FakeSupervisor()
    reqs = [request("a", PROMPTS["a"], 6), request("b", PROMPTS["b"], 9)]
    _, out = asyncio.run(run(sup, reqs, chunk=16, decode_steps_per_call=4))
    assert out["a"][1] == text_of(expected(PROMPTS["a"], 6))
    assert out["b"][1] == text_of(expected(PROMPTS["b"], 9))
    steps = [c.steps for c in sup.calls if isinstance(c, p.Decode)]
    assert max(steps) == 4 and sum(steps) < 9  # fewer calls than tokens
    # never past the smallest remaining max_tokens of the batch: a's 5 decode tokens end a call exactly
    assert steps[0] == 4 and steps[1] == 1


def _run_group(sup, n: int, prompt: list[int], max_tokens: int, max_batch_size: int = 4, **kw):
    reqs = [request(f"c{i}", prompt, max_tokens) for i in range(n)]
    engine, out = asyncio.run(run(sup, reqs, max_batch_size=max_batch_size, chunk=4, together=True, **kw))
    return engine, reqs, out


def test_n_choices_share_the_prompts_whole_blocks_with_a_paged_cache():
    """No copy command: the others' rows start with the prefiller's two whole blocks of the shared 10 tokens
    (the fake checks that every position read was written, and that nobody writes into a block two rows
    hold), and each prefills positions 8-10 itself."""
    sup = FakeSupervisor(block_size=4)
    prompt = list(range(10, 21))
    metrics = MetricsSink()  # the prefix counters only grow (a counter that would fall stalled the engine once)
    engine, reqs, out = _run_group(sup, 3, prompt, 5, metrics=metrics)
    assert all(isinstance(ev, Finished) and text == text_of(expected(prompt, 5)) for ev, text in out.values())
    text = metrics.render()[0].decode()
    assert 'neurond_prefix_cache_tokens_total{result="hit"} 16.0' in text  # two choices x two shared blocks
    assert 'neurond_prefix_cache_tokens_total{result="miss"} 17.0' in text  # 11 + 3 + 3
    assert not [c for c in sup.calls if isinstance(c, p.CopyPrefix)] and sup.shared_writes == 0
    chunks = [c for call in sup.calls if isinstance(call, p.Prefill) for c in call.chunks]
    assert sum(len(c.token_ids) for c in chunks if c.start < 8) == 8, "a shared whole block was prefilled twice"
    assert sorted((c.start, len(c.token_ids)) for c in chunks if c.start >= 8) == [(8, 2), (8, 3), (8, 3), (10, 1)]


def test_n_choices_prefill_their_prompt_once_and_copy_it_with_the_static_cache():
    sup = FakeSupervisor(paged=False)
    prompt = list(range(10, 21))  # 11 tokens: three chunks of 4 for the shared 10
    engine, reqs, out = _run_group(sup, 3, prompt, 5)
    assert all(isinstance(ev, Finished) and text == text_of(expected(prompt, 5)) for ev, text in out.values())
    shared = [c for call in sup.calls if isinstance(call, p.Prefill) for c in call.chunks if c.start < 10]
    assert sum(len(c.token_ids) for c in shared) == 10, "the shared prompt was prefilled more than once"
    copies = [c for c in sup.calls if isinstance(c, p.CopyPrefix)]
    assert len(copies) == 1 and copies[0].length == 10 and len(copies[0].dsts) == 2
    lasts = [c for call in sup.calls if isinstance(call, p.Prefill) for c in call.chunks if c.last]
    assert sorted(c.slot for c in lasts) == [0, 1, 2] and all(c.start == 10 for c in lasts)


def test_n_choices_with_too_few_slots_still_share_and_a_fault_replays_them_all():
    # Two slots for three choices: the third copies from a member still holding the prompt, or prefills it.
    sup = FakeSupervisor()
    prompt = list(range(30, 39))
    _, _, out = _run_group(sup, 3, prompt, 6, max_batch_size=2)
    assert all(text == text_of(expected(prompt, 6)) for _, text in out.values())
    # A death in the group's decode: every choice is replayed and continues exactly.
    sup = FakeSupervisor({7: RankDied(1, -9)})
    engine, _, out = _run_group(sup, 3, prompt, 6)
    assert all(isinstance(ev, Finished) and text == text_of(expected(prompt, 6)) for ev, text in out.values())
    assert engine.stats["replayed"] >= 3


# ---------------------------------------------------------------------------------------------- paged KV cache
def test_a_short_kv_cache_preempts_and_replays_and_every_stream_is_exact():
    """Three requests growing past 12 blocks of 4 positions: the last admitted give their blocks back and are
    replayed (prompt + tokens so far); the streams are the same as with room for all."""
    sup = FakeSupervisor(block_size=4)
    reqs = [request(k, v, 14) for k, v in PROMPTS.items()]  # 21, 16 and 18 positions: 6 + 4 + 5 blocks
    metrics = MetricsSink()
    engine, out = asyncio.run(run(sup, reqs, decode_steps_per_call=4, kv_cache_blocks=12, metrics=metrics))
    for k, v in PROMPTS.items():
        assert isinstance(out[k][0], Finished) and out[k][1] == text_of(expected(v, 14)), out[k]
    assert engine.stats["preempted"] >= 1 and engine.stats["failed"] == 0
    assert engine.scheduler.pool.used == 0  # every block given back
    # A replay (prompt + tokens so far, continuing the draw count) prefills only what the prefix cache lost: the
    # full blocks it wrote before its preemption may still be cached (if nobody needed them since).
    replays = [c for call in sup.calls if isinstance(call, p.Prefill) for c in call.chunks if c.drawn > 0]
    assert replays, "a preempted request is replayed: prompt + tokens so far, continuing the draw count"
    assert sup.shared_writes == 0
    text = metrics.render()[0].decode()
    assert f"neurond_preemptions_total {float(engine.stats['preempted'])}" in text
    assert 'neurond_kv_cache_blocks{state="total"} 12.0' in text


def test_the_default_kv_cache_never_preempts_and_every_row_is_sent():
    sup = FakeSupervisor()
    reqs = [request(k, v, 20) for k, v in PROMPTS.items()]
    engine, out = asyncio.run(run(sup, reqs, decode_steps_per_call=8))
    assert all(out[k][1] == text_of(expected(v, 20)) for k, v in PROMPTS.items())
    assert engine.stats["preempted"] == 0
    assert engine.scheduler.pool.num_blocks == 4 * 5  # max_batch_size x blocks of context_len + 1 = 65 positions
    assert isinstance(sup.calls[0], p.Prefill) and sup.calls[0].tables[0].start == 0


def test_a_fault_sends_every_row_afresh_and_n_choices_share_blocks_again_after_it():
    sup = FakeSupervisor({7: RankDied(1, -9)}, block_size=4)
    prompt = list(range(30, 39))  # 9 tokens: the shared 8 are two whole blocks
    engine, _, out = _run_group(sup, 3, prompt, 6)
    assert all(isinstance(ev, Finished) and text == text_of(expected(prompt, 6)) for ev, text in out.values())
    after = next(c for c in sup.calls[7:] if c.tables)
    assert sorted(r.slot for r in after.tables) == [0, 1, 2, 3] and all(r.start == 0 for r in after.tables)

    def sharing(calls) -> bool:  # a command whose rows give two slots the same two first blocks
        return any(len({r.blocks[:2] for r in c.tables if len(r.blocks) >= 2}) < sum(
            len(r.blocks) >= 2 for r in c.tables) for c in calls if getattr(c, "tables", ()))

    # The fake checked every read and that nobody wrote into a block two rows held.
    assert not any(isinstance(c, p.CopyPrefix) for c in sup.calls) and sup.shared_writes == 0
    assert sharing(sup.calls[:6]) and sharing(sup.calls[7:]), "the choices shared no blocks, before or after"


def test_a_request_the_kv_cache_could_never_hold_is_refused_with_its_numbers():
    async def submit():
        engine = Engine(FakeSupervisor(block_size=4), Tokens(), deadline=StepDeadline(1, 10, 20),
                        max_queued_requests=16, max_batch_size=4, context_len=64, kv_cache_blocks=4, kv_block_size=4)
        assert engine.kv_positions == 16
        engine.submit(request("fits", [1] * 10, 6))
        with pytest.raises(RequestTooLarge, match=r"= 17 tokens need 5 KV cache blocks .* has 4 blocks"):
            engine.submit_all([request("ok", [1] * 4, 4), request("too-long", [1] * 10, 7)])
        assert [r.request_id for r in engine.scheduler.waiting] == ["fits"]  # all or none

    asyncio.run(submit())


def test_blocks_measured_by_the_ranks_size_the_pool_before_the_first_admission():
    """kv_cache_blocks = -1: the ranks measured how many blocks fit at their first load, and the supervisor
    serves only once it knows: the engine's pool takes that size before it admits anyone, and the limits it
    states follow (a request that would have fit the static cache's count is refused with the measured one)."""
    async def serve():
        sup = FakeSupervisor(block_size=4)
        sup.kv_blocks = 5
        engine = Engine(sup, Tokens(), deadline=StepDeadline(1, 10, 20), max_queued_requests=16, max_batch_size=4,
                        context_len=64, kv_cache_blocks=-1, kv_block_size=4)
        assert engine.scheduler.paged
        assert engine.kv_positions == 20
        with pytest.raises(RequestTooLarge, match=r"has 5 blocks"):
            engine.submit(request("too-long", [1] * 15, 8))
        engine.start()
        reqs = [request(f"r{i}", [i + 1] * 6, 6) for i in range(3)]  # 3 x 3 blocks > 5: one waits or is preempted
        for r in reqs:
            engine.submit(r)
        for r in reqs:
            while not isinstance(ev := await asyncio.wait_for(r.events.get(), 10), Finished | Failed):
                pass
            assert isinstance(ev, Finished), ev
        assert engine.scheduler.pool.num_blocks == 5 and sup.shared_writes == 0
        await engine.stop()

    asyncio.run(serve())


async def _one_by_one(sup, prompts, *, n=6, between=None, metrics=None, max_batch_size=4, together_after=()):
    """Each prompt's request after the one before finished (`between()` in between); then the requests of
    `together_after` at once. One engine, so its prefix cache lives on between them."""
    engine = Engine(sup, Tokens(), deadline=StepDeadline(1, 10, 20), max_queued_requests=16,
                    max_batch_size=max_batch_size, prefill_chunk_tokens=8, max_request_faults=2, resume_wait_s=5,
                    context_len=64, kv_cache_blocks=40, kv_block_size=sup.block_size, metrics=metrics)
    engine.start()

    async def finish(r):
        text = ""
        while not isinstance(ev := await asyncio.wait_for(r.events.get(), 10), Finished | Failed):
            text += ev.text
        return ev, text

    out = []
    for i, prompt in enumerate(prompts):
        if i and between is not None:
            between()
        r = request(f"r{i}", prompt, n)
        engine.submit(r)
        out.append(await finish(r))
    reqs = [request(f"t{i}", prompt, n) for i, prompt in enumerate(together_after)]
    for r in reqs:
        engine.submit(r)
    out += [await finish(r) for r in reqs]
    await engine.stop()
    return engine, out


LONG = [(i * 7) % 50 + 3 for i in range(30)]  # a 30-token "system prompt": 7 full blocks of 4 and 2 tokens


def test_a_second_request_with_the_same_long_prompt_prefills_only_its_tail_and_gets_the_same_answer():
    sup = FakeSupervisor(block_size=4)
    metrics = MetricsSink()
    engine, out = asyncio.run(_one_by_one(sup, [LONG, LONG, LONG + [9, 9, 9, 9, 9, 9]], metrics=metrics))
    assert [o[1] for o in out[:2]] == [text_of(expected(LONG, 6))] * 2
    assert out[2][1] == text_of(expected(LONG + [9] * 6, 6))
    starts = [[c.start for c in call.chunks] for call in sup.calls if isinstance(call, p.Prefill)]
    # The first prefills 30 tokens in chunks of 8; the second only its last 2 (29 at most could be matched: 7
    # blocks); the third (36 tokens) the same 7 blocks: the eighth cached one holds an answer's tokens, not 9s.
    assert starts[:4] == [[0], [8], [16], [24]] and starts[4] == [28]
    assert starts[5][0] == 28
    assert sup.shared_writes == 0 and engine.scheduler.pool.used == 0
    text = metrics.render()[0].decode()
    assert 'neurond_prefix_cache_tokens_total{result="hit"} 56.0' in text
    assert 'neurond_prefix_cache_tokens_total{result="miss"} 40.0' in text  # 30 + 2 + 8
    assert f'neurond_kv_cache_blocks{{state="cached"}} {float(engine.scheduler.pool.cached)}' in text


def test_running_requests_share_a_prefix_and_never_write_into_it():
    """Requests with the same prompt running together (several decode steps, idle rows writing their trash):
    every write lands in a block only its own row holds, and every answer is the one it gets alone."""
    sup = FakeSupervisor(block_size=4)
    tails = [LONG + [i] * (i + 1) for i in range(4)]
    engine, out = asyncio.run(_one_by_one(sup, [LONG], together_after=tails + [LONG]))
    assert [o[1] for o in out] == [text_of(expected(t, 6)) for t in [LONG, *tails, LONG]]
    assert engine.scheduler.prefix_hits >= 5 * 28 and sup.shared_writes == 0


def test_a_repair_while_nothing_ran_drops_the_prefix_cache():
    sup = FakeSupervisor(block_size=4)

    def repaired_while_idle():  # new rank processes: empty caches, and the supervisor's epoch moved on
        sup.kv.clear()
        sup.epoch += 1

    engine, out = asyncio.run(_one_by_one(sup, [LONG, LONG], between=repaired_while_idle))
    assert [o[1] for o in out] == [text_of(expected(LONG, 6))] * 2
    assert engine.scheduler.prefix_hits == 0
