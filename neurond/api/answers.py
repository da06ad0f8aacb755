"""Answering a generation request: the engine's events for its n choices become one OpenAI JSON answer or a
stream of server-sent events, in the endpoint's shape (`Shape`: chat or completions). A client that hangs up
stops every choice's generation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from neurond.api import logprobs as logprobs_format
from neurond.api.errors import REQUEST_ID_HEADER, APIError
from neurond.api.http import json_response as _json
from neurond.api.tools import ToolCall, ToolCalling
from neurond.engine.request import Failed, Finished, GenerationRequest, LogprobEntry, TextDelta
from neurond.served_model import ServedModel

# SSE splits lines at CR and LF only, but a client reading lines with Python's str.splitlines (httpx's
# aiter_lines does) also splits at U+0085, U+2028 and U+2029, which JSON may carry raw, and a byte-level vocabulary
# generates them: the chaos soak saw a chunk cut in two. Escaped, each is the same JSON and no splitter breaks
# it. (In UTF-8 these byte runs can only be those characters, so replacing them is exact.)
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def sse_data(body: dict) -> bytes:
    """One server-sent event carrying `body` as JSON, on one line whatever line splitter the client uses."""
    data = orjson.dumps(body)
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


def _logprobs(model: ServedModel, choices: Choices, shape: Shape, entries: Iterable[LogprobEntry],
              offset: int) -> dict | None:
    """A choice's `logprobs` for these entries: null unless the request asked for them."""
    if choices.members[0].sampling.logprobs < 0:
        return None
    return shape.logprobs(entries, model.tokenizer, offset)

async def complete(model: ServedModel, choices: Choices, shape: Shape, request: Request) -> Response:
    """The whole answer as one JSON body, once every choice has finished."""
    n = len(choices.members)
    parts: list[list[str]] = [[] for _ in range(n)]
    entries: list[list[LogprobEntry]] = [[] for _ in range(n)]
    finished: dict[int, Finished] = {}
    with _HangUpWatch(request, choices):
        while len(finished) < n:
            index, event = await choices.next()
            if event is _HUNG_UP:
                return Response(status_code=499)  # nobody is left to read it
            if isinstance(event, TextDelta):
                parts[index].append(event.text)
                entries[index].extend(event.logprobs)
            elif isinstance(event, Failed):
                raise _api_error(event, choices.request_id)
            elif isinstance(event, Finished):
                finished[index] = event
    body = {"id": choices.request_id, "object": shape.object, "created": int(time.time()),
            "model": model.name,
            "choices": [_at(i, shape.answer(shape.prefix + "".join(parts[i]), finished[i].reason.value,
                                            _logprobs(model, choices, shape, entries[i], len(shape.prefix))))
                        for i in range(n)],
            "usage": _usage(list(finished.values()))}
    return _json(body, headers={REQUEST_ID_HEADER: choices.request_id})

async def stream(model: ServedModel, choices: Choices, shape: Shape, include_usage: bool,
                 request: Request) -> Response:
    """The answer as server-sent events, each choice's text as it comes."""
    # Wait for the first event so that a request failing before its first token gets a real status code.
    # (Once the stream has started, starlette itself notices a hang-up and closes the events below.)
    with _HangUpWatch(request, choices):
        first = await choices.next()
    if first[1] is _HUNG_UP:
        return Response(status_code=499)
    if isinstance(first[1], Failed):
        raise _api_error(first[1], choices.request_id)
    events = _Events(model, choices, shape, include_usage)
    return StreamingResponse(events.from_first(first), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      REQUEST_ID_HEADER: choices.request_id})


class _Events:
    """One streamed answer's server-sent events, from its first engine event on: each choice's text as it comes,
    its finish, then the usage (if asked for) and `[DONE]`; a failure ends the stream with the error."""

    def __init__(self, model: ServedModel, choices: Choices, shape: Shape, include_usage: bool) -> None:
        self.model = model
        self.choices = choices
        self.shape = shape
        self.include_usage = include_usage
        self.created = int(time.time())
        n = len(choices.members)
        self.offsets = [len(shape.prefix)] * n  # where each choice's next delta starts in its whole text
        self.finished: dict[int, Finished] = {}
        # With tools, text that may be a call is held back and each call sent whole at the end (tools.py).
        self.tool_streams = [shape.tools.stream() for _ in range(n)] if shape.tools is not None else None

    def chunk(self, choice: dict | None, usage: dict | None = None) -> bytes:
        body = {"id": self.choices.request_id, "object": self.shape.chunk_object, "created": self.created,
                "model": self.model.name, "choices": [choice] if choice is not None else []}
        if self.include_usage:
            body["usage"] = usage
        return sse_data(body)

    async def from_first(self, first: tuple[int, object]) -> AsyncIterator[bytes]:
        n = len(self.choices.members)
        try:
            if self.shape.opening is not None:
                for i in range(n):
                    yield self.chunk(_at(i, dict(self.shape.opening)))
            index, event = first
            while True:
                if isinstance(event, TextDelta):
                    delta = self._delta(index, event)
                    if delta is not None:
                        yield delta
                elif isinstance(event, Failed):
                    yield sse_data(_api_error(event, self.choices.request_id).body())
                    return
                elif isinstance(event, Finished):
                    for chunk in self._finish(index, event):
                        yield chunk
                    if len(self.finished) == n:
                        if self.include_usage:
                            yield self.chunk(None, usage=_usage(list(self.finished.values())))
                        yield b"data: [DONE]\n\n"
                        return
                index, event = await self.choices.next()
        finally:
            self.choices.close(cancel=True)  # a client that went away stops the generation at the next step

    def _delta(self, index: int, event: TextDelta) -> bytes | None:
        """A choice's new text (what of it is not held back as a possible tool call), or None."""
        text = event.text if self.tool_streams is None else self.tool_streams[index].feed(event.text)
        logprobs = _logprobs(self.model, self.choices, self.shape, event.logprobs, self.offsets[index]) \
            if event.logprobs and text == event.text else None
        self.offsets[index] += len(event.text)
        return self.chunk(_at(index, self.shape.delta(text, None, logprobs))) if text else None

    def _finish(self, index: int, event: Finished) -> list[bytes]:
        """A choice's end: with tools, the text held back and the calls in it; then its finish reason."""
        self.finished[index] = event
        reason = event.reason.value
        chunks = []
        if self.tool_streams is not None:
            held = self.tool_streams[index]
            tail, calls = held.finish() if reason == "stop" else (held.cut_short(), [])
            if tail:
                chunks.append(self.chunk(_at(index, self.shape.delta(tail, None, None))))
            if calls:
                chunks.append(self.chunk(_at(index, _tool_call_delta(calls))))
                reason = "tool_calls"
        chunks.append(self.chunk(_at(index, self.shape.delta(None, reason, None))))
        return chunks


class Choices:
    """The generation requests of one API request (its n choices), their events merged in arrival order as
    (choice index, event)."""

    def __init__(self, request_id: str, members: list[GenerationRequest]) -> None:
        self.request_id = request_id
        self.members = members
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._forward(i, m)) for i, m in enumerate(members)]

    async def _forward(self, index: int, member: GenerationRequest) -> None:
        while True:
            event = await member.events.get()
            self.queue.put_nowait((index, event))
            if isinstance(event, (Finished, Failed)):
                return

    async def next(self) -> tuple[int, object]:
        return await self.queue.get()

    def hung_up(self) -> None:
        self.close(cancel=True)
        self.queue.put_nowait((0, _HUNG_UP))

    def close(self, cancel: bool) -> None:
        """Stop forwarding; with `cancel`, stop generating every choice that has not finished."""
        for task in self._tasks:
            task.cancel()
        if cancel:
            for member in self.members:
                member.cancelled = True


def _at(index: int, choice: dict) -> dict:
    choice["index"] = index
    return choice


@dataclass(frozen=True, slots=True)
class Shape:
    """How one endpoint's answer looks (what differs between chat and completions; the rest is shared)."""

    id_prefix: str
    object: str
    chunk_object: str
    choice: Callable[[str, str, dict | None], dict]  # (text, finish_reason, logprobs) -> a whole answer's choice
    delta: Callable[[str | None, str | None, dict | None], dict]  # (text or None, finish_reason, logprobs)
    logprobs: Callable[..., dict]  # (entries, tokenizer, text offset) -> the choice's `logprobs`
    opening: dict | None = None  # the choice of a stream's first chunk, if it has one of its own
    prefix: str = ""  # text put before the generated text (echo)
    tools: ToolCalling | None = None  # chat with tools whose calls are parsed out of the answer

    def answer(self, text: str, finish: str, logprobs: dict | None) -> dict:
        """A whole answer's choice: with tools, calls in the text become `tool_calls` (finish "tool_calls")."""
        choice = self.choice(text, finish, logprobs)
        if self.tools is not None and finish == "stop":
            content, calls = self.tools.parse(text)
            if calls:
                choice["message"] = {"role": "assistant", "content": content,
                                     "tool_calls": [c.as_dict() for c in calls]}
                choice["finish_reason"] = "tool_calls"
        return choice


CHAT = Shape(
    "chatcmpl", "chat.completion", "chat.completion.chunk",
    choice=lambda text, finish, lp: {"index": 0, "message": {"role": "assistant", "content": text},
                                     "logprobs": lp, "finish_reason": finish},
    delta=lambda text, finish, lp: {"index": 0, "delta": {"content": text} if text is not None else {},
                                    "logprobs": lp, "finish_reason": finish},
    logprobs=lambda entries, tokenizer, _offset: logprobs_format.chat(entries, tokenizer),
    opening={"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
)


def _tool_call_delta(calls: list[ToolCall]) -> dict:
    """A stream's delta carrying whole calls (OpenAI's deltas name each call's index among the answer's)."""
    return {"index": 0, "delta": {"tool_calls": [{"index": k, **c.as_dict()} for k, c in enumerate(calls)]},
            "logprobs": None, "finish_reason": None}


def _text_choice(text: str | None, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}


def completion_shape(echo: str) -> Shape:
    """`text_completion` objects; with `echo`, the prompt's text comes first (a stream's first chunk)."""
    return Shape("cmpl", "text_completion", "text_completion", choice=_text_choice, delta=_text_choice,
                  logprobs=logprobs_format.completion, opening=_text_choice(echo, None) if echo else None,
                  prefix=echo)


def _usage(finished: list[Finished]) -> dict:
    """The prompt counts once however many choices were drawn from it; their completions add up."""
    prompt = finished[0].prompt_tokens
    completion = sum(f.completion_tokens for f in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _api_error(event: Failed, request_id: str) -> APIError:
    return APIError(event.status, event.message, code=event.code, retry_after_s=event.retry_after_s,
                    request_id=request_id)


# Put into a request's event queue when its client hangs up before the response started.
_HUNG_UP = object()


class _HangUpWatch:
    """While a handler waits on the engine with no response started, a client that hangs up cancels its
    generation (the engine skips it in the queue, or stops it at the next step) and wakes the handler: nobody
    keeps generating, or waiting, for a closed connection. (hypercorn says `http.disconnect` on receive().)"""

    def __init__(self, request: Request, choices: Choices) -> None:
        self._receive = request.receive
        self._choices = choices
        self._task: asyncio.Task | None = None

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._choices.hung_up()

    def __enter__(self) -> _HangUpWatch:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        return self

    def __exit__(self, *exc: object) -> None:
        # Cancelling a receive() loses no message: a disconnect still queued is read by whoever receives next.
        assert self._task is not None  # __enter__ made it
        self._task.cancel()
