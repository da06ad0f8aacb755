"""HTTP at the byte level, for what an HTTP client library will not send: malformed heads, bodies that never
end, heads of any size."""

from __future__ import annotations

import socket


def exchange(port: int, head: bytes, chunks=(), timeout: float = 10) -> bytes:
    """Send a request head, then body chunks until the server answers or hangs up; return its response.
    (The server may answer and close before everything is sent: that is often the point, not an error.)"""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(head)
            for chunk in chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = b""
        try:
            while b"\r\n\r\n" not in reply or len(reply) < 200:
                data = s.recv(65536)
                if not data:
                    break
                reply += data
        except (ConnectionResetError, TimeoutError):
            pass
        return reply
