"""The places on the API port (api/connections.py): a connection beyond max_connections gets a 503
`too_many_connections` and is closed before hypercorn or the app see it; idle keep-alive connections and half-sent
heads count; places come back when connections close; one client address holds at most max_connections_per_peer
places, so a flood from one address never locks out another; the last connection_reserve places are kept for
this host's own peers; the leader's open-file limit always leaves room for the rank pool; and HTTP/2 is not
served, neither by prior knowledge nor by an h2c upgrade.
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
from tests.conftest import MODEL, REPO, chat_body, http, wait_until

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
    return _response_head(s)


def _response_head(s: socket.socket) -> bytes:
    """Read one response (head, then its content-length of body) from `s`; return its head."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length")), 0))  # none: a 1xx
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

    def __init__(self, max_connections: int) -> None:
        from hypercorn.config import Config as HypercornConfig

        self.calls = 0
        self.loop = asyncio.new_event_loop()
        self.cap = connections.ConnectionCap(max_connections, 2.0)
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
    server = _Server(max_connections=2)
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


# ---------------------------------------------------------------------------------------------- who gets a place
def _take(cap: connections.ConnectionCap, peer: str, local: str | None = None):
    return cap.take(peer, lambda: local)


def test_the_reserve_is_for_this_hosts_own_peers_only():
    """max_connections = 10, connection_reserve = 3: peers from elsewhere get 7 places, then only loopback peers
    and a peer whose address is the connection's own (a probe to the machine's public address) get one."""
    cap = connections.ConnectionCap(10, 2.0, connection_reserve=3)
    remote = [_take(cap, f"198.51.100.{i}") for i in range(7)]
    assert all(isinstance(p, connections.Place) and not p.reserved for p in remote)
    assert _take(cap, "198.51.100.99") is connections.Refused.FULL
    assert _take(cap, "2001:db8::99", local="2001:db8::1") is connections.Refused.FULL  # not the address it reached
    local = [_take(cap, "127.0.0.1"), _take(cap, "::1"), _take(cap, "203.0.113.7", local="203.0.113.7")]
    assert all(isinstance(p, connections.Place) and p.reserved for p in local), local
    assert (cap.open, cap.reserved) == (10, 3)
    assert _take(cap, "127.0.0.1") is connections.Refused.FULL  # the reserve is used up too
    cap.give_back(remote[0])
    assert _take(cap, "198.51.100.99") == connections.Place("198.51.100.99", reserved=False)
    for place in local:
        cap.give_back(place)
    assert (cap.open, cap.reserved) == (7, 0)
    # No reserve: every place for anyone (the configuration check keeps connection_reserve < max_connections).
    bare = connections.ConnectionCap(2, 2.0)
    assert _take(bare, "198.51.100.1") and _take(bare, "198.51.100.2")
    assert _take(bare, "127.0.0.1") is connections.Refused.FULL


def test_one_peer_holds_at_most_max_connections_per_peer():
    """An IPv4 address, or an IPv6 /64, holds at most max_connections_per_peer shared places; others still get
    theirs. A loopback peer at its limit may take a reserved place (a probe from the address a local proxy uses)."""
    cap = connections.ConnectionCap(20, 2.0, max_connections_per_peer=2, connection_reserve=2)
    a = [_take(cap, "198.51.100.1"), _take(cap, "::ffff:198.51.100.1")]  # the same peer, IPv4-mapped
    assert all(isinstance(p, connections.Place) for p in a)
    assert _take(cap, "198.51.100.1") is connections.Refused.PER_PEER
    assert _take(cap, "198.51.100.2") == connections.Place("198.51.100.2", reserved=False)
    v6 = [_take(cap, "2001:db8::1"), _take(cap, "2001:db8::ffff:2")]
    assert v6[0] == v6[1] == connections.Place("2001:db8::/64", reserved=False)
    assert _take(cap, "2001:db8::3") is connections.Refused.PER_PEER  # another address of the same /64
    assert isinstance(_take(cap, "2001:db8:0:1::1"), connections.Place)  # another /64: another peer
    loop = [_take(cap, "127.0.0.2") for _ in range(5)]
    assert [p.reserved for p in loop[:4]] == [False, False, True, True] and loop[4] is connections.Refused.PER_PEER
    assert isinstance(_take(cap, "127.0.0.3"), connections.Place)  # another loopback address: another peer
    cap.give_back(a[0])
    assert _take(cap, "198.51.100.1") == a[0]  # its place came back to it
    for place in [a[1], *v6]:
        cap.give_back(place)
    assert "2001:db8::/64" not in cap.peers and cap.peers["198.51.100.1"] == 1  # a peer with none costs nothing


def test_refusals_say_which_limit():
    full = connections.refusal(8, 2.0, connection_reserve=2)
    peer = connections.refusal(8, 2.0, max_connections_per_peer=4)
    for raw, says in ((full, "max_connections = 8; the last 2 only for this host"),
                      (peer, "max_connections_per_peer = 4")):
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"connection: close" in head
        error = json.loads(body)["error"]
        assert error["code"] == "too_many_connections" and says in error["message"], error


# ---------------------------------------------------------------------------------------------- configuration
def test_max_connections_must_exceed_max_concurrent_requests():
    assert Config().max_connections > Config().max_concurrent_requests
    with pytest.raises(ConfigError, match="max_connections .* must exceed max_concurrent_requests"):
        load_config(None, env={}, overrides={"max_connections": 512, "max_concurrent_requests": 512})
    assert load_config(None, env={"NEUROND_MAX_CONNECTIONS": "9"},
                       overrides={"max_concurrent_requests": 8, "connection_reserve": 1}).max_connections == 9


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
    conf.write_text(f"max_connections = {CAP}\nmax_concurrent_requests = 4\nconnection_reserve = 2\n")
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


# ---------------------------------------------------------------------------------------------- one peer's flood
PER_PEER, RESERVE, PLACES = 4, 2, 12


@pytest.fixture(scope="module")
def peered(start_daemon, tmp_path_factory):
    conf = tmp_path_factory.mktemp("peered") / "neurond.toml"
    conf.write_text(f"max_connections = {PLACES}\nmax_connections_per_peer = {PER_PEER}\n"
                    f"connection_reserve = {RESERVE}\nmax_concurrent_requests = 4\n")
    d = start_daemon(1, ["--config", str(conf)])
    yield d
    d.stop()


class _Flood(threading.Thread):
    """A client on the loopback address `source` that keeps `want` connections to the port open or opening: it
    opens another for every one the server refuses (503) or closes (hypercorn closes an idle one after its 5 s
    keep_alive_timeout, and the flood takes the place again at once). What the reviewer of issue 30 ran."""

    def __init__(self, port: int, source: str, want: int) -> None:
        super().__init__(daemon=True)
        self.port, self.source, self.want = port, source, want
        self.refusals: list[bytes] = []  # the body of each 503
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def _open(self) -> socket.socket:
        s = socket.socket()
        s.settimeout(10)
        s.bind((self.source, 0))
        s.connect(("127.0.0.1", self.port))
        return s

    def run(self) -> None:
        open_: list[socket.socket] = []
        try:
            while not self.halt.is_set():
                while len(open_) < self.want:
                    open_.append(self._open())
                ready, _, _ = select.select(open_, [], [], 0.05)
                for s in ready:  # refused (a 503, then the server's FIN) or closed by the server
                    data = b""
                    try:
                        while chunk := s.recv(65536):
                            data += chunk
                    except ConnectionResetError:
                        pass
                    if data.startswith(b"HTTP/1.1 503"):
                        self.refusals.append(data.partition(b"\r\n\r\n")[2])
                    open_.remove(s)
                    s.close()
                self.halt.wait(0.1)  # at most `want` new connections a tenth of a second: a flood, not a CPU hog
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            for s in open_:
                s.close()


def _request(port: int, source: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """One request from the loopback address `source`: (status, JSON body)."""
    conn = HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, payload, {"Content-Type": "application/json"} if payload else {})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def test_a_flood_from_one_address_never_locks_out_another(peered):
    """max_connections = 12, 4 per peer, 2 kept for this host's own peers. A client on 127.0.0.2 keeps 30
    connections open or opening: it holds its 4 places (and, a loopback peer, the 2 reserved ones: which of them
    it holds is test_one_peer_holds_at_most_max_connections_per_peer's), every other attempt is refused for its
    own limit, and meanwhile 127.0.0.3 gets /health and a chat completion at the first attempt."""
    d = peered
    assert wait_until(lambda: d.metrics()["neurond_http_connections"] == 1, what="every place free")
    flood = _Flood(d.port, "127.0.0.2", want=30)
    flood.start()
    try:
        wait_until(lambda: len(flood.refusals) >= 30, what="the flood to be refused")
        assert _request(d.port, "127.0.0.3", "GET", "/health") == (200, {"status": "ok"})
        status, body = _request(d.port, "127.0.0.3", "POST", "/v1/chat/completions",
                                {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert status == 200 and body["object"] == "chat.completion", body
    finally:
        flood.halt.set()
        flood.join(30)
    assert flood.error is None, flood.error
    messages = {json.loads(b)["error"]["message"] for b in flood.refusals}
    assert messages == {f"this client address holds as many open connections as one address may "
                        f"(max_connections_per_peer = {PER_PEER}); close idle ones or try again later"}, messages
    assert d.metrics()["neurond_http_connections_refused_total"] >= len(flood.refusals)
    assert d.get("/ready")[0] == 200


# ---------------------------------------------------------------------------------------------- HTTP/1.1 only
def _read_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def test_http2_with_prior_knowledge_gets_505_and_a_closed_connection(peered):
    """An HTTP/2 client that skips the upgrade (the connection preface, then a SETTINGS frame) gets an HTTP/1.1
    505 and the connection closed, never an HTTP/2 SETTINGS frame back."""
    with _connect(peered.port) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        reply = _read_all(s)  # to the server's FIN: the connection is closed
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), reply[:200]
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "http_version_not_supported", body
    assert peered.get("/health")[0] == 200


def test_an_h2c_upgrade_is_ignored_and_answered_in_http11(peered):
    """`Upgrade: h2c` (RFC 7540's cleartext upgrade) gets no 101: the request is answered in HTTP/1.1, and the
    connection stays HTTP/1.1 for the next request."""
    with _connect(peered.port) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                  b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        head = _response_head(s)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"upgrade" not in head.lower(), head
        assert _get_health(s).startswith(b"HTTP/1.1 200 ")  # still HTTP/1.1 on the same connection
