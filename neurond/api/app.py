"""The HTTP API's routes: OpenAI-compatible chat completions and (legacy) completions, plus health, readiness,
the model list, metrics and the OpenAPI description.

Every request is validated here, completely, before anything reaches a rank: body size, JSON, schema, model
name, chat template or prompt, tools and response format, context window. Both completion endpoints share one
path to the engine (`_generate`): only how the prompt is made and how the answer is shaped (`answers.Shape`)
differ. In front of the routes sits the guard (`guard.py`: head size, token, concurrency); behind them the
answers (`answers.py`: JSON or a stream). The app never loads the model itself (that would block ASGI
startup); it reports `/ready` 503 until the supervisor says the pool is healthy.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from neurond.api import answers
from neurond.api.errors import APIError
from neurond.api.guard import RequestGuard
from neurond.api.http import json_response as _json
from neurond.api.openapi import openapi_spec
from neurond.api.schemas import ChatCompletionRequest, CompletionRequest
from neurond.api.structured import response_format_grammar
from neurond.api.tools import ToolCalling, detect
from neurond.engine.engine import EngineBusy, RequestTooLarge
from neurond.engine.request import RETRY_AFTER_S, GenerationRequest
from neurond.lifecycle import Cause
from neurond.pool.faults import PoolUnavailable
from neurond.protocol import Grammar, SamplingParams
from neurond.served_model import ServedModel

if TYPE_CHECKING:
    from neurond.observe.metrics import MetricsSink

Parsed = TypeVar("Parsed", ChatCompletionRequest, CompletionRequest)


class LastCause(Protocol):
    @property
    def last_cause(self) -> Cause | None:
        """Why the lifecycle took its last transition."""


class PoolState(Protocol):
    """What the API needs of the supervisor (Supervisor, or the tests' FakePool in tests/api/fakes.py): whether
    the model serves, and if not, its state and why (`/ready`)."""

    @property
    def state(self) -> str: ...
    @property
    def serving(self) -> bool: ...
    @property
    def lifecycle(self) -> LastCause: ...


class GenerationQueue(Protocol):
    """What the API needs of the engine (engine.Engine, or the tests' FakeEngine)."""

    @property
    def kv_positions(self) -> int:
        """The most tokens one sequence can have in the KV cache."""

    def submit_all(self, reqs: list[GenerationRequest]) -> None:
        """Queue every request or none; raises PoolUnavailable, RequestTooLarge or EngineBusy."""


class API:
    """The routes. The settings keep their configuration's names, but `api_token`: the token api_token_file holds
    (None: no authentication)."""

    def __init__(self, model: ServedModel, engine: GenerationQueue, supervisor: PoolState, *, max_body_bytes: int,
                 default_max_tokens: int, api_token: str | None = None, max_concurrent_requests: int = 512,
                 body_timeout_s: float = 30.0, max_header_bytes: int = 16384,
                 metrics: MetricsSink | None = None) -> None:
        self.metrics = metrics
        self.model = model
        self.engine = engine
        self.supervisor = supervisor
        self.max_body_bytes = max_body_bytes
        self.default_max_tokens = default_max_tokens
        self.guard = RequestGuard(max_header_bytes=max_header_bytes, max_concurrent_requests=max_concurrent_requests,
                                  api_token=api_token.encode() if api_token else None, retry_after_s=RETRY_AFTER_S)
        self.body_timeout_s = body_timeout_s

    def app(self) -> ASGIApp:
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

        async def api_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, APIError)  # the handler of APIError only (starlette types handlers for any)
            if self.metrics is not None and exc.status < 500:
                self.metrics.request_done(f"rejected_{exc.status}")
            return exc.response()

        async def not_found(request: Request, exc: Exception) -> Response:
            status = getattr(exc, "status_code", 404)
            detail = getattr(exc, "detail", "not found")
            return APIError(status, f"{request.method} {request.url.path}: {detail}").response()

        app = Starlette(routes=routes, exception_handlers={APIError: api_error, 404: not_found, 405: not_found})
        return self.guard.wrap(app)

    # ------------------------------------------------------------------ simple endpoints
    async def health(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        state = self.supervisor.state
        if self.supervisor.serving:
            return _json({"status": "ready", "state": state, "model": self.model.name})
        cause = self.supervisor.lifecycle.last_cause
        name = cause.name if cause else None
        # `cause`, the word used everywhere else for it; `reason` stays for load balancers that read it already.
        # Never the cause's detail: /ready needs no token, and the detail is a rank's own words (an exception's
        # text, paths, the checkpoint). It is in the journal (NEUROND_DETAIL) and the admin status (last_cause).
        return _json({"status": "unavailable", "state": state, "cause": name, "reason": name},
                     503, {"Retry-After": str(round(RETRY_AFTER_S))})

    async def prometheus(self, request: Request) -> Response:
        assert self.metrics is not None  # the route exists only with metrics
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def openapi(self, request: Request) -> Response:
        return _json(openapi_spec(self.model.name, self.guard.api_token is not None))

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

    def _parse(self, body: bytes, schema: type[Parsed]) -> Parsed:
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
        except Exception as exc:  # a template that rejects the conversation is the client's error
            raise APIError(400, f"messages rejected by the chat template: {exc}", param="messages",
                           code="invalid_messages") from None
        return list(ids)

    def _check_ids(self, ids: list[int], param: str) -> None:
        """Token ids a client sent (a prompt, logit_bias keys) must be rows of the model's embedding."""
        vocab = self.model.vocab_size or len(self.model.tokenizer)
        bad = next((i for i in ids if i >= vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is not in the vocabulary (ids 0 to {vocab - 1})",
                           param=param, code="invalid_value")

    async def _generate(self, request: Request, parsed: ChatCompletionRequest | CompletionRequest,
                        prompt_ids: list[int], prompt_param: str, requested: int | None, shape: answers.Shape,
                        grammar: Grammar | None = None) -> Response:
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
        # Without max_tokens, the default is capped by what is left of the window and of the KV cache (a smaller
        # kv_cache_blocks may hold fewer tokens than the window); at least 1, so a prompt that leaves no room
        # gets its 400 from the engine's check below.
        room = min(ctx, self.engine.kv_positions) - len(prompt_ids)
        max_tokens = requested if requested is not None else max(1, min(self.default_max_tokens, room))
        bias = parsed.bias()
        self._check_ids([token for token, _ in bias], "logit_bias")
        # No memory guess here: every rank allocated its KV cache at load, and the engine refuses a request whose
        # prompt + max_tokens could not fit in it even alone (RequestTooLarge); one that can fits in memory.
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
            stop=cast(list[str], parsed.stop or []),  # a list: the schema's validator made it one
            stop_token_ids=self.model.stop_token_ids,
        ) for i in range(parsed.n)]
        try:
            self.engine.submit_all(members)
        except PoolUnavailable as exc:
            raise APIError(503, f"the model is not ready: {exc.message}", code="model_unavailable",
                           retry_after_s=RETRY_AFTER_S) from None
        except RequestTooLarge as exc:
            raise APIError(400, f"{exc}", param="max_tokens" if requested is not None else prompt_param,
                           code="context_length_exceeded") from None
        except EngineBusy as exc:
            raise APIError(503, f"server overloaded: {exc}", code="server_overloaded",
                           retry_after_s=RETRY_AFTER_S) from None
        choices = answers.Choices(request_id, members)
        try:
            if parsed.stream:
                include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
                return await answers.stream(self.model, choices, shape, include_usage, request)
            return await answers.complete(self.model, choices, shape, request)
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
        shape = answers.CHAT if tools is None or not tools.parses else replace(answers.CHAT, tools=tools)
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
            prompt_ids = list(cast(list[int], parsed.prompt))  # a batch of one was unwrapped by the schema
            self._check_ids(prompt_ids, "prompt")
            echo = self.model.tokenizer.decode(prompt_ids) if parsed.echo else ""  # as generated text is
        shape = answers.completion_shape(echo if parsed.echo else "")
        return await self._generate(request, parsed, prompt_ids, "prompt", parsed.max_tokens, shape)
