"""One soak request sent over HTTP, and how it ended, judged from what the client saw.

A clean ending is a full completion, or an OpenAI error JSON whose status is the one its code stands for,
with Retry-After. Anything else is `broken`; no ending within the request's bound is `hung`. Whether the
daemon admitted a request is told by the X-Request-Id header (set on every response of an admitted request),
so a request failed after admission is told from one refused at the door, and matched to the journal.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from dataclasses import dataclass

import httpx

from tests.chaos.workload import RequestPlan

# The status each error code must come with (README "API", docs/recovery.md). Stated here rather than
# imported from the engine: the test is the spec.
ERROR_STATUS = {
    "rank_failed": 500, "cuda_error": 500, "out_of_memory": 503, "rank_died": 503, "rank_timeout": 504,
    "request_quarantined": 500,
    "model_unavailable": 503, "server_overloaded": 503, "too_many_requests": 429,
}
# Codes of a request ended by a rank fault (the one whose step faulted, or one in flight with it).
NOT_RETRIABLE = frozenset({"request_quarantined"})
FAULT_CODES = frozenset({"rank_failed", "cuda_error", "out_of_memory", "rank_died", "rank_timeout",
                         "request_quarantined"})
# An admitted request may also end in model_unavailable: it waited in the queue for a repair that did not come
# within resume_wait_s. A refused one gets one of these three.
REFUSAL_CODES = frozenset({"model_unavailable", "server_overloaded", "too_many_requests"})


class Ending(str, enum.Enum):
    COMPLETED = "completed"  # a full answer: finish_reason stop or length
    FAILED = "failed"  # admitted, then a clean error (before the first token, or as a stream's error event)
    REFUSED = "refused"  # not admitted (no X-Request-Id): 503 / 429 with Retry-After, e.g. while recovering
    HUNG_UP = "hung_up"  # the client closed its stream on purpose after a few chunks
    BROKEN = "broken"  # an unclean ending; `detail` says what was wrong
    HUNG = "hung"  # no ending within the request's bound


@dataclass(slots=True)
class Outcome:
    plan: RequestPlan
    bound_s: float
    started: float  # time.monotonic()
    ended: float = 0.0
    ending: Ending = Ending.BROKEN
    status: int | None = None
    code: str | None = None
    request_id: str | None = None
    mid_stream: bool = False  # the error came as a stream event after tokens had been sent
    completion_tokens: int | None = None
    detail: str = ""

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


async def send(client: httpx.AsyncClient, plan: RequestPlan, bound_s: float) -> Outcome:
    """Send one request and judge its ending. `client` must have no timeout of its own: the bound is the
    timeout, and running past it is the verdict `hung`."""
    out = Outcome(plan, bound_s, time.monotonic())
    try:
        await asyncio.wait_for(_exchange(client, plan, out), bound_s)
    except TimeoutError:
        out.ending, out.detail = Ending.HUNG, f"no ending within its bound of {bound_s:.0f}s"
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        out.ending, out.detail = Ending.BROKEN, f"{type(exc).__name__}: {exc}"[:300]
    out.ended = time.monotonic()
    return out


async def _exchange(client: httpx.AsyncClient, plan: RequestPlan, out: Outcome) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=plan.body()) as r:
        out.status = r.status_code
        out.request_id = r.headers.get("x-request-id")
        if r.status_code != 200:
            _judge_error(out, r.headers, await r.aread())
        elif plan.stream:
            await _read_stream(r, plan, out)  # leaving this block early closes the connection: a hang-up
        else:
            _judge_completion(out, await r.aread())


def _judge_error(out: Outcome, headers, raw: bytes) -> None:
    body = json.loads(raw)
    err = body["error"]
    out.code = err.get("code")
    wrong = []
    if set(err) != {"message", "type", "param", "code"} or not err["message"]:
        wrong.append(f"not the OpenAI error shape: {body}")
    if ERROR_STATUS.get(out.code) != out.status:
        wrong.append(f"{out.status} with code {out.code!r}")
    # A quarantined request must not be retried: it alone carries no Retry-After.
    if ("retry-after" in headers) != (out.code not in NOT_RETRIABLE):
        wrong.append("no Retry-After" if out.code not in NOT_RETRIABLE else f"Retry-After on {out.code}")
    admitted = out.request_id is not None
    if admitted and out.code not in FAULT_CODES | {"model_unavailable"}:
        wrong.append(f"admitted request ended in {out.code!r}")
    if not admitted and out.code not in REFUSAL_CODES:
        wrong.append(f"refused with {out.code!r}")
    if wrong:
        out.ending, out.detail = Ending.BROKEN, "; ".join(wrong)
    else:
        out.ending = Ending.FAILED if admitted else Ending.REFUSED


def _judge_completion(out: Outcome, raw: bytes) -> None:
    body = json.loads(raw)
    choice = body["choices"][0]
    out.completion_tokens = body["usage"]["completion_tokens"]
    wrong = []
    if body["id"] != out.request_id:
        wrong.append(f"id {body['id']} but X-Request-Id {out.request_id}")
    if not isinstance(choice["message"]["content"], str):
        wrong.append("no content")
    wrong += _finish_problems(choice["finish_reason"], out.completion_tokens, out.plan.max_tokens)
    out.ending, out.detail = (Ending.BROKEN, "; ".join(wrong)) if wrong else (Ending.COMPLETED, "")


def _finish_problems(reason, tokens: int | None, max_tokens: int) -> list[str]:
    if reason not in ("stop", "length"):
        return [f"finish_reason {reason!r}"]
    if tokens is not None and (tokens > max_tokens or (reason == "length" and tokens != max_tokens)):
        return [f"{tokens} tokens for max_tokens {max_tokens}, finish_reason {reason}"]
    return []


async def _read_stream(r: httpx.Response, plan: RequestPlan, out: Outcome) -> None:
    chunks, finish, done, error = 0, None, False, None
    async for line in r.aiter_lines():
        if not line:
            continue
        if not line.startswith("data: "):
            out.ending, out.detail = Ending.BROKEN, f"not an SSE data line: {line[:100]!r}"
            return
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            break
        if event["id"] != out.request_id:
            out.ending, out.detail = Ending.BROKEN, f"chunk id {event['id']} but X-Request-Id {out.request_id}"
            return
        if event.get("usage"):
            out.completion_tokens = event["usage"]["completion_tokens"]
        for choice in event["choices"]:
            chunks += bool(choice["delta"].get("content"))
            finish = choice["finish_reason"] or finish
        if plan.hang_up_after is not None and chunks >= plan.hang_up_after and finish is None:
            out.ending = Ending.HUNG_UP
            return
    if error is not None:
        out.code, out.mid_stream = error.get("code"), True
        ok = set(error) == {"message", "type", "param", "code"} and out.code in FAULT_CODES | {"model_unavailable"}
        out.ending, out.detail = (Ending.FAILED, "") if ok else (Ending.BROKEN, f"stream error event {error}")
    elif done and finish is not None:
        wrong = _finish_problems(finish, out.completion_tokens, plan.max_tokens)
        out.ending, out.detail = (Ending.BROKEN, "; ".join(wrong)) if wrong else (Ending.COMPLETED, "")
    else:
        out.ending, out.detail = Ending.BROKEN, f"stream ended without [DONE] or an error event ({chunks} chunks)"
