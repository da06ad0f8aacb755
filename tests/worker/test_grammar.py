"""Constrained decoding on the rank: every token a grammar's sequence draws keeps it inside the grammar, the
sequence ends with an end token once the grammar is complete, and a replay continues in the same state."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
llguidance = pytest.importorskip("llguidance")

from neurond.protocol import Grammar, PrefillChunk, SamplingParams  # noqa: E402
from neurond.worker.grammar import Constraints, GrammarError  # noqa: E402
from tests.harness import ranks  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days", "unit"],
          "properties": {"city": {"type": "string", "maxLength": 12},
                         "days": {"type": "integer", "minimum": 1, "maximum": 14},
                         "unit": {"enum": ["celsius", "fahrenheit"]}}}


@pytest.fixture(scope="module")
def end_ids(builtin_model):
    from neurond.engine.tokenizer import ChatTokenizer

    tok = ChatTokenizer(builtin_model)
    return tuple(sorted({tok.eos_token_id, tok.encode("<|eot_id|>")[0]})), tok


def grammar(end_ids) -> Grammar:
    text = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    return Grammar(text, end_ids)


def run(runner, slot, prompt, params, n, steps, drawn=0, history=()) -> list[int]:
    """Prefill `prompt` into `slot`, then decode `steps` tokens per call until an end token or n tokens."""
    out = [runner.prefill([PrefillChunk(slot, tuple(prompt), 0, True, params, drawn, tuple(history))])[0]]
    while len(out) < n and out[-1] not in params.grammar.end_ids:
        out += runner.decode((slot,), steps=steps)
    cut = next((i for i, t in enumerate(out) if t in params.grammar.end_ids), None)
    return out if cut is None else out[: cut + 1]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("steps", [1, 4])
def test_random_weights_write_json_that_validates(shard, end_ids, temperature, steps):
    ends, tok = end_ids
    runner = ranks.runner(shard, slots=2, max_len=512)
    params = SamplingParams(temperature=temperature, seed=11, grammar=grammar(ends))
    tokens = run(runner, 0, tok.encode("Weather for Paris, please."), params, 300, steps)
    assert tokens[-1] in ends, "the grammar was complete and the sequence ended"
    answer = json.loads(tok.decode(tokens[:-1]))
    assert set(answer) == {"city", "days", "unit"} and 1 <= answer["days"] <= 14 and len(answer["city"]) <= 12
    assert answer["unit"] in ("celsius", "fahrenheit")


def test_an_unconstrained_row_beside_a_constrained_one_draws_as_alone(shard, end_ids):
    """The mask is per row: a sequence without a grammar in the same batch is not touched by it."""
    ends, tok = end_ids
    prompt = tok.encode("Hello! How are you today?")
    free = SamplingParams(temperature=0.0)
    alone = ranks.runner(shard, slots=2, max_len=256)
    want = [alone.prefill([PrefillChunk(1, tuple(prompt), 0, True, free, 0)])[0]] + alone.decode((1,), steps=8)
    both = ranks.runner(shard, slots=2, max_len=256)
    chunks = [PrefillChunk(0, tuple(prompt), 0, True, SamplingParams(temperature=0.0, grammar=grammar(ends)), 0),
              PrefillChunk(1, tuple(prompt), 0, True, free, 0)]
    first = both.prefill(chunks)
    decoded = both.decode((0, 1), steps=8)
    assert [first[1]] + decoded[1::2] == want
    assert first[0] == tok.encode('{"')[0] or tok.decode([first[0]]).startswith("{")


def test_a_replay_continues_in_the_same_grammar_state(shard, end_ids):
    """After a fault the leader prefills prompt + tokens so far with the history: the rank's new matcher
    consumes it and the sequence draws exactly what it drew before."""
    ends, tok = end_ids
    prompt = tok.encode("Weather for Paris, please.")
    params = SamplingParams(temperature=1.0, seed=5, grammar=grammar(ends))
    make = lambda: ranks.runner(shard, slots=2, max_len=512)  # noqa: E731
    first = run(make(), 0, prompt, params, 300, 1)
    assert len(first) > 8
    cut = 6
    replayed = first[:cut] + run(make(), 1, prompt + first[:cut], params, 300, 3, drawn=cut, history=first[:cut])
    assert replayed == first


def test_a_token_outside_the_grammar_is_a_grammar_error(builtin_model, end_ids):
    ends, tok = end_ids
    c = Constraints(str(builtin_model), 1024)
    c.start(3, grammar(ends))
    assert 3 in c and 2 not in c
    allowed = c.allowed([2, 3], torch.device("cpu"))
    assert allowed[0].all() and 0 < int(allowed[1].sum()) < 1024
    bad = next(i for i in range(1024) if not allowed[1, i])
    with pytest.raises(GrammarError):
        c.advance(3, bad)
    with pytest.raises(GrammarError):
        c.start(4, grammar(ends), history=(bad,))
    c.start(3, None)
    assert 3 not in c
