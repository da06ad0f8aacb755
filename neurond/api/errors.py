"""OpenAI-shaped error responses: {"error": {"message", "type", "param", "code"}} with a meaningful status."""

from __future__ import annotations

from starlette.responses import Response

from neurond.api.http import json_response

#: Response header naming an admitted request (as OpenAI's API does): the id its journal entries carry, so a
#: client's error report can be matched to the incident that caused it. Absent: the request was refused.
REQUEST_ID_HEADER = "X-Request-Id"

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          408: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error", 431: "invalid_request_error"}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
        self.request_id = request_id  # set once the request was admitted: the id its journal entries carry

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after_s)))
        if self.request_id is not None:
            headers[REQUEST_ID_HEADER] = self.request_id
        return json_response(self.body(), self.status, headers)
