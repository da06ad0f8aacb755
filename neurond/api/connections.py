"""A cap on the open connections to the API port, held where connections are accepted.

hypercorn 0.18 accepts every connection the kernel queues, and an idle keep-alive connection or a request head
sent a byte at a time holds a descriptor until keep_alive_timeout. A flood of them was bounded only by the
leader's open-file limit, which the rank pool needs too (pipes and pidfds) to respawn a rank. A check in the
ASGI app cannot help: the app never hears of a connection that has not sent a whole request head.

So neurond hands hypercorn a listening socket of its own class. asyncio's event loop accepts through the
listening socket's accept(); ours counts each connection until its socket is closed, whatever it is doing, and
answers one beyond the cap itself (503 `too_many_connections`, Retry-After, Connection: close), so neither
hypercorn nor the app ever runs for it. `ensure_fd_limit` makes sure the cap fits the open-file limit with room
to spare for the rank pool.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
import weakref

import orjson

from neurond.api.errors import APIError
from neurond.config import ConfigError

log = logging.getLogger("neurond.http")

# Closing a socket with unread input resets the connection, and a client that sent its request after our 503
# arrived may then lose the 503 before reading it. So a refused connection is half-closed and what the client
# still sends is read and dropped until it hangs up, for at most LINGER_S; at most MAX_LINGERING at once (more,
# in a flood, are closed at once: the cap must not turn into a second unbounded set of descriptors).
LINGER_S = 2.0
MAX_LINGERING = 32
# Descriptors the leader needs besides the API's connections: its listening sockets, the admin API and its
# clients, the journal, files it reads, threads; per rank two pipes and a pidfd, twice over while a rank is
# respawned or the pool reloaded. An idle TP=2 leader holds ~15 (docs/chaos.md); this is generous.
FD_RESERVE = 256
FD_PER_RANK = 16
_WARN_EVERY_S = 60.0


class ConnectionCap:
    """Counts the API's open connections and refuses those beyond `limit`. Runs on the event loop's thread."""

    def __init__(self, limit: int, retry_after_s: float, metrics=None) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0
        self.lingering = 0
        self._metrics = metrics
        self._response = refusal(limit, retry_after_s)
        self._tasks: set[asyncio.Task] = set()
        self._warned_at = -_WARN_EVERY_S
        if metrics is not None:
            metrics.http_connections.set_function(lambda: self.open)

    def listener(self, sock: socket.socket) -> CappedListener:
        """`sock`, a listening socket, as one whose accept() holds the cap (`sock` itself is detached)."""
        capped = CappedListener(sock.family, sock.type, sock.proto, fileno=sock.detach())
        capped.cap = self
        return capped

    def _admit(self, family, kind, proto, fd: int) -> socket.socket | None:
        if self.open >= self.limit:
            return None
        conn = _Counted(family, kind, proto, fileno=fd)
        self.open += 1
        # Exactly once: when asyncio closes the socket, or, should a socket ever be dropped unclosed, when it is
        # collected. A place that is never given back would shrink the cap for good.
        conn.release = weakref.finalize(conn, self._release)
        return conn

    def _release(self) -> None:
        self.open -= 1

    def _refuse(self, conn: socket.socket) -> None:
        self.refused += 1
        if self._metrics is not None:
            self._metrics.http_connections_refused.inc()
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning("refusing connections: %d open, max_connections = %d (%d refused so far)", self.open,
                        self.limit, self.refused)
        conn.setblocking(False)
        try:
            conn.send(self._response)  # a few hundred bytes into an empty socket buffer: never blocks
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        if self.lingering >= MAX_LINGERING:
            conn.close()
            return
        self.lingering += 1
        task = asyncio.get_running_loop().create_task(self._linger(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _linger(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(LINGER_S):
                while await loop.sock_recv(conn, 65536):
                    pass
        except (OSError, TimeoutError):
            pass
        finally:
            conn.close()
            self.lingering -= 1


class CappedListener(socket.socket):
    """A listening socket whose accept() admits at most `cap.limit` open connections. asyncio's selector
    event loop accepts through it (BaseSelectorEventLoop._accept_connection calls `sock.accept()`);
    tests/api/test_connections.py fails if that stops being so."""

    cap: ConnectionCap

    def accept(self):
        while True:
            fd, addr = self._accept()  # BlockingIOError once none is waiting: asyncio's cue to stop
            conn = self.cap._admit(self.family, self.type, self.proto, fd)
            if conn is not None:
                return conn, addr
            self.cap._refuse(socket.socket(self.family, self.type, self.proto, fileno=fd))


class _Counted(socket.socket):
    """An admitted connection: gives its place back when closed."""

    release: weakref.finalize

    def close(self) -> None:
        super().close()
        self.release()


def refusal(limit: int, retry_after_s: float) -> bytes:
    """The whole HTTP response a connection beyond the cap gets."""
    body = orjson.dumps(APIError(503, f"the server has {limit} open connections, its limit (max_connections); "
                                 "try again later", code="too_many_connections").body())
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"retry-after: {max(1, round(retry_after_s))}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


async def serve(app, config, listener: CappedListener, shutdown_trigger) -> None:
    """hypercorn's serve() on our own listening socket. hypercorn.asyncio.serve takes its sockets only from
    config.bind (and would make a plain socket of an fd:// bind), so this calls what it calls, worker_serve,
    with the `sockets` argument hypercorn's own worker processes use."""
    from hypercorn.asyncio.run import worker_serve
    from hypercorn.config import Sockets
    from hypercorn.utils import wrap_app

    await worker_serve(wrap_app(app, config.wsgi_max_body_size, "asgi"), config,
                       sockets=Sockets(secure_sockets=[], insecure_sockets=[listener], quic_sockets=[]),
                       shutdown_trigger=shutdown_trigger)


def fd_budget(max_connections: int, tp_size: int) -> int:
    """Open files the leader may need with max_connections connections open."""
    return max_connections + MAX_LINGERING + FD_RESERVE + FD_PER_RANK * tp_size


def ensure_fd_limit(max_connections: int, tp_size: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to fd_budget() when it is lower, so that client connections can never take
    the descriptors a rank's respawn needs (EMFILE). ConfigError when the hard limit does not allow it.
    Returns (soft limit before, soft limit now)."""
    need = fd_budget(max_connections, tp_size)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft, soft
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ConfigError(f"max_connections = {max_connections} needs up to {need} open files at tp_size "
                          f"{tp_size}, but the hard limit (RLIMIT_NOFILE) is {hard}: lower max_connections, or raise "
                          f"the limit (LimitNOFILE= in the unit, ulimit -Hn)")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"max_connections = {max_connections} needs up to {need} open files, the soft limit "
                          f"(RLIMIT_NOFILE) is {soft} and raising it failed: {exc}") from None
    log.info("raised the open-file limit from %d to %d for max_connections = %d", soft, need, max_connections)
    return soft, need
