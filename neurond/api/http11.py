"""The API and the admin socket are served HTTP/1.1 only, and what neurond writes to a connection itself is a
whole HTTP/1.1 response (`http_error`: a refused connection's 503, an HTTP/2 preface's 505).

HTTP/2 is not served (`http11_only`): the API sits behind load balancers that speak HTTP/1.1 to backends, and
the connection cap (`connections.py`), the request-head limit (h11_max_incomplete_size, `guard.py`) and the
slow-head protections were built and tested for hypercorn's h11 protocol only; its h2 protocol has limits of its
own (100 streams per connection, 64 KiB header lists) that nothing here checks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

import orjson
from hypercorn.events import Closed, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError, H11Protocol

from neurond.api.errors import APIError

if TYPE_CHECKING:
    import h11
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.events import Event as HypercornEvent
    from hypercorn.typing import AppWrapper, ConnectionState, TaskGroup, WorkerContext


def http_error(error: APIError, retry_after_s: float | None = None) -> bytes:
    """`error` as a whole HTTP/1.1 response that closes the connection."""
    body = orjson.dumps(error.body())
    retry = f"retry-after: {max(1, round(retry_after_s))}\r\n" if retry_after_s is not None else ""
    head = (f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{retry}connection: close\r\n\r\n")
    return head.encode() + body


def _prior_knowledge(request: h11.Request) -> bool:
    """An HTTP/2 connection preface ("PRI * HTTP/2.0", RFC 9113 3.4), as h11 parses it: a request."""
    return request.method == b"PRI" and request.target == b"*" and request.http_version == b"2.0"


_HTTP2_REFUSAL = http_error(APIError(505, "HTTP/2 is not served here: send HTTP/1.1",
                                     code="http_version_not_supported"))


def http11_only() -> None:
    """Make hypercorn serve HTTP/1.1 only, in this process (the API port and the admin socket alike).

    hypercorn has no setting for that on plain TCP (`alpn_protocols` is TLS's): its per-connection
    ProtocolWrapper switches a connection to its H2 protocol when the first request is the HTTP/2 preface
    (prior knowledge) or carries `Upgrade: h2c` (after answering 101 itself, inside H11Protocol). So the
    connection handler uses a wrapper of ours that never makes an H2 protocol: an `Upgrade: h2c` is ignored
    (RFC 9110 7.8 lets a server ignore Upgrade; the request is answered in HTTP/1.1) and a preface gets a 505
    and a closed connection. Should a hypercorn upgrade bypass the override below, its h2 switch still reaches
    only our wrapper, which refuses it: HTTP/2 cannot come back silently (tests/api/test_connections.py)."""
    from hypercorn.asyncio import tcp_server

    tcp_server.ProtocolWrapper = _HTTP11Only  # type: ignore[misc]  # TCPServer.run looks it up per connection


class _H11Only(H11Protocol):
    async def _check_protocol(self, event: h11.Request) -> None:
        # hypercorn's own check answers `Upgrade: h2c` with 101 and switches; this one only spots the preface.
        if _prior_knowledge(event):
            raise H2ProtocolAssumedError(b"")


class _HTTP11Only(ProtocolWrapper):
    """hypercorn's ProtocolWrapper (one per connection) without its switch to HTTP/2."""

    def __init__(self, app: AppWrapper, config: HypercornConfig, context: WorkerContext, task_group: TaskGroup,
                 state: ConnectionState, ssl: bool, client: tuple[str, int] | None, server: tuple[str, int] | None,
                 send: Callable[[HypercornEvent], Awaitable[None]], alpn_protocol: str | None = None) -> None:
        # Not ProtocolWrapper's own __init__: it would make an H2 protocol for ALPN "h2" (TLS, not served here).
        self.send = send
        self.refused = False
        self.protocol = _H11Only(app, config, context, task_group, state, ssl, client, server, send)

    async def initiate(self) -> None:
        await self.protocol.initiate()

    async def handle(self, event: HypercornEvent) -> None:
        if self.refused:
            return  # what a refused client still sends, until the connection is closed
        try:
            await self.protocol.handle(event)
        except (H2ProtocolAssumedError, H2CProtocolRequiredError):
            self.refused = True
            await self.send(RawData(data=_HTTP2_REFUSAL))
            await self.send(Closed())
