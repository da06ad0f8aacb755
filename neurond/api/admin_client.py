"""A client of the admin API on its unix socket (for `neurond status`), with the standard library only: the
daemon's own dependencies include no HTTP client, and a status command must not need one."""

from __future__ import annotations

import http.client
import json
import socket


class AdminUnavailable(Exception):
    """Nothing answers on the admin socket: no such file, connection refused, or no answer in time."""


class AdminRefused(Exception):
    """The admin API answered with an error status (401: the token is wrong)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("neurond-admin", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    def __init__(self, socket_path: str, token: str, timeout_s: float = 5.0) -> None:
        self.socket_path = socket_path
        self._token = token
        self.timeout_s = timeout_s

    def get(self, path: str) -> dict:
        return self._request("GET", path)

    def post(self, path: str, body: dict | None = None) -> dict:
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        conn = _UnixHTTPConnection(self.socket_path, self.timeout_s)
        headers = {"Authorization": f"Bearer {self._token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:  # ENOENT, ECONNREFUSED, timeout, a closed connection
            raise AdminUnavailable(f"{type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = {"error": {"message": raw[:200].decode(errors="replace")}}
        if response.status >= 400:
            message = (payload.get("error") or {}).get("message", "") if isinstance(payload, dict) else ""
            raise AdminRefused(response.status, message)
        return payload
