"""The admin API: status, reload/unload/load, and fault injection.

It listens only on a unix socket (never TCP, so it can never be reached over the network) and every request
needs the admin bearer token, read from a file. Fault injection additionally needs `fault_injection = true`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from neurond import version
from neurond.api.errors import APIError
from neurond.api.http import bearer_matches, json_response as _json
from neurond.engine.outcomes import EngineStats
from neurond.lifecycle import LifecycleState
from neurond.pool.faults import PoolFault
from neurond.pool.snapshot import Snapshot, Transition


class AdminPool(Protocol):
    """What the admin API needs of the supervisor (Supervisor, or the tests' FakePool in tests/api/fakes.py):
    its snapshot, its state, fault injection and the operator's actions."""

    @property
    def state(self) -> str: ...
    def snapshot(self) -> Snapshot: ...
    async def inject(self, rank: int, kind: str, phase: str, count: int, after: int) -> None: ...
    async def reload(self) -> None: ...
    async def unload(self) -> None: ...
    async def load(self) -> None: ...


class EngineCounts(Protocol):
    """What the admin API needs of the engine (engine.Engine, or the tests' FakeEngine): its request outcomes."""

    @property
    def stats(self) -> EngineStats: ...


class AdminAPI:
    """The admin routes. `token` is the admin token, what the setting admin_token_file holds."""

    def __init__(self, supervisor: AdminPool, token: str, engine: EngineCounts | None = None,
                 started_at: float | None = None) -> None:
        self.engine = engine
        self.started_at = time.time() if started_at is None else started_at
        if not token:
            raise ValueError("the admin token must not be empty")
        self.supervisor = supervisor
        self._token = token.encode()
        self._tasks: set[asyncio.Task[None]] = set()

    def app(self) -> Starlette:
        routes = [
            Route("/admin/status", self.status, methods=["GET"]),
            Route("/admin/faults", self.inject, methods=["POST"]),
            Route("/admin/reload", self.reload, methods=["POST"]),
            Route("/admin/unload", self.unload, methods=["POST"]),
            Route("/admin/load", self.load, methods=["POST"]),
        ]

        async def api_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, APIError)  # the handler of APIError only (starlette types handlers for any)
            return exc.response()

        return Starlette(routes=routes, exception_handlers={APIError: api_error})

    def _auth(self, request: Request) -> None:
        if not bearer_matches(request.headers.get("authorization", "").encode(), self._token):
            raise APIError(401, "admin token missing or wrong", code="unauthorized")

    async def status(self, request: Request) -> Response:
        """Everything `neurond status` shows (docs/api.md lists the fields)."""
        self._auth(request)
        snap = self.supervisor.snapshot()
        cause = snap.last_cause
        now = time.time()
        last = snap.transitions[-1] if snap.transitions else None
        return _json({
            "state": snap.state,
            "state_since": last.at if last else self.started_at,
            "model": snap.model,
            "model_dir": snap.model_dir,
            "tp_size": snap.tp_size,
            "version": version(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime_s": round(now - self.started_at, 3),
            "incidents": snap.incidents,
            "current_incident": snap.current_incident,
            "pids": {str(rank): pid for rank, pid in snap.pids.items()},
            "spare_pids": snap.spare_pids,
            "spares_ready": snap.spares_ready,
            "zygote_pid": snap.zygote_pid,
            "kv_cache_blocks": snap.kv_blocks,
            "rank_kv_cache_blocks": {str(rank): n for rank, n in sorted(snap.rank_kv_blocks.items())},
            "load_progress": {str(rank): dataclasses.asdict(report)
                              for rank, report in sorted(snap.load_progress.items())},
            "last_transition": _transition(last) if last else None,
            "last_cause": None if cause is None else {
                "cause": cause.name, "incident": cause.incident, "rank": cause.rank,
                "request_id": cause.request_id, "rung": cause.rung, "attempt": cause.attempt, "detail": cause.detail},
            "transitions": [list(t) for t in snap.transitions],
            "requests": dict(self.engine.stats) if self.engine is not None else {},
        })

    async def inject(self, request: Request) -> Response:
        self._auth(request)
        try:
            body = orjson.loads(await request.body())
            rank, kind, phase = int(body["rank"]), str(body["kind"]), str(body["phase"])
            count, after = int(body.get("count", 1)), int(body.get("after", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise APIError(400, f"need JSON {{rank, kind, phase, count?, after?}}: {exc}",
                           code="invalid_request") from None
        try:
            await self.supervisor.inject(rank, kind, phase, count, after)
        except PermissionError as exc:
            raise APIError(403, str(exc), code="fault_injection_disabled") from None
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_value") from None
        except PoolFault as exc:
            raise APIError(503, exc.message, code=exc.cause, retry_after_s=2) from None
        return _json({"armed": {"rank": rank, "kind": kind, "phase": phase, "count": count, "after": after}})

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _operator(self, request: Request, action: str, allowed: tuple[str, ...],
                        coro_factory: Callable[[], Coroutine[Any, Any, None]]) -> Response:
        self._auth(request)
        state = self.supervisor.state
        if state not in allowed:
            raise APIError(409, f"cannot {action} while {state}", code="conflict")
        self._background(coro_factory())
        return _json({"accepted": action, "state": state}, status=202)

    async def reload(self, request: Request) -> Response:
        return await self._operator(request, "reload", (LifecycleState.HEALTHY, LifecycleState.UNLOADED),
                                    self.supervisor.reload)

    async def unload(self, request: Request) -> Response:
        return await self._operator(request, "unload", (LifecycleState.HEALTHY,), self.supervisor.unload)

    async def load(self, request: Request) -> Response:
        return await self._operator(request, "load", (LifecycleState.UNLOADED,), self.supervisor.load)


def _transition(t: Transition) -> dict:
    """A transition as the admin status names its fields."""
    return {"event": t.event, "from": t.source, "to": t.target, "cause": t.cause, "rung": t.rung, "at": t.at}
