"""Request bodies of the OpenAI-compatible API, validated before anything reaches a rank.

pydantic gives exact per-field errors (mapped to the OpenAI `param`) and a JSON schema for the OpenAPI
description. Parameters neurond does not implement are accepted only at their no-op value, so a client never
silently gets something other than what it asked for.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from neurond.protocol import MAX_TOP_LOGPROBS

#: n: choices per request at most (each takes a KV cache slot; the prompt is prefilled once for all).
MAX_CHOICES = 16
#: logit_bias: at most this many tokens, each biased by at most this much (OpenAI's range).
MAX_LOGIT_BIAS_TOKENS = 1024
LOGIT_BIAS_RANGE = 100.0


def unsupported(message: str) -> PydanticCustomError:
    """A validation error the API answers as 400 `unsupported_parameter` with exactly `message`."""
    return PydanticCustomError("unsupported_parameter", message)


def _stop_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if len(stops) > 4:
        raise ValueError("at most 4 stop sequences are allowed")
    if any(not s for s in stops):
        raise ValueError("stop sequences must not be empty")
    if any(len(s) > 256 for s in stops):
        raise ValueError("a stop sequence may be at most 256 characters")
    return stops


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=1_000_000)

    def parsed(self) -> dict:
        """The arguments as the object chat templates expect (they write it with `tojson`)."""
        return json.loads(self.arguments)

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError:
            raise ValueError("arguments must be a JSON object (as text)") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON object (as text)")
        return value


class ToolCallIn(BaseModel):
    """A call the assistant made earlier in the conversation."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(max_length=256)
    type: Literal["function"]
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=128)  # assistant messages only
    tool_call_id: str | None = Field(default=None, max_length=256)  # tool messages only: the call answered

    @model_validator(mode="after")
    def _tool_fields(self) -> Self:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        return self

    def template_dict(self) -> dict:
        """The message as chat templates read it (Hugging Face's convention: tool call arguments as objects)."""
        out: dict = {"role": self.role if self.role != "developer" else "system", "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": c.function.parsed()}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`text`, any JSON object (`json_object`) or JSON valid under a schema (`json_schema`); both JSON kinds are
    enforced by constrained decoding (api/structured.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> Self:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only there")
        return self


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    def arguments_schema(self) -> dict:
        """The arguments' JSON schema (OpenAI: none given means a function without parameters)."""
        return self.parameters if self.parameters is not None else \
            {"type": "object", "properties": {}, "additionalProperties": False}


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(max_length=64)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: NamedFunction


class _GenerationRequest(BaseModel):
    """What chat and legacy completions requests share: the model, the sampling and the output's shape."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=512)
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    user: str | None = Field(default=None, max_length=512)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        return _stop_list(value)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if not value:
            return None
        if len(value) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_TOKENS} tokens may be biased")
        for key, bias in value.items():
            if not key.isascii() or not key.isdigit() or len(key) > 10:
                raise ValueError(f"keys must be token ids (non-negative integers as strings), not {key!r}")
            if not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
                raise ValueError(f"the bias of token {key} is {bias}: it must lie in [-100, 100]")
        return value

    def bias(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs, ids ascending (the ids are checked against the vocabulary by
        the app, which knows it)."""
        return tuple(sorted((int(k), float(v)) for k, v in (self.logit_bias or {}).items()))


class ChatCompletionRequest(_GenerationRequest):
    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_completion_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    logprobs: bool = Field(default=False)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _messages_have_content(self) -> Self:
        if all(not m.text().strip() and not m.tool_calls for m in self.messages):
            raise ValueError("messages contain no text")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> Self:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: two functions have the same name")
        choice = self.tool_choice
        if choice in ("required",) or isinstance(choice, NamedToolChoice):
            if not names:
                raise ValueError("tool_choice: a tool call is required but no tools are given")
            if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
                raise ValueError(f"tool_choice: function {choice.function.name!r} is not among the tools")
            if self.response_format is not None and self.response_format.type != "text":
                raise ValueError("tool_choice forces a tool call: response_format cannot apply as well")
        return self

    def tool_choice_name(self) -> str:
        """tool_choice as one word: "none", "auto", "required" or the forced function's name ("auto" when
        tools are given without a choice, "none" without tools)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or ("auto" if self.tools else "none")

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> Self:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs = true")
        return self

    def logprobs_count(self) -> int:
        """SamplingParams.logprobs: -1 none, else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else -1

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


#: The longest prompt given as token ids (the context window bounds it anyway; this bounds the parsing).
MAX_PROMPT_IDS = 1_000_000


class CompletionRequest(_GenerationRequest):
    """The legacy completions API (POST /v1/completions): the prompt is sent to the model as it is, no chat
    template. One prompt per request: a string, or token ids (a batch of exactly one is accepted too)."""

    prompt: str | list[Annotated[int, Field(ge=0, lt=2**31)]] | list[str] | \
        list[list[Annotated[int, Field(ge=0, lt=2**31)]]]
    echo: bool = False
    # Refused with a clear message unless at their no-op value.
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def logprobs_count(self) -> int:
        """SamplingParams.logprobs: -1 none, else how many alternatives per token."""
        return -1 if self.logprobs is None else self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: object) -> object:
        """Checked before the union's own validation, so that every wrong prompt gets one clear message."""
        if isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
            if len(value) != 1:
                raise unsupported("a batch of several prompts is not supported: send one prompt per request")
            value = value[0]
        if isinstance(value, list) and not all(type(v) is int for v in value):
            raise ValueError("the prompt must be a string or a list of token ids (integers)")
        if not isinstance(value, (str, list)):
            raise ValueError("the prompt must be a string or a list of token ids (integers)")
        if not value:
            raise ValueError("the prompt is empty")
        if isinstance(value, list):
            if len(value) > MAX_PROMPT_IDS:
                raise ValueError(f"at most {MAX_PROMPT_IDS} token ids")
            bad = next((v for v in value if not 0 <= v < 2**31), None)
            if bad is not None:
                raise ValueError(f"token id {bad} is out of range")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise unsupported("suffix is not supported")
        return value

    @field_validator("best_of", mode="before")
    @classmethod
    def _no_best_of(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            raise unsupported("best_of > 1 is not supported")
        return value
