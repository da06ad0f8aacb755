"""response_format (json_object, json_schema) and tool calling, end to end with the official openai client
against a real daemon. The built-in model has random weights: every answer that parses and validates does so
because constrained decoding made it, which is the strongest test there is of it."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.conftest import MODEL

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days", "unit", "tags"],
          "properties": {"city": {"type": "string", "maxLength": 16},
                         "days": {"type": "integer", "minimum": 1, "maximum": 14},
                         "unit": {"enum": ["celsius", "fahrenheit"]},
                         "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA, "strict": True}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}}}}
TOOLS = [WEATHER, CLOCK]
ASK = [{"role": "user", "content": "What is the weather like in Paris? Answer briefly."}]


def _ask(client, **kw):
    kw.setdefault("max_tokens", 160)
    return client.chat.completions.create(model=MODEL, messages=ASK, **kw)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_answers_validate_plain_and_streamed(client, temperature):
    out = _ask(client, response_format=JSON_SCHEMA, temperature=temperature, seed=3, n=4)
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    streamed = list(_ask(client, response_format=JSON_SCHEMA, temperature=temperature, seed=3, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == out.choices[0].message.content  # choice 0 draws with the same seed


def test_json_object_answers_are_json_objects(client):
    """Any object: random weights write long keys and strings, so an answer may run to max_tokens (that one is
    an object cut short); every answer that ended by itself parses as an object."""
    out = _ask(client, response_format={"type": "json_object"}, temperature=1.0, seed=1, n=8, max_tokens=300)
    stopped = [c for c in out.choices if c.finish_reason == "stop"]
    assert len(stopped) >= 2  # of 8 with this seed (deterministic)
    assert all(isinstance(json.loads(c.message.content), dict) for c in stopped)
    assert all(c.message.content.startswith("{") for c in out.choices)


def test_a_forced_tool_call_parses_and_validates_plain_and_streamed(client):
    for choice_arg, names in (("required", {"get_weather", "get_time"}),
                              ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
        out = _ask(client, tools=TOOLS, tool_choice=choice_arg, temperature=1.0, seed=5, n=3)
        for choice in out.choices:
            assert choice.finish_reason == "tool_calls"
            (call,) = choice.message.tool_calls
            assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
            params = next(t for t in TOOLS if t["function"]["name"] == call.function.name)["function"]["parameters"]
            jsonschema.validate(json.loads(call.function.arguments), params)
    out = _ask(client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=5)
    chunks = [c for c in _ask(client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=5, stream=True)
              if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(0, c.function.name, json.loads(c.function.arguments)) for c in out.choices[0].message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)  # the call is not also sent as text


def test_tool_results_go_back_through_the_template_and_auto_or_none_leave_text(client, tokenizer):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=8, temperature=0)
    rendered = tokenizer.render([*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "content": "18 degrees and sunny"}], tools=TOOLS)
    assert '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}' in rendered
    assert "ipython<|end_header_id|>\n\n18 degrees and sunny" in rendered
    assert out.usage.prompt_tokens == len(tokenizer.encode(rendered))
    # Random weights do not call a tool on their own: auto and none answer in text (parsed, found no call).
    for tool_choice in ("auto", "none"):
        answer = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice=tool_choice,
                                                max_tokens=8, temperature=0)
        assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason == "length"
        assert answer.choices[0].message.content == out.choices[0].message.content


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format.json_schema.schema", "frob"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"anyOf": []}}}},
     "response_format.json_schema.schema", "anyOf"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is required"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "text"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None, "'nope'"),
    ({"tool_choice": "required"}, None, "no tools"),
    ({"tools": [WEATHER, WEATHER]}, None, "same name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", "pattern"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, None,
     "response_format cannot apply"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0", "tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                                         "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages.0.tool_calls.0.function.arguments", "JSON object"),
])
def test_bad_structured_requests_are_a_clear_400(daemon_tp1, body, param, needle):
    status, _, answer = daemon_tp1.chat({"model": MODEL, "messages": ASK, "max_tokens": 4, **body})
    assert status == 400, answer
    assert answer["error"]["param"] == param and needle in answer["error"]["message"], answer


def test_the_openapi_description_lists_tools_and_response_format(daemon_tp1):
    schema = daemon_tp1.get("/openapi.json")[2]["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"tools", "tool_choice", "response_format", "parallel_tool_calls"} <= set(schema)


def _nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"], "additionalProperties": False}
    return schema


@pytest.mark.parametrize("schema", [
    _nested(200),
    {"type": "string", "pattern": "^(a*)*b$", "maxLength": 30},
    {"enum": [f"value-{i}" for i in range(20_000)]},
    {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 5000},
    {"type": "string", "format": "email"},
], ids=["nested-200", "catastrophic-regex", "enum-20000", "minItems-5000", "format-email"])
def test_hostile_schemas_end_in_an_answer_or_a_400_and_serving_goes_on(daemon_tp1, schema):
    import time

    t0 = time.monotonic()
    status, _, answer = daemon_tp1.chat({"model": MODEL, "messages": ASK, "max_tokens": 16, "response_format": {
        "type": "json_schema", "json_schema": {"name": "h", "schema": schema}}})
    assert status in (200, 400), answer
    if status == 400:
        assert answer["error"]["param"] == "response_format.json_schema.schema"
    assert time.monotonic() - t0 < 30
    assert daemon_tp1.chat({"model": MODEL, "messages": ASK, "max_tokens": 2})[0] == 200


def test_text_held_back_as_a_possible_call_is_sent_as_content_when_the_answer_is_cut_short(client, tokenizer):
    """With tools, an answer that starts like a Llama JSON call is held back while streaming; one that then runs
    to max_tokens is no call: the held text arrives as content, as the plain answer has it."""
    brace = tokenizer.encode("{")
    assert len(brace) == 1
    kw = dict(tools=TOOLS, max_tokens=6, temperature=0, logit_bias={str(brace[0]): 100})
    plain = _ask(client, **kw).choices[0]
    assert plain.finish_reason == "length" and plain.message.tool_calls is None
    assert plain.message.content.startswith("{")
    chunks = [c for c in _ask(client, stream=True, **kw) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.message.content
    assert chunks[-1].choices[0].finish_reason == "length"


# A pydantic model's schema as agent frameworks send it: nested objects, a list of them, bounded strings, enums and
# ranged integers, and no word about other keys (JSON Schema's default: any allowed).
TRIP = {"type": "object", "title": "Trip", "required": ["city", "nights", "mode", "stops"],
        "properties": {"city": {"type": "string", "maxLength": 12},
                       "nights": {"type": "integer", "minimum": 1, "maximum": 9},
                       "mode": {"enum": ["train", "car", "plane"]},
                       "stops": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/Stop"}}},
        "$defs": {"Stop": {"type": "object", "title": "Stop", "required": ["name", "hours"],
                           "properties": {"name": {"type": "string", "maxLength": 8},
                                          "hours": {"type": "integer", "minimum": 0, "maximum": 48}}}}}


def _no_other_keys(schema: dict) -> dict:
    """TRIP with every object closed: what an answer must also validate under."""
    closed = json.loads(json.dumps(schema))
    closed["additionalProperties"] = False
    closed["$defs"]["Stop"]["additionalProperties"] = False
    return closed


@pytest.mark.parametrize("strict", [True, None])
def test_a_schema_that_says_nothing_of_other_keys_gets_none(client, strict):
    """Objects are closed unless the schema opens them (api/structured.py), strict or not: with the random
    weights, an open object went on inventing keys until max_tokens (issue 33). Five seeds, each answer complete,
    parsed, and valid under the closed schema."""
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": TRIP,
                                                  **({"strict": strict} if strict is not None else {})}}
    for seed in range(5):
        out = _ask(client, response_format=fmt, temperature=1.0, seed=seed, max_tokens=200)
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), _no_other_keys(TRIP))


def test_a_schema_that_opens_its_objects_keeps_them_open():
    """`additionalProperties: true` (or a schema for them, or patternProperties) is the schema's word; objects
    without declared properties stay open (closed, they could only be {}); allOf members are not closed alone."""
    from neurond.api.structured import closed

    schema = {"type": "object", "properties": {
        "free": {"type": "object", "properties": {"a": {}}, "additionalProperties": True},
        "typed": {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "integer"}},
        "pattern": {"type": "object", "properties": {"a": {}}, "patternProperties": {"^x": {}}},
        "bare": {"type": "object"},
        "both": {"allOf": [{"type": "object", "properties": {"a": {}}}, {"properties": {"b": {}}}]},
        "list": {"type": "array", "items": {"type": "object", "properties": {"c": {}}}},
        "either": {"anyOf": [{"type": "object", "properties": {"d": {}}}, {"type": "null"}]}}}
    out = closed(schema)
    props = out["properties"]
    assert out["additionalProperties"] is False
    assert props["free"]["additionalProperties"] is True
    assert props["typed"]["additionalProperties"] == {"type": "integer"}
    assert "additionalProperties" not in props["pattern"] and "additionalProperties" not in props["bare"]
    assert all("additionalProperties" not in member for member in props["both"]["allOf"])
    assert props["list"]["items"]["additionalProperties"] is False
    assert props["either"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the client's schema itself is untouched


def test_a_forced_call_of_a_function_whose_schema_says_nothing_of_other_keys_gets_none(client):
    plan = {"type": "function", "function": {"name": "plan_trip", "parameters": TRIP}}
    for seed in range(3):
        out = _ask(client, tools=[plan], tool_choice={"type": "function", "function": {"name": "plan_trip"}},
                   temperature=1.0, seed=seed, max_tokens=200)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message.content
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), _no_other_keys(TRIP))
