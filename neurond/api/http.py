"""What both HTTP surfaces (the public API and the admin socket) share: JSON responses, the bearer check."""

from __future__ import annotations

import hmac

import orjson
from starlette.responses import Response


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


def bearer_matches(authorization: bytes, token: bytes) -> bool:
    """An `Authorization: Bearer <token>` header value carries exactly `token` (compared in constant time)."""
    scheme, _, given = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)
