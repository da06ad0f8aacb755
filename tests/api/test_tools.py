"""Tool-call formats without a daemon: detection from the chat template, parsing of both formats, the stream's
hold-back, and the forced call's grammar (a random walk through its masks always ends in a call that parses)."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from neurond.api.tools import ToolCalling, ToolFormat, detect

PARAMS = {"type": "object", "additionalProperties": False, "required": ["city"],
          "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "maximum": 9}}}
FUNCTIONS = {"get_weather": PARAMS, "get_time": {"type": "object", "properties": {}, "additionalProperties": False}}


def test_the_format_is_read_from_the_template(tokenizer):
    assert detect(tokenizer.template_source) is ToolFormat.LLAMA3_JSON  # the built-in model's
    assert detect("{% for m in messages %}<tool_call>\n{{ m.content }}</tool_call>{% endfor %}") is ToolFormat.HERMES
    assert detect("{% for m in messages %}{{ m.content }}{% endfor %}") is None


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), [
    (ToolFormat.LLAMA3_JSON, '{"name": "get_weather", "parameters": {"city": "Oslo"}}', None,
     [("get_weather", {"city": "Oslo"})]),
    (ToolFormat.LLAMA3_JSON, ' {"name": "get_time", "arguments": {}}; {"name": "get_weather", "parameters": '
     '{"city": "Rome"}}', None, [("get_time", {}), ("get_weather", {"city": "Rome"})]),
    (ToolFormat.LLAMA3_JSON, '{"name": "launch", "parameters": {}}', '{"name": "launch", "parameters": {}}', []),
    (ToolFormat.LLAMA3_JSON, '{"name": "get_time", "parameters": {}} and more', None, None),
    (ToolFormat.LLAMA3_JSON, "It is sunny.", "It is sunny.", []),
    (ToolFormat.HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": "{}"}\n</tool_call>', "Let me check.",
     [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    (ToolFormat.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"', None, None),
    (ToolFormat.HERMES, "No call here.", "No call here.", []),
])
def test_parsing_finds_calls_only_where_the_whole_answer_is_calls(fmt, text, content, calls):
    got_content, got = ToolCalling(fmt, FUNCTIONS, "auto").parse(text)
    if calls is None:  # broken: the whole text stays content
        assert (got_content, got) == (text, [])
        return
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert len({c.id for c in got}) == len(got) and all(c.id.startswith("call_") for c in got)


@pytest.mark.parametrize("fmt", list(ToolFormat))
def test_a_stream_sends_text_at_once_and_holds_what_may_be_a_call(fmt):
    call = '{"name": "get_weather", "parameters": {"city": "Oslo"}}' if fmt is ToolFormat.LLAMA3_JSON else \
        'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    stream = ToolCalling(fmt, FUNCTIONS, "auto").stream()
    sent = "".join(stream.feed(call[i : i + 3]) for i in range(0, len(call), 3))
    assert sent == ("" if fmt is ToolFormat.LLAMA3_JSON else "Sure.")
    tail, calls = stream.finish()
    assert tail == "" and [c.name for c in calls] == ["get_weather"]
    text = "Plain text <tool_ no call {here}"
    stream = ToolCalling(fmt, FUNCTIONS, "auto").stream()
    sent = "".join(stream.feed(ch) for ch in text)
    tail, calls = stream.finish()
    assert sent + tail == text and calls == []
    assert len(sent) >= len(text) - len("<tool_call>") or fmt is ToolFormat.LLAMA3_JSON


@pytest.mark.parametrize("fmt", list(ToolFormat))
@pytest.mark.parametrize("choice", ["required", "get_time"])
def test_a_forced_call_grammar_only_admits_calls_that_validate(builtin_model, tokenizer, fmt, choice):
    """A random walk through the grammar's masks (uniform over the allowed tokens: worse than any model) ends
    in an answer that parses into one call of an allowed function with valid arguments."""
    from llguidance import LLMatcher, LLTokenizer

    from neurond.protocol import Grammar

    ends = frozenset({tokenizer.eos_token_id})
    grammar = ToolCalling(fmt, FUNCTIONS, choice).grammar(ends)
    assert isinstance(grammar, Grammar) and ToolCalling(fmt, FUNCTIONS, "auto").grammar(ends) is None
    lltok = LLTokenizer((builtin_model / "tokenizer.json").read_text(), n_vocab=len(tokenizer),
                        eos_token=list(ends))
    for seed in range(4):
        rng, matcher, tokens = random.Random(seed), LLMatcher(lltok, grammar.text), []
        while not matcher.is_stopped() and len(tokens) < 400:
            mask = matcher.compute_bitmask()
            allowed = [i for i in range(len(tokenizer)) if mask[i // 8] >> (i % 8) & 1]
            token = rng.choice(allowed)
            assert matcher.consume_token(token)
            tokens.append(token)
        assert matcher.is_stopped(), tokenizer.decode(tokens)
        content, calls = ToolCalling(fmt, FUNCTIONS, "auto").parse(tokenizer.decode(tokens))
        assert len(calls) == 1 and calls[0].name in (FUNCTIONS if choice == "required" else {choice}), content
        jsonschema.validate(json.loads(calls[0].arguments), FUNCTIONS[calls[0].name])
