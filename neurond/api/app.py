"""The HTTP API: OpenAI-compatible chat completions and (legacy) completions, plus health and readiness.

Every request is validated here, completely, before anything reaches a rank: body size, JSON, schema, model
name, chat template or prompt, context window. Both completion endpoints share one path to the engine
(`_generate`): only how the prompt is made and how the answer is shaped (`_Shape`) differ. The app never
loads the model itself (that would block ASGI startup); it reports `/ready` 503 until the supervisor says the
pool is healthy.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from neurond.api import logprobs as logprobs_format
from neurond.api.errors import REQUEST_ID_HEADER, APIError
from neurond.api.http import bearer_matches, json_response as _json
from neurond.api.openapi import openapi_spec
from neurond.api.schemas import ChatCompletionRequest, CompletionRequest
from neurond.api.structured import response_format_grammar
from neurond.api.tools import ToolCall, ToolCalling, detect
from neurond.engine.request import Failed, Finished, GenerationRequest, TextDelta
from neurond.engine.scheduler import RETRY_AFTER_S, EngineBusy
from neurond.pool.faults import PoolUnavailable
from neurond.protocol import Grammar, SamplingParams

if TYPE_CHECKING:
    from neurond.engine.tokenizer import ChatTokenizer

# Besides /v1/*, what needs the API token when api_token_file is set. /health and /ready stay open: load
# balancers' and systemd's probes cannot carry a token. (Any other path is a 404 either way.)
TOKEN_PATHS = frozenset({"/metrics", "/openapi.json"})


@dataclass(slots=True)
class ServedModel:
    """What the API needs to know of the model; all of it read in the leader without touching CUDA."""

    name: str
    tokenizer: ChatTokenizer
    context_len: int
    stop_token_ids: frozenset[int]
    created: int
    #: Rows of the embedding (config.json's vocab_size): a prompt's token ids must be below it.
    vocab_size: int | None = None


class API:
    def __init__(self, model: ServedModel, engine, supervisor, *, max_body_bytes: int, default_max_tokens: int,
                 api_token: str | None = None, max_concurrent: int = 512, body_timeout_s: float = 30.0,
                 max_header_bytes: int = 16384, metrics=None) -> None:
        self.metrics = metrics
        self.model = model
        self.engine = engine
        self.supervisor = supervisor
        self.max_body_bytes = max_body_bytes
        self.default_max_tokens = default_max_tokens
        self.api_token = api_token.encode() if api_token else None
        self.max_concurrent = max_concurrent
        self.body_timeout_s = body_timeout_s
        self.max_header_bytes = max_header_bytes
        self.in_flight = 0

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ]
        if self.metrics is not None:
            routes.append(Route("/metrics", self.prometheus, methods=["GET"]))

        async def api_error(request, exc: Exception):
            assert isinstance(exc, APIError)  # the handler of APIError only (starlette types handlers for any)
            if self.metrics is not None and exc.status < 500:
                self.metrics.request_done(f"rejected_{exc.status}")
            return exc.response()

        async def not_found(request, exc):
            status = getattr(exc, "status_code", 404)
            detail = getattr(exc, "detail", "not found")
            return APIError(status, f"{request.method} {request.url.path}: {detail}").response()

        app = Starlette(routes=routes, exception_handlers={APIError: api_error, 404: not_found, 405: not_found})
        return self._guard(app)

    def _guard(self, app):
        """ASGI wrapper: the size of the request head for every request; the bearer token (when configured)
        for /v1/*, /metrics and /openapi.json; for /v1/*, the limit on concurrent requests. Runs before
        routing, so a refused request costs no parsing."""

        async def guarded(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            path = scope["path"]
            v1 = path.startswith("/v1/")
            error = self._check_head(scope)
            if error is None and (v1 or path in TOKEN_PATHS):
                error = self._check_token(scope)
            if error is None and not v1:
                return await app(scope, receive, send)
            if error is None and self.in_flight >= self.max_concurrent:
                error = APIError(429, f"more than {self.max_concurrent} concurrent requests", code="too_many_requests",
                                 retry_after_s=RETRY_AFTER_S)
            if error is not None:
                return await error.response()(scope, receive, send)
            self.in_flight += 1
            try:
                await app(scope, receive, send)
            finally:
                self.in_flight -= 1

        return guarded

    def _check_head(self, scope) -> APIError | None:
        """hypercorn's h11 limit (h11_max_incomplete_size) holds only for a head that arrives in pieces: one
        read of up to 64 KiB is parsed whole. The head's size is checked again here, whatever way it came."""
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
            sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if size <= self.max_header_bytes:
            return None
        return APIError(431, f"request head of about {size} bytes exceeds the limit of {self.max_header_bytes}",
                        code="request_header_fields_too_large")

    def _check_token(self, scope) -> APIError | None:
        if self.api_token is None:
            return None
        if bearer_matches(dict(scope["headers"]).get(b"authorization", b""), self.api_token):
            return None
        return APIError(401, "missing or wrong API token (Authorization: Bearer ...)", code="invalid_api_key")

    # ------------------------------------------------------------------ simple endpoints
    async def health(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        state = self.supervisor.state
        if self.supervisor.serving:
            return _json({"status": "ready", "state": state, "model": self.model.name})
        cause = self.supervisor.lifecycle.last_cause
        return _json({"status": "unavailable", "state": state, "reason": cause.reason if cause else None,
                      "detail": cause.detail if cause else None},
                     503, {"Retry-After": str(round(RETRY_AFTER_S))})

    async def prometheus(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def openapi(self, request: Request) -> Response:
        return _json(openapi_spec(self.model.name, self.api_token is not None))

    async def models(self, request: Request) -> Response:
        return _json({"object": "list", "data": [
            {"id": self.model.name, "object": "model", "created": self.model.created, "owned_by": "neurond"}]})

    # ------------------------------------------------------------------ shared by both completion endpoints
    async def _read_body(self, request: Request) -> bytes:
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", ""):
            raise APIError(415, f"Content-Type must be application/json, got {ctype!r}", code="unsupported_media_type")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes}",
                           code="request_too_large")
        chunks: list[bytes] = []

        async def read() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise APIError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes",
                                   code="request_too_large")
                chunks.append(chunk)

        try:
            # A client that dribbles its body byte by byte holds a connection, not the server.
            await asyncio.wait_for(read(), self.body_timeout_s)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.body_timeout_s:.0f}s",
                           code="request_timeout") from None
        except ClientDisconnect:
            raise APIError(400, "client disconnected while sending the body") from None
        return b"".join(chunks)

    def _parse(self, body: bytes, schema):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_request")
        try:
            parsed = schema.model_validate(data)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            param = ".".join(str(part) for part in first["loc"]) or None
            kind = first.get("type", "")
            if kind == "extra_forbidden":
                message = f"unrecognized request argument supplied: {param}"
                code = "unsupported_parameter"
            elif kind == "unsupported_parameter":  # schemas.unsupported(): its message says it all
                param = str(first["loc"][0]) if first["loc"] else None
                message, code = first["msg"], "unsupported_parameter"
            else:
                message = f"{param}: {first['msg']}" if param else first["msg"]
                code = "invalid_value" if first["loc"] else "invalid_request"
            raise APIError(400, message, param=param, code=code) from None
        if parsed.stream_options is not None and not parsed.stream:  # as OpenAI answers it
            raise APIError(400, "the 'stream_options' parameter is only allowed when 'stream' is true",
                           param="stream_options", code="invalid_value")
        if parsed.model != self.model.name:
            raise APIError(400, f"model {parsed.model!r} does not exist; this server serves {self.model.name!r}",
                           param="model", code="model_not_found")
        return parsed

    def _tools(self, chat: ChatCompletionRequest) -> ToolCalling | None:
        """The request's tools, in the format the checkpoint's template writes calls in (None: no tools)."""
        if not chat.tools:
            return None
        fmt = detect(self.model.tokenizer.template_source)
        if fmt is None:
            raise APIError(400, f"tools: the chat template of {self.model.name!r} has no tool support", param="tools",
                           code="unsupported_parameter")
        choice = chat.tool_choice_name()
        if chat.response_format is not None and chat.response_format.type != "text":
            choice = "none"  # the answer follows response_format: nothing in it is a call
        return ToolCalling(fmt, {t.function.name: t.function.arguments_schema() for t in chat.tools}, choice)

    def _tokenize(self, chat: ChatCompletionRequest) -> list[int]:
        messages = [m.template_dict() for m in chat.messages]
        tools = [t.model_dump(exclude_none=True) for t in chat.tools] if chat.tools else None
        try:
            ids = self.model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           tools=tools)
        except Exception as exc:  # noqa: BLE001 - a template that rejects the conversation is the client's error
            raise APIError(400, f"messages rejected by the chat template: {exc}", param="messages",
                           code="invalid_messages") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def _check_ids(self, ids: list[int], param: str) -> None:
        """Token ids a client sent (a prompt, logit_bias keys) must be rows of the model's embedding."""
        vocab = self.model.vocab_size or len(self.model.tokenizer)
        bad = next((i for i in ids if i >= vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is not in the vocabulary (ids 0 to {vocab - 1})",
                           param=param, code="invalid_value")

    async def _generate(self, request: Request, parsed, prompt_ids: list[int], prompt_param: str,
                        requested: int | None, shape: _Shape, grammar: Grammar | None = None) -> Response:
        """Check the prompt against the context window, submit it to the engine and answer, as JSON or as an
        event stream, in `shape`. (A fault after this is the engine's to replay: the request is the same kind
        whatever endpoint made it.)"""
        ctx = self.model.context_len
        if len(prompt_ids) >= ctx:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; the context window is {ctx} tokens",
                           param=prompt_param, code="context_length_exceeded")
        if requested is not None and len(prompt_ids) + requested > ctx:
            raise APIError(
                400,
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({requested}) = {len(prompt_ids) + requested} "
                f"exceeds the context window of {ctx} tokens",
                param="max_tokens", code="context_length_exceeded")
        max_tokens = requested if requested is not None else min(self.default_max_tokens, ctx - len(prompt_ids))
        bias = parsed.bias()
        self._check_ids([token for token, _ in bias], "logit_bias")
        # No memory guess here: every rank allocated its KV cache for max_batch_size x the context window at
        # load, so a request that fits the window fits in memory.
        request_id = f"{shape.id_prefix}-{uuid.uuid4().hex}"
        members = [GenerationRequest(
            request_id=request_id if parsed.n == 1 else f"{request_id}-{i}",
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            # Choice i draws with seed + i: the same request gives the same n answers.
            sampling=SamplingParams(parsed.temperature, parsed.top_p,
                                    None if parsed.seed is None else (parsed.seed + i) % 2**64,
                                    parsed.presence_penalty, parsed.frequency_penalty, bias,
                                    parsed.logprobs_count(), grammar),
            stop=parsed.stop or [],
            stop_token_ids=self.model.stop_token_ids,
        ) for i in range(parsed.n)]
        try:
            self.engine.submit_all(members)
        except PoolUnavailable as exc:
            raise APIError(503, f"the model is not ready: {exc.message}", code="model_unavailable",
                           retry_after_s=RETRY_AFTER_S) from None
        except EngineBusy as exc:
            raise APIError(503, f"server overloaded: {exc}", code="server_overloaded",
                           retry_after_s=RETRY_AFTER_S) from None
        choices = _Choices(request_id, members)
        try:
            if parsed.stream:
                include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
                return await self._stream(choices, shape, include_usage, request)
            return await self._complete(choices, shape, request)
        except BaseException:
            choices.close(cancel=True)
            raise

    # ------------------------------------------------------------------ chat completions
    async def chat_completions(self, request: Request) -> Response:
        chat = self._parse(await self._read_body(request), ChatCompletionRequest)
        tools = self._tools(chat)
        prompt_ids = self._tokenize(chat)
        ends = self.model.stop_token_ids
        # In a thread: compiling a large schema can take a good part of a second (llguidance drops the GIL).
        grammar = await asyncio.to_thread(
            lambda: (tools.grammar(ends) if tools else None) or response_format_grammar(chat.response_format, ends))
        shape = CHAT if tools is None or not tools.parses else replace(CHAT, tools=tools)
        return await self._generate(request, chat, prompt_ids, "messages", chat.requested_max_tokens(), shape,
                                    grammar)

    # ------------------------------------------------------------------ completions (legacy)
    async def completions(self, request: Request) -> Response:
        """The prompt goes to the model as it is (no chat template), tokenised as the checkpoint's tokenizer
        does on its own (its post-processor may add a BOS); token ids go as they are."""
        parsed = self._parse(await self._read_body(request), CompletionRequest)
        if isinstance(parsed.prompt, str):
            prompt_ids = self.model.tokenizer.encode_prompt(parsed.prompt)
            if not prompt_ids:
                raise APIError(400, "the prompt has no tokens", param="prompt", code="invalid_value")
            echo = parsed.prompt
        else:
            prompt_ids = list(parsed.prompt)
            self._check_ids(prompt_ids, "prompt")
            echo = self.model.tokenizer.decode(prompt_ids) if parsed.echo else ""  # as generated text is
        shape = _completion_shape(echo if parsed.echo else "")
        return await self._generate(request, parsed, prompt_ids, "prompt", parsed.max_tokens, shape)

    # ------------------------------------------------------------------ answering
    def _logprobs(self, choices: _Choices, shape: _Shape, entries, offset: int) -> dict | None:
        """A choice's `logprobs` for these entries: null unless the request asked for them."""
        if choices.members[0].sampling.logprobs < 0:
            return None
        return shape.logprobs(entries, self.model.tokenizer, offset)

    async def _complete(self, choices: _Choices, shape: _Shape, request: Request) -> Response:
        n = len(choices.members)
        parts: list[list[str]] = [[] for _ in range(n)]
        entries: list[list] = [[] for _ in range(n)]
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
                "model": self.model.name,
                "choices": [_at(i, shape.answer(shape.prefix + "".join(parts[i]), finished[i].reason.value,
                                                self._logprobs(choices, shape, entries[i], len(shape.prefix))))
                            for i in range(n)],
                "usage": _usage(list(finished.values()))}
        return _json(body, headers={REQUEST_ID_HEADER: choices.request_id})

    async def _stream(self, choices: _Choices, shape: _Shape, include_usage: bool,
                      request: Request) -> Response:
        # Wait for the first event so that a request failing before its first token gets a real status code.
        # (Once the stream has started, starlette itself notices a hang-up and closes `events()` below.)
        with _HangUpWatch(request, choices):
            first = await choices.next()
        if first[1] is _HUNG_UP:
            return Response(status_code=499)
        if isinstance(first[1], Failed):
            raise _api_error(first[1], choices.request_id)
        created = int(time.time())
        n = len(choices.members)

        def chunk(choice: dict | None, usage: dict | None = None) -> bytes:
            body = {"id": choices.request_id, "object": shape.chunk_object, "created": created,
                    "model": self.model.name, "choices": [choice] if choice is not None else []}
            if include_usage:
                body["usage"] = usage
            return b"data: " + orjson.dumps(body) + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            offsets = [len(shape.prefix)] * n  # where each choice's next delta starts in its whole text
            finished: dict[int, Finished] = {}
            # With tools, text that may be a call is held back and each call sent whole at the end (tools.py).
            held = [shape.tools.stream() for _ in range(n)] if shape.tools is not None else None
            try:
                if shape.opening is not None:
                    for i in range(n):
                        yield chunk(_at(i, dict(shape.opening)))
                index, event = first
                while True:
                    if isinstance(event, TextDelta):
                        text = event.text if held is None else held[index].feed(event.text)
                        logprobs = self._logprobs(choices, shape, event.logprobs, offsets[index]) \
                            if event.logprobs and text == event.text else None
                        if text:
                            yield chunk(_at(index, shape.delta(text, None, logprobs)))
                        offsets[index] += len(event.text)
                    elif isinstance(event, Failed):
                        yield b"data: " + orjson.dumps(_api_error(event, choices.request_id).body()) + b"\n\n"
                        return
                    elif isinstance(event, Finished):
                        finished[index] = event
                        reason = event.reason.value
                        if held is not None:
                            tail, calls = held[index].finish() if reason == "stop" else (held[index].held, [])
                            if tail:
                                yield chunk(_at(index, shape.delta(tail, None, None)))
                            if calls:
                                yield chunk(_at(index, _tool_call_delta(calls)))
                                reason = "tool_calls"
                        yield chunk(_at(index, shape.delta(None, reason, None)))
                        if len(finished) == n:
                            if include_usage:
                                yield chunk(None, usage=_usage(list(finished.values())))
                            yield b"data: [DONE]\n\n"
                            return
                    index, event = await choices.next()
            finally:
                choices.close(cancel=True)  # a client that went away stops the generation at the next step

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          REQUEST_ID_HEADER: choices.request_id})


class _Choices:
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
class _Shape:
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


CHAT = _Shape(
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


def _completion_shape(echo: str) -> _Shape:
    """`text_completion` objects; with `echo`, the prompt's text comes first (a stream's first chunk)."""
    return _Shape("cmpl", "text_completion", "text_completion", choice=_text_choice, delta=_text_choice,
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

    def __init__(self, request: Request, choices: _Choices) -> None:
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

    def __exit__(self, *exc) -> None:
        # Cancelling a receive() loses no message: a disconnect still queued is read by whoever receives next.
        assert self._task is not None  # __enter__ made it
        self._task.cancel()
