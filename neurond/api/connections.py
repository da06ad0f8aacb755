"""Who may hold the API port's connections, decided where connections are accepted.

hypercorn 0.18 accepts every connection the kernel queues, and an idle keep-alive connection or a request head
sent a byte at a time holds a descriptor until keep_alive_timeout. A flood of them was bounded only by the
leader's open-file limit, which the rank pool needs too (pipes and pidfds) to respawn a rank. A check in the
ASGI app cannot help: the app never hears of a connection that has not sent a whole request head.

So neurond hands hypercorn a listening socket of its own class. asyncio's event loop accepts through the
listening socket's accept(); ours gives each connection a place, held until its socket is closed whatever it is
doing, and answers one that gets none itself (503 `too_many_connections`, Retry-After, Connection: close), so
neither hypercorn nor the app ever runs for it. `ensure_fd_limit` makes sure the cap fits the open-file limit
with room to spare for the rank pool.

The places, and why (issue 30: one unauthenticated client took all 1,024 in 3.1 s, and `GET /health` then
answered 503). The check comes before authentication and before any byte is read: all accept() knows is the
peer's address (and the connection's own), never the path or the token. So the rules are about addresses:

- `max_connections` places in all, idle keep-alive connections and half-sent heads included.
- Per peer: one peer address holds at most `max_connections_per_peer` of the shared places, so one client can
  never lock the others out. A peer is an IPv4 address, or an IPv6 /64 (one host of IPv6 commonly has a whole
  /64 to pick source addresses from; counting single addresses would let it pose as millions of peers). Each
  loopback address (all of 127.0.0.0/8) is a peer of its own. Behind a load balancer or a proxy every request
  comes from its few addresses: the default (half of max_connections, as many as max_concurrent_requests) lets
  one of them use every request slot; a bigger connection pool needs the setting raised.
- The reserve: the last `connection_reserve` places are for peers on this host only: loopback addresses, and a
  peer whose address is the connection's own local address (a probe pointed at the machine's own public
  address; a remote peer cannot complete a TCP handshake from an address of this host, the replies never leave
  it). That is where systemd, a local haproxy or Prometheus agent, `curl localhost` and neurond's own readiness
  check run: those are the health probes the reserve is for. A probe from another machine (a remote load
  balancer; kubelet, which probes a pod from the node's address) is an ordinary peer: it gets a shared place,
  or none while they are all taken. A local peer takes a shared place while one is free and it is under its
  per-peer limit, else a reserved one, so a local proxy at its per-peer limit does not lock out a probe from
  the same loopback address. Reserved places are not limited per peer: a local user can do worse than open
  connections.

A connection refused for its peer's limit is told so (another message, the same 503 and code); both kinds are
counted in neurond_http_connections_refused_total, and `refused_per_peer` here.

The API is served HTTP/1.1 only (`http11.py`, which `serve` applies).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import resource
import socket
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from neurond.api.errors import APIError
from neurond.api.http11 import http11_only, http_error
from neurond.config import ConfigError

if TYPE_CHECKING:
    from hypercorn.config import Config as HypercornConfig
    from starlette.types import ASGIApp

    from neurond.observe.metrics import MetricsSink

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


@dataclass(frozen=True, slots=True)
class Place:
    """A connection's place: shared (counted against its peer) or reserved (for a peer on this host)."""

    peer: str  # the peer's key (peer_key)
    reserved: bool


class Refused(enum.Enum):
    FULL = "full"  # every place this peer may take is taken
    PER_PEER = "per_peer"  # this peer holds max_connections_per_peer places


def peer_key(address: str) -> tuple[str, bool]:
    """(what the per-peer limit counts, whether the peer is a loopback address) for a peer's IP address: an IPv4
    address (also when it arrives IPv4-mapped on a dual-stack socket), an IPv6 loopback address itself, any
    other IPv6 address as its /64."""
    ip = _ip(address)
    if ip is None:
        return address, False  # not an IP address: a peer of its own, not a local one
    if isinstance(ip, ipaddress.IPv4Address) or ip.is_loopback:
        return str(ip), ip.is_loopback
    return str(ipaddress.IPv6Network((ip, 64), strict=False)), False


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 link-local address may carry its %zone
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _same_host(peer: str, local: str | None) -> bool:
    """The peer's address is the one the connection arrived at: the peer runs on this host."""
    ip = _ip(peer)
    return ip is not None and local is not None and ip == _ip(local)


class ConnectionCap:
    """Gives the API's connections their places (the module's docstring has the rules) and refuses those that
    get none. Runs on the event loop's thread. The settings keep their configuration's names."""

    def __init__(self, max_connections: int, retry_after_s: float, metrics: MetricsSink | None = None, *,
                 max_connections_per_peer: int | None = None, connection_reserve: int = 0) -> None:
        if not 0 <= connection_reserve < max_connections:
            raise ValueError(f"need 0 <= connection_reserve < max_connections, got {connection_reserve} and "
                             f"{max_connections}")
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections if max_connections_per_peer is None \
            else max_connections_per_peer
        self.connection_reserve = connection_reserve
        self.open = 0  # every admitted connection not yet closed
        self.reserved = 0  # of them, those in a reserved place
        self.peers: dict[str, int] = {}  # peer key -> shared places it holds (no entry: none)
        self.refused = 0
        self.refused_per_peer = 0
        self.lingering = 0
        self._metrics = metrics
        self._responses = {
            Refused.FULL: refusal(max_connections, retry_after_s, connection_reserve=connection_reserve),
            Refused.PER_PEER: refusal(max_connections, retry_after_s,
                                      max_connections_per_peer=self.max_connections_per_peer)}
        self._tasks: set[asyncio.Task] = set()
        self._warned_at = -_WARN_EVERY_S
        if metrics is not None:
            metrics.http_connections.set_function(lambda: self.open)

    def listener(self, sock: socket.socket) -> CappedListener:
        """`sock`, a listening socket, as one whose accept() holds the cap (`sock` itself is detached)."""
        capped = CappedListener(sock.family, sock.type, sock.proto, fileno=sock.detach())
        capped.cap = self
        return capped

    def take(self, peer: str, local: Callable[[], str | None] = lambda: None) -> Place | Refused:
        """A place for a connection from `peer` (an IP address), or why there is none. `local()`: the address
        the connection arrived at, asked only when a reserved place is the peer's last chance."""
        key, loopback = peer_key(peer)
        held = self.peers.get(key, 0)
        shared = self.open - self.reserved  # connections in shared places
        if shared < self.max_connections - self.connection_reserve and held < self.max_connections_per_peer:
            self.peers[key] = held + 1
            self.open += 1
            return Place(key, reserved=False)
        if self.reserved < self.connection_reserve and (loopback or _same_host(peer, local())):
            self.reserved += 1
            self.open += 1
            return Place(key, reserved=True)
        return Refused.PER_PEER if held >= self.max_connections_per_peer else Refused.FULL

    def give_back(self, place: Place) -> None:
        self.open -= 1
        if place.reserved:
            self.reserved -= 1
            return
        left = self.peers[place.peer] - 1
        if left:
            self.peers[place.peer] = left
        else:
            del self.peers[place.peer]  # a peer that holds nothing costs nothing

    def _admit(self, family: int, kind: int, proto: int, fd: int, addr: Any) -> socket.socket | None:
        peer = addr[0] if isinstance(addr, tuple) else str(addr)
        place = self.take(peer, lambda: _local_address(family, kind, proto, fd))
        if isinstance(place, Refused):
            self._refuse(socket.socket(family, kind, proto, fileno=fd), place, peer)
            return None
        conn = _Counted(family, kind, proto, fileno=fd)
        # Exactly once: when asyncio closes the socket, or, should a socket ever be dropped unclosed, when it is
        # collected. A place that is never given back would shrink the cap for good.
        conn.release = weakref.finalize(conn, self.give_back, place)
        return conn

    def _refuse(self, conn: socket.socket, why: Refused, peer: str) -> None:
        self.refused += 1
        self.refused_per_peer += why is Refused.PER_PEER
        if self._metrics is not None:
            self._metrics.http_connections_refused.inc()
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            if why is Refused.PER_PEER:
                log.warning("refusing connections from %s: it holds %d, max_connections_per_peer = %d (%d open, "
                            "%d refused so far)", peer, self.peers.get(peer_key(peer)[0], 0),
                            self.max_connections_per_peer, self.open, self.refused)
            else:
                log.warning("refusing connections: %d open, max_connections = %d, of them %d reserved for this "
                            "host (%d refused so far)", self.open, self.max_connections, self.connection_reserve,
                            self.refused)
        conn.setblocking(False)
        try:
            conn.send(self._responses[why])  # a few hundred bytes into an empty socket buffer: never blocks
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


def _local_address(family: int, kind: int, proto: int, fd: int) -> str | None:
    """The address a connection arrived at (getsockname of its descriptor, which stays open)."""
    sock = socket.socket(family, kind, proto, fileno=fd)
    try:
        name = sock.getsockname()
        return name[0] if isinstance(name, tuple) else None
    except OSError:
        return None
    finally:
        sock.detach()


class CappedListener(socket.socket):
    """A listening socket whose accept() admits only connections that get a place (ConnectionCap). asyncio's
    selector event loop accepts through it (BaseSelectorEventLoop._accept_connection calls `sock.accept()`);
    tests/api/test_connections.py fails if that stops being so."""

    cap: ConnectionCap

    def accept(self) -> tuple[socket.socket, Any]:
        while True:
            # BlockingIOError once none is waiting: asyncio's cue to stop. (_accept: the C socket's own, which
            # socket.socket.accept calls too; typeshed does not declare it.)
            fd, addr = self._accept()  # type: ignore[attr-defined]
            conn = self.cap._admit(self.family, self.type, self.proto, fd, addr)
            if conn is not None:
                return conn, addr


class _Counted(socket.socket):
    """An admitted connection: gives its place back when closed."""

    release: weakref.finalize

    def close(self) -> None:
        super().close()
        self.release()


def refusal(max_connections: int, retry_after_s: float, *, connection_reserve: int = 0,
            max_connections_per_peer: int | None = None) -> bytes:
    """The whole HTTP response a connection that gets no place is sent: for its peer's limit when
    `max_connections_per_peer` is given, else for the server's."""
    if max_connections_per_peer is not None:
        message = (f"this client address holds as many open connections as one address may (max_connections_per_peer "
                   f"= {max_connections_per_peer}); close idle ones or try again later")
    else:
        local = (f"; the last {connection_reserve} only for this host's own clients, connection_reserve"
                 if connection_reserve else "")
        message = (f"the server holds all the connections it takes (max_connections = {max_connections}{local}); try "
                   f"again later")
    return http_error(APIError(503, message, code="too_many_connections"), retry_after_s)


async def serve(app: ASGIApp, config: HypercornConfig, listener: CappedListener,
                shutdown_trigger: Callable[[], Awaitable[object]]) -> None:
    """hypercorn's serve() on our own listening socket, HTTP/1.1 only (http11_only). hypercorn.asyncio.serve
    takes its sockets only from config.bind (and would make a plain socket of an fd:// bind), so this calls what
    it calls, worker_serve, with the `sockets` argument hypercorn's own worker processes use."""
    from hypercorn.asyncio.run import worker_serve
    from hypercorn.config import Sockets
    from hypercorn.utils import wrap_app

    http11_only()
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
