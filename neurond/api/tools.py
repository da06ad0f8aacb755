"""Tool calling: which format the checkpoint's chat template speaks, the grammar of a forced call, and the
model's output parsed back into OpenAI `tool_calls`.

Two formats, chosen from the chat template (the model was trained on what its template writes):
- **hermes** (Qwen 2/2.5/3, Hermes, many fine-tunes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  possibly after some text and possibly several;
- **llama3_json** (Llama 3.1-3.3, and neurond's built-in model): the whole answer is `{"name": ..., "parameters":
  {...}}` (several joined by `; `), maybe after `<|python_tag|>`.

`tool_choice` "auto" leaves the model free and parses what it wrote; "required" and a named function force
exactly one call by constrained decoding (the call's arguments follow the function's JSON schema, so even
random weights produce a call that parses and validates); "none" leaves the tools in the prompt and parses
nothing. A stream holds back text that may be a call and sends each call whole, as one delta (clients join
deltas, so one is as good as many), once the answer is complete.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from dataclasses import dataclass

from neurond.api.errors import APIError
from neurond.api.structured import checked, closed, json_schema_grammar, lark_json
from neurond.protocol import Grammar


class ToolFormat(str, enum.Enum):
    HERMES = "hermes"
    LLAMA3_JSON = "llama3_json"


def detect(template: str) -> ToolFormat | None:
    """The tool-call format a chat template writes, or None where it has no tool support."""
    if "<tool_call>" in template:
        return ToolFormat.HERMES
    if "tools" in template and ('"parameters"' in template or "ipython" in template or "python_tag" in template):
        return ToolFormat.LLAMA3_JSON
    return None


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call(name: str, arguments: dict) -> ToolCall:
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(arguments, ensure_ascii=False))


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


class ToolCalling:
    """One request's tools: `functions` maps each name to its parameters' JSON schema; `choice` is "auto",
    "required", "none" or a function's name."""

    def __init__(self, fmt: ToolFormat, functions: dict[str, dict], choice: str) -> None:
        self.fmt = fmt
        self.functions = functions
        self.choice = choice

    @property
    def parses(self) -> bool:
        return self.choice != "none"

    def grammar(self, end_ids: frozenset[int]) -> Grammar | None:
        """The constraint forcing one call (of `choice`, or of any function for "required"), or None."""
        if self.choice in ("auto", "none"):
            return None
        names = list(self.functions) if self.choice == "required" else [self.choice]
        key = "arguments" if self.fmt is ToolFormat.HERMES else "parameters"
        # Each function's schema is embedded in the call's: its "#/$defs/..." references must still resolve, so
        # its definitions move to the root (one name defined differently by two functions: the client's 400).
        defs: dict[str, dict] = {}
        calls = []
        for name in names:
            arguments = closed(self.functions[name])
            for section in ("$defs", "definitions"):
                for def_name, definition in (arguments.pop(section, None) or {}).items():
                    if defs.setdefault(f"{section}/{def_name}", definition) != definition:
                        raise APIError(400, f"tools: two functions define {section}/{def_name} differently",
                                       param="tools", code="invalid_value")
            calls.append({"type": "object", "additionalProperties": False, "required": ["name", key],
                          "properties": {"name": {"const": name}, key: arguments}})
        schema: dict = calls[0] if len(calls) == 1 else {"anyOf": calls}
        for path, definition in defs.items():
            section, def_name = path.split("/", 1)
            schema.setdefault(section, {})[def_name] = definition
        if self.fmt is ToolFormat.HERMES:
            from llguidance import LLMatcher

            text = LLMatcher.grammar_from_lark(f'start: "<tool_call>\\n" {lark_json(schema)} "\\n</tool_call>"')
        else:
            text = json_schema_grammar(schema)
        return checked(text, end_ids, "tools")

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The answer as (content, tool calls): calls only where every call it holds parses and names one of
        the request's functions; otherwise the whole text is content."""
        if self.fmt is ToolFormat.HERMES:
            head, found, _ = text.partition("<tool_call>")
            if not found:
                return text, []
            found_calls = [self._one(body, "arguments") for body in _HERMES_CALL.findall(text)]
            parsed = [c for c in found_calls if c is not None]
            if not parsed or len(parsed) != len(found_calls):
                return text, []
            return (head.strip() or None), parsed
        body = text.strip().removeprefix(_PYTHON_TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls: list[ToolCall] = []
        decoder, at = json.JSONDecoder(), 0
        while at < len(body):
            try:
                value, end = decoder.raw_decode(body, at)
            except ValueError:
                return text, []
            call = self._one(value, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " \t\r\n;":
                at += 1
        return None, calls

    def _one(self, value: object, key: str) -> ToolCall | None:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return None
        if not isinstance(value, dict) or value.get("name") not in self.functions:
            return None
        arguments = value.get(key, value.get("arguments" if key == "parameters" else "parameters", {}))
        if isinstance(arguments, str):  # some fine-tunes write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        return _call(value["name"], arguments) if isinstance(arguments, dict) else None

    def stream(self) -> ToolStream:
        return ToolStream(self)


class ToolStream:
    """One streamed choice: `feed` gives the text that is surely content (sent at once); what may be a call
    is held until `finish`, which parses it."""

    def __init__(self, calling: ToolCalling) -> None:
        self.calling = calling
        self.sent = ""  # content already let through
        self.held = ""
        self.holding = False  # a call has (maybe) begun: everything from here waits for the end

    def feed(self, text: str) -> str:
        self.held += text
        if self.holding:
            return ""
        if self.calling.fmt is ToolFormat.LLAMA3_JSON:
            start = (self.sent + self.held).lstrip()
            if not start:
                return ""
            if start.startswith(("{", _PYTHON_TAG)):
                self.holding = True
                return ""
            if _PYTHON_TAG.startswith(start):  # too little to tell yet
                return ""
            return self._release(len(self.held))
        at = self.held.find("<tool_call>")
        if at >= 0:
            self.holding = True
            return self._release(at)
        # Keep back a tail that may be the start of "<tool_call>".
        keep = next((k for k in range(min(len(self.held), 10), 0, -1) if "<tool_call>".startswith(self.held[-k:])), 0)
        return self._release(len(self.held) - keep)

    def _release(self, n: int) -> str:
        out, self.held = self.held[:n], self.held[n:]
        self.sent += out
        return out

    def cut_short(self) -> str:
        """The answer ended before it was complete (max_tokens): what was held back is content after all."""
        return self._release(len(self.held))

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the answer: (content still to send, the calls)."""
        content, calls = self.calling.parse(self.sent + self.held)
        if not calls:
            return self._release(len(self.held)), []
        self.held = ""
        return "", calls
