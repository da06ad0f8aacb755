"""The ASGI guard in front of the routes: what every request must pass before any parsing.

The size of the request head (every path), the bearer token when one is configured (/v1/*, /metrics and
/openapi.json; the /health and /ready probes stay open: load balancers and systemd cannot carry a token), and
for /v1/* the limit on concurrent requests. A refused request costs no routing and no parsing.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from neurond.api.errors import APIError
from neurond.api.http import bearer_matches

# Besides /v1/*, what needs the API token when api_token_file is set. (Any other path is a 404 either way.)
TOKEN_PATHS = frozenset({"/metrics", "/openapi.json"})


class RequestGuard:
    """The settings keep their configuration's names, but `api_token`: the token api_token_file holds."""

    def __init__(self, *, max_header_bytes: int, api_token: bytes | None, max_concurrent_requests: int,
                 retry_after_s: float) -> None:
        self.max_header_bytes = max_header_bytes
        self.api_token = api_token
        self.max_concurrent_requests = max_concurrent_requests
        self.retry_after_s = retry_after_s
        self.in_flight = 0  # /v1 requests being served now

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """`app` behind the guard (an ASGI callable)."""

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            path = scope["path"]
            v1 = path.startswith("/v1/")
            error = self._check_head(scope)
            if error is None and (v1 or path in TOKEN_PATHS):
                error = self._check_token(scope)
            if error is None and not v1:
                return await app(scope, receive, send)
            if error is None and self.in_flight >= self.max_concurrent_requests:
                error = APIError(429, f"more than {self.max_concurrent_requests} concurrent requests",
                                 code="too_many_requests", retry_after_s=self.retry_after_s)
            if error is not None:
                return await error.response()(scope, receive, send)
            self.in_flight += 1
            try:
                await app(scope, receive, send)
            finally:
                self.in_flight -= 1

        return guarded

    def _check_head(self, scope: Scope) -> APIError | None:
        """hypercorn's h11 limit (h11_max_incomplete_size) holds only for a head that arrives in pieces: one
        read of up to 64 KiB is parsed whole. The head's size is checked again here, whatever way it came."""
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
            sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if size <= self.max_header_bytes:
            return None
        return APIError(431, f"request head of about {size} bytes exceeds the limit of {self.max_header_bytes}",
                        code="request_header_fields_too_large")

    def _check_token(self, scope: Scope) -> APIError | None:
        if self.api_token is None:
            return None
        if bearer_matches(dict(scope["headers"]).get(b"authorization", b""), self.api_token):
            return None
        return APIError(401, "missing or wrong API token (Authorization: Bearer ...)", code="invalid_api_key")
