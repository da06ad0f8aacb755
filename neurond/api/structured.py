"""Structured output: a request's `response_format` (or a forced tool call) as the grammar its ranks enforce.

The grammar is llguidance's (the ranks' `worker/grammar.py` runs it); it is made and validated here, in the
leader, so a schema llguidance cannot follow is the client's 400 and never reaches a rank. JSON is generated
compact (no whitespace between tokens is allowed): a model that could add whitespace forever might never
close its object, and OpenAI's JSON answers are compact too.
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
    return checked(json_schema_grammar(schema if schema is not None else {}), end_ids,
                   "response_format.json_schema.schema")
