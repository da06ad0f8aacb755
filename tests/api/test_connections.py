"""The cap on open connections (max_connections): a connection beyond it gets a 503 `too_many_connections` and is
closed before hypercorn or the app see it; idle keep-alive connections and half-sent heads count; places come
back when connections close; and the leader's open-file limit always leaves room for the rank pool.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection

import pytest

from neurond.api import connections
from neurond.config import Config, ConfigError, load_config
from tests.conftest import REPO, chat_body, http

CAP = 8


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _refusal(s: socket.socket) -> tuple[bytes, dict, bool]:
    """(status line, JSON body, closed after it) of what the server sends on `s` without being asked."""
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, json.loads(body), True


def _get_health(s: socket.socket) -> bytes:
    """GET /health on a kept-alive connection: the whole response (head, then its content-length of body)."""
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(65536)
    return head


def _wait(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- hypercorn + asyncio
class _Server:
    """connections.serve with a trivial ASGI app on its own loop: the contract with hypercorn and asyncio that
    the cap relies on (the listening socket's accept() is what accepts), without a model."""

    def __init__(self, limit: int) -> None:
        from hypercorn.config import Config as HypercornConfig

        self.calls = 0
        self.loop = asyncio.new_event_loop()
        self.cap = connections.ConnectionCap(limit, 2.0)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(100)
        self.port = sock.getsockname()[1]
        self.listener = self.cap.listener(sock)
        hc = HypercornConfig()
        hc.accesslog = hc.errorlog = None
        hc.keep_alive_timeout = 1.0  # hypercorn closes an idle connection only then, even one the client closed

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            self.calls += 1
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

        async def main():
            self.stop = asyncio.Event()
            await connections.serve(app, hc, self.listener, self.stop.wait)

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        assert _wait(lambda: http("GET", f"http://127.0.0.1:{self.port}/", timeout=5)[0] == 200)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(15)


def test_the_listening_socket_accept_is_what_hypercorn_accepts_through():
    """Fails if hypercorn or asyncio stop accepting through our socket's accept() (uvloop, a hypercorn that
    makes its own sockets): the cap would silently hold nothing."""
    server = _Server(limit=2)
    try:
        calls = server.calls
        held = [_connect(server.port) for _ in range(2)]
        assert _wait(lambda: server.cap.open == 2), server.cap.open
        with _connect(server.port) as extra:
            head, body, _ = _refusal(extra)
        assert head.startswith(b"HTTP/1.1 503") and body["error"]["code"] == "too_many_connections"
        assert server.calls == calls and server.cap.refused == 1  # the app never ran for it
        for s in held:
            s.close()
        assert _wait(lambda: server.cap.open == 0), server.cap.open  # the places came back
        assert http("GET", f"http://127.0.0.1:{server.port}/", timeout=5)[0] == 200
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------- configuration
def test_max_connections_must_exceed_max_concurrent_requests():
    assert Config().max_connections > Config().max_concurrent_requests
    with pytest.raises(ConfigError, match="max_connections .* must exceed max_concurrent_requests"):
        load_config(None, env={}, overrides={"max_connections": 512, "max_concurrent_requests": 512})
    assert load_config(None, env={"NEUROND_MAX_CONNECTIONS": "9"},
                       overrides={"max_concurrent_requests": 8}).max_connections == 9


def _with_nofile(soft: int, hard: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)),
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))


def test_open_file_limit_is_raised_to_fit_or_the_start_is_refused(tmp_path):
    need = connections.fd_budget(1024, 8)
    assert need >= 1024 + connections.MAX_LINGERING + 200
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 4 * need if hard == resource.RLIM_INFINITY else min(hard, 4 * need)
    if hard < 2 * need:
        pytest.skip(f"the hard open-file limit here ({hard}) is too low to raise a soft one to {2 * need}")
    probe = ("-c", "import resource; from neurond.api.connections import ensure_fd_limit; "
                   "print(ensure_fd_limit(1024, 8), resource.getrlimit(resource.RLIMIT_NOFILE))")
    raised = _with_nofile(256, hard, *probe)
    assert raised.returncode == 0, raised.stderr
    assert raised.stdout.strip() == f"(256, {need}) ({need}, {hard})"
    kept = _with_nofile(2 * need, hard, *probe)  # enough already: left alone
    assert kept.stdout.strip() == f"({2 * need}, {2 * need}) ({2 * need}, {hard})", kept.stderr
    # A hard limit too low for the cap: `neurond serve` exits 2 with the reason, before loading anything.
    conf = tmp_path / "neurond.toml"
    conf.write_text("")
    t0 = time.monotonic()
    proc = _with_nofile(256, 512, "-m", "neurond", "serve", "--config", str(conf), "--device", "cpu",
                        "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "max_connections = 1024 needs up to" in proc.stderr and "hard limit (RLIMIT_NOFILE) is 512" in proc.stderr
    assert time.monotonic() - t0 < 30 and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------- a real daemon
@pytest.fixture(scope="module")
def capped(start_daemon, tmp_path_factory):
    conf = tmp_path_factory.mktemp("capped") / "neurond.toml"
    conf.write_text(f"max_connections = {CAP}\nmax_concurrent_requests = 4\n")
    d = start_daemon(1, ["--config", str(conf)])
    yield d
    d.stop()


def test_a_connection_beyond_the_cap_gets_503_and_is_closed(capped):
    """max_connections = 8: six silent connections, one that sent half a request head, one idle keep-alive
    connection after a completed request hold every place (hypercorn would close them after its 5 s
    keep_alive_timeout: all of this takes well under that). The next connection is answered 503 and closed,
    and so is a real HTTP client's request; once three are closed, requests are served again."""
    d = capped
    fds = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
    refused_before = d.metrics()["neurond_http_connections_refused_total"]
    held = [_connect(d.port) for _ in range(6)]
    slow = _connect(d.port)
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    keep = _connect(d.port)
    assert _get_health(keep).startswith(b"HTTP/1.1 200")  # kept alive: no Connection: close
    held += [slow, keep]
    try:
        t0 = time.monotonic()
        with _connect(d.port) as extra:
            head, body, closed = _refusal(extra)
        assert time.monotonic() - t0 < 5
        lines = head.decode().lower().split("\r\n")
        assert lines[0] == "http/1.1 503 service unavailable", head
        assert {"retry-after: 2", "connection: close", "content-type: application/json"} <= set(lines), head
        assert body["error"]["code"] == "too_many_connections" and body["error"]["type"] == "server_error", body
        assert str(CAP) in body["error"]["message"] and closed
        # A client that sends its request only after the 503 came (head and body in two writes, as clients
        # do) still reads the 503: the server reads what it sends and closes when it has hung up, not before.
        late = HTTPConnection("127.0.0.1", d.port, timeout=10)
        late.connect()
        time.sleep(0.5)
        payload = json.dumps(chat_body(max_tokens=2)).encode()
        late.putrequest("POST", "/v1/chat/completions")
        late.putheader("Content-Type", "application/json")
        late.putheader("Content-Length", str(len(payload)))
        late.endheaders()
        late.send(payload)
        reply = late.getresponse()
        assert reply.status == 503 and reply.getheader("retry-after") == "2"
        assert json.loads(reply.read())["error"]["code"] == "too_many_connections"
        late.close()
        status, _, body = d.chat(chat_body(max_tokens=2), timeout=10)  # and an ordinary one
        assert status == 503 and body["error"]["code"] == "too_many_connections", body
        # The held connections were not touched.
        assert _get_health(keep).startswith(b"HTTP/1.1 200")
        for s in held[:3]:
            s.close()
        # Places come back once hypercorn closes its side: at once for a connection it is answering, within its
        # keep_alive_timeout (5 s) for an idle one, even one the client closed.
        assert _wait(lambda: d.get("/health", timeout=5)[0] == 200)
        status, _, body = d.chat(chat_body(max_tokens=2))
        assert status == 200, body
    finally:
        for s in held:
            s.close()
    assert d.metrics()["neurond_http_connections_refused_total"] >= refused_before + 2
    assert d.metrics()["neurond_http_connections"] >= 1  # the scrape's own
    assert d.get("/ready")[0] == 200 and d.proc.poll() is None
    # Every descriptor of the refused and closed connections is given back.
    assert _wait(lambda: len(os.listdir(f"/proc/{d.proc.pid}/fd")) <= fds + 1), os.listdir(f"/proc/{d.proc.pid}/fd")


def test_a_flood_of_connections_never_starves_the_daemon(capped):
    """200 connections at once against a cap of 8: 8 held, the rest refused (each answered, each closed),
    and the daemon serves, repairs nothing and holds no more descriptors than before once they are gone."""
    d = capped
    # Every place free (hypercorn may still hold an earlier test's idle connections for a few seconds).
    assert _wait(lambda: d.get("/health")[0] == 200 and d.metrics()["neurond_http_connections"] == 1)
    fds = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
    flood = [_connect(d.port) for _ in range(200)]
    try:
        answered, waiting = 0, {s.fileno(): s for s in flood}
        deadline = time.monotonic() + 4  # before hypercorn's keep_alive_timeout closes the 8 held ones
        while waiting and time.monotonic() < deadline:
            ready, _, _ = select.select(list(waiting), [], [], 0.2)
            for fd in ready:
                answered += waiting.pop(fd).recv(12) == b"HTTP/1.1 503"
        assert answered == 200 - CAP, answered
    finally:
        for s in flood:
            s.close()
    assert _wait(lambda: d.get("/health", timeout=5)[0] == 200)
    assert d.chat(chat_body(max_tokens=4))[0] == 200
    status, _, state = d.get("/ready")
    assert status == 200 and state["state"] == "healthy"
    assert _wait(lambda: len(os.listdir(f"/proc/{d.proc.pid}/fd")) <= fds + 1), os.listdir(f"/proc/{d.proc.pid}/fd")
