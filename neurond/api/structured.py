"""Structured output: a request's `response_format` (or a forced tool call) as the grammar its ranks enforce.

The grammar is llguidance's (the ranks' `worker/grammar.py` runs it); it is made and validated here, in the
leader, so a schema llguidance cannot follow is the client's 400 and never reaches a rank. JSON is generated
compact (no whitespace between tokens is allowed): a model that could add whitespace forever might never
close its object, and OpenAI's JSON answers are compact too.

A client's schema has its objects closed (`closed`): an object that declares its `properties` and says nothing
of others gets exactly those, as OpenAI's strict mode means and vLLM's default grammar backend does, whether or
not the request says `strict`. JSON Schema's own default (anything else allowed) is what agent frameworks get
when they send a pydantic model's schema, and a model that has written every required key then invents keys
until max_tokens: the answer never parses (issue 33, 2 of 4 tries with the built-in model). A schema that wants
other keys says so (`additionalProperties: true` or a schema for them, or `patternProperties`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from neurond.api.errors import APIError
from neurond.protocol import Grammar

if TYPE_CHECKING:
    from neurond.api.schemas import ResponseFormat

#: llguidance's JSON options for every schema neurond compiles (see the module's docstring).
JSON_OPTIONS = {"whitespace_flexible": False}


_OPENS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def closed(schema: dict) -> dict:
    """A copy of `schema` whose objects that declare `properties`, and say nothing of other keys, allow no other
    keys, every level down. The members of an `allOf` are left open themselves (each closed alone, their
    intersection could hold no object), their own subschemas not."""
    out = _closed(schema)
    assert isinstance(out, dict)  # a dict in, a dict out
    return out


def _closed(schema: object, member_of_all_of: bool = False) -> object:
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(sub) for sub in out[key]]
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), (dict, list)):
            out[key] = _closed(out[key])
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [_closed(sub, member_of_all_of=True) for sub in out["allOf"]]
    if "properties" in out and not member_of_all_of and not any(k in out for k in _OPENS):
        out["additionalProperties"] = False
    return out


def json_schema_grammar(schema: dict) -> str:
    """The llguidance grammar of JSON documents valid under `schema`."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)  # type: ignore[arg-type]


def lark_json(schema: dict) -> str:
    """`schema` as a JSON value inside a Lark grammar (llguidance's `%json`), with neurond's JSON options."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def checked(text: str, end_ids: frozenset[int], param: str) -> Grammar:
    """`text` as the request's Grammar, or the client's 400 when llguidance cannot follow it."""
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(text)
    if error:
        raise APIError(400, f"{param}: the schema cannot be enforced: {error}", param=param, code="invalid_value")
    return Grammar(text, tuple(sorted(end_ids)))


def response_format_grammar(response_format: ResponseFormat | None, end_ids: frozenset[int]) -> Grammar | None:
    """The grammar `response_format` asks for (ResponseFormat), or None for plain text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return checked(json_schema_grammar({"type": "object"}), end_ids, "response_format")
    assert response_format.json_schema is not None  # ResponseFormat's validator: it comes with its type
    schema = response_format.json_schema.schema_
    return checked(json_schema_grammar(closed(schema) if schema is not None else {}), end_ids,
                   "response_format.json_schema.schema")
