"""`neurond serve`: the leader process. HTTP server, supervisor and engine on one asyncio loop.

Order matters: the HTTP port opens first (so /health answers and /ready says `loading`), and the model loads
in the background; loading inside ASGI startup would hit hypercorn's startup timeout with the port closed.
Signal handlers only set an event; the shutdown itself runs on the loop: STOPPING=1, stop accepting, fail
what waits, stop every rank (SIGTERM, then SIGKILL), exit. SIGHUP reloads the model (RELOADING=1 ... READY=1).
systemd hears READY=1 once the API answers HTTP, STATUS= at every lifecycle transition, and WATCHDOG=1 from
the event loop while the supervisor makes progress (docs/systemd.md); events go to the journal (docs/journal.md).

The leader never imports torch: the built-in model is written by a child process, tokenisation uses the
tokenizers library, and all tensor work happens in the rank workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from statemachine.exceptions import TransitionNotAllowed

from neurond.api import connections
from neurond.api.app import API
from neurond.config import Config, is_loopback
from neurond.engine.deadline import StepDeadline
from neurond.engine.engine import Engine
from neurond.engine.request import RETRY_AFTER_S
from neurond.lifecycle import Cause, LifecycleState
from neurond.observe.events import Event, TeeSink, emit
from neurond.observe.journal import JournalSink
from neurond.observe.metrics import MetricsSink
from neurond.observe.notify import LifecycleStatus, Notifier, watchdog
from neurond.pool.ladder import worst_case_s
from neurond.pool.supervisor import Supervisor
from neurond.served_model import ModelError, ServedModel, load_served_model, resolve_model_dir

log = logging.getLogger("neurond")

# Exit codes: a documented contract with systemd and scripts (docs/operator-guide.md, "Exit codes").
EXIT_OK = 0
EXIT_CONFIG = 2  # bad configuration or model directory
EXIT_SERVE_FAILED = 3  # the HTTP server could not start (port in use, ...)
EXIT_GAVE_UP = 4  # recovery gave up (crash-loop breaker); systemd's Restart= may start a fresh daemon


def _read_token(path: str, setting: str = "token file") -> str | None:
    """A token from a file (never from the command line, where `ps` shows it); None when not configured.
    ValueError for a file others could read or change (token_file_problem), OSError for one that cannot be read."""
    if not path:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)  # of the file read, not of whatever the path names a moment later
        problem = token_file_problem(st.st_mode, st.st_uid, os.geteuid())
        if problem:
            raise ValueError(f"{setting} {path}: {problem}")
        token = f.read().decode().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def token_file_problem(mode: int, owner: int, euid: int) -> str | None:
    """Why a token file with this mode and owner would let someone else read or replace the token, or None.

    Nobody but its owner may write it, and nobody outside its owner and group may read it. Its owner is root or
    the user neurond runs as (another user could read it, or replace it). Its group may read it only when root
    owns it: 0640 root:neurond is how the package installs the admin token, so the service user reads it through
    its group (PostgreSQL treats its key files the same way); a file the service user owns itself needs no
    group at all (0600)."""
    if not stat.S_ISREG(mode):
        return "not a regular file"
    perm = stat.S_IMODE(mode)
    if owner not in (0, euid):
        return (f"owned by uid {owner}, who could read or replace it: it must belong to root or to the user "
                f"neurond runs as (uid {euid})")
    if perm & 0o022:
        who = "its group and others" if perm & 0o022 == 0o022 else "its group" if perm & 0o020 else "others"
        return f"mode {perm:04o} lets {who} write it: chmod 0600 it"
    if perm & 0o004:
        return f"mode {perm:04o} lets every user read it: chmod 0600 it (0640 with owner root for the service's group)"
    if perm & 0o040 and owner != 0:
        return (f"mode {perm:04o} lets its group read it, and it is not root's: chmod 0600 it (or chown it to "
                f"root and keep 0640, as the package does, for the service's group)")
    return None


@dataclass(frozen=True, slots=True)
class Tokens:
    api: str | None  # bearer token of the public API; None: no authentication
    admin: str | None  # bearer token of the admin socket; None: no admin API


def read_tokens(config: Config) -> Tokens:
    """Both tokens, read before anything starts. The admin token must not also open the public API: whoever
    holds the API token must never be able to reload the model or inject faults."""
    admin = _read_token(config.admin_token_file, "admin_token_file") if config.admin_socket else None
    tokens = Tokens(_read_token(config.api_token_file, "api_token_file"), admin)
    if tokens.admin is not None and tokens.admin == tokens.api:
        raise ValueError("the admin token must differ from the API token (admin_token_file, api_token_file)")
    if tokens.api is None and not is_loopback(config.host):  # allowed by allow_unauthenticated (Config.validate)
        log.warning("the API on %s:%d needs no token (allow_unauthenticated = true, no api_token_file): anyone who "
                    "reaches the port can use the model", config.host, config.port)
    return tokens


class Server:
    def __init__(self, config: Config, tokens: Tokens | None = None) -> None:
        self.config = config
        self.tokens = tokens if tokens is not None else read_tokens(config)
        self.shutdown = asyncio.Event()
        self.hup = asyncio.Event()  # SIGHUP: reload the model (the handler only sets this)
        self.supervisor: Supervisor | None = None
        self.engine: Engine | None = None
        self.exit_code = EXIT_OK
        self.notifier = Notifier()
        self.status = LifecycleStatus(self.notifier, config.model_name(), config.tp_size)
        self.started_at = time.time()  # for the uptime in /admin/status
        self._tasks: list[asyncio.Task] = []

    async def run(self) -> int:
        c = self.config
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.shutdown.set)
        loop.add_signal_handler(signal.SIGHUP, self.hup.set)
        self.notifier.status(f"starting: {c.model_name()}, tp_size={c.tp_size}")
        # The watchdog runs from the first moment: systemd counts WatchdogSec= from the start of the process,
        # and writing the built-in model or reading a tokenizer may take a while (done off the loop).
        self._spawn(watchdog(self.notifier, self._unresponsive), "neurond-watchdog")
        try:
            return await self._serve(loop)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> int:
        c = self.config
        try:  # before any rank starts: a checkpoint that cannot be served must not go through the breaker
            model_dir = await asyncio.to_thread(resolve_model_dir, c)
            model = await asyncio.to_thread(load_served_model, model_dir, c.model_name(), c.max_model_len)
        except ModelError as exc:
            return startup_failed(exc.cause, exc.problem, exc.path, c)
        try:  # bound here, so READY can never be about someone else's port
            listener = bind_http(c.host, c.port)
        except OSError as exc:
            log.error("HTTP server failed: cannot listen on %s:%d: %s", c.host, c.port, exc)
            return EXIT_SERVE_FAILED
        supervisor, engine, api = self._wire(model, model_dir)
        servers = [self._api_server(api, listener)]
        if c.admin_socket:
            servers.append(self._admin_server())
        supervisor.on_gave_up.append(self._gave_up)

        engine.start()
        load_task = loop.create_task(supervisor.start(), name="neurond-load")
        self._spawn(self._announce_ready(c.host, c.port), "neurond-ready")
        self._spawn(self._reloads(), "neurond-reload")
        log.info("serving %s (tp_size=%d) on %s:%d", model.name, c.tp_size, c.host, c.port)
        try:
            await asyncio.gather(*servers)
        except OSError as exc:
            log.error("HTTP server failed: %s", exc)
            self.exit_code = EXIT_SERVE_FAILED
            self.shutdown.set()
        finally:
            log.info("shutting down")
            self.notifier.stopping(f"stopping: {self.status.line()}")
            load_task.cancel()
            await engine.stop()
            await supervisor.stop()
            self.notifier.status("stopped; all ranks reaped")
            log.info("stopped; all ranks reaped")
        return self.exit_code

    def _wire(self, model: ServedModel, model_dir: Path) -> tuple[Supervisor, Engine, API]:
        """The supervisor, the engine and the API over them, with the metrics, the journal and STATUS= they
        report to (the settings passed by their configuration's names)."""
        c = self.config
        self.metrics = MetricsSink(model=model.name, tp_size=c.tp_size)
        # The journal, the metrics and STATUS= see the same events.
        events = TeeSink(JournalSink(), self.metrics, self.status)
        self.supervisor = supervisor = Supervisor(c, str(model_dir), events=events,
                                                  context_len=model.context_len)
        self.status.source = supervisor
        deadline = StepDeadline(c.step_deadline_floor_s, c.step_deadline_ceiling_s, c.step_deadline_factor)
        self.engine = engine = Engine(
            supervisor, model.tokenizer, deadline=deadline, max_queued_requests=c.max_queued_requests,
            metrics=self.metrics, resume_wait_s=c.resume_wait_s, max_batch_size=c.max_batch_size,
            prefill_chunk_tokens=c.prefill_chunk_tokens, max_request_faults=c.max_request_faults,
            decode_steps_per_call=c.decode_steps_per_call, context_len=model.context_len,
            kv_cache_blocks=c.kv_cache_blocks, kv_block_size=c.kv_block_size)
        api = API(model, engine, supervisor, max_body_bytes=c.max_body_bytes,
                  default_max_tokens=c.default_max_tokens, api_token=self.tokens.api,
                  max_concurrent_requests=c.max_concurrent_requests, body_timeout_s=c.body_timeout_s,
                  max_header_bytes=c.max_header_bytes, metrics=self.metrics)
        return supervisor, engine, api

    def _api_server(self, api: API, sock: socket.socket) -> Coroutine[Any, Any, None]:
        """The public API's HTTP server on `sock` (bound by `_serve`), its connections accepted through the cap."""
        c = self.config
        cap = connections.ConnectionCap(c.max_connections, RETRY_AFTER_S, metrics=self.metrics,
                                        max_connections_per_peer=c.max_connections_per_peer,
                                        connection_reserve=c.connection_reserve)
        hc = HypercornConfig()
        hc.errorlog = logging.getLogger("neurond.http")
        hc.accesslog = None
        hc.h11_max_incomplete_size = c.max_header_bytes  # a request head larger than this is refused
        hc.graceful_timeout = 5.0
        return connections.serve(api.app(), hc, cap.listener(sock), shutdown_trigger=self.shutdown.wait)

    def _spawn(self, coro: Coroutine[Any, Any, object], name: str) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=name))

    async def _announce_ready(self, host: str, port: int) -> None:
        """READY=1 once the API answers an HTTP request: hypercorn has no ready callback, and a socket that
        listens is not yet one that hypercorn accepts on."""
        while not self.shutdown.is_set():
            if await http_answers(host, port):
                self.notifier.ready(self.status.line())
                log.info("HTTP API ready on %s:%d", host, port)
                return
            await asyncio.sleep(0.05)

    async def _reloads(self) -> None:
        """SIGHUP: RELOADING=1, reload the model from its checkpoint, READY=1 (also when the reload could not
        run, or systemd would show the unit `reloading` for ever)."""
        supervisor = self.supervisor
        assert supervisor is not None  # serve() made it before starting this task
        while True:
            await self.hup.wait()
            self.hup.clear()
            log.info("SIGHUP: reloading the model")
            self.notifier.reloading(f"reloading (SIGHUP): {self.status.line()}")
            try:
                await supervisor.reload("sighup")
            except TransitionNotAllowed:
                log.warning("SIGHUP: cannot reload while the model is %s; ignored", supervisor.state)
            except Exception:  # a failed reload must not end the reload loop
                log.exception("SIGHUP: reload failed")
            self.notifier.ready(self.status.line())

    def _unresponsive(self) -> str | None:
        """Why the supervisor is not making progress, or None (the ladder's worst case says how long is too long)."""
        sup, c = self.supervisor, self.config
        if sup is None or sup.state in (LifecycleState.HEALTHY, LifecycleState.UNLOADED, LifecycleState.STOPPED):
            return None
        bound = worst_case_s(c)
        stuck = time.monotonic() - self.status.since
        return f"{sup.state} for {stuck:.0f} s (bound {bound:.0f} s)" if stuck > bound else None

    def _admin_server(self) -> Coroutine[Any, Any, None]:
        from neurond.api.admin import AdminAPI

        c = self.config
        # _serve made the supervisor before the servers; read_tokens read the admin token, as admin_socket is set
        assert self.supervisor is not None and self.tokens.admin is not None
        admin = AdminAPI(self.supervisor, self.tokens.admin, engine=self.engine, started_at=self.started_at)
        hc = HypercornConfig()
        hc.bind = [f"unix:{c.admin_socket}"]
        hc.errorlog = logging.getLogger("neurond.admin")
        hc.accesslog = None
        hc.umask = 0o077  # the socket is for root/the service user only
        log.info("admin API on unix:%s (fault injection %s)", c.admin_socket, "ON" if c.fault_injection else "off")
        return hypercorn_serve(admin.app(), hc, shutdown_trigger=self.shutdown.wait)

    def _gave_up(self, cause: Cause | None) -> None:
        delay = self.config.unloaded_exit_s
        if delay <= 0:
            log.error("recovery gave up (%s); serving 503 until an operator reloads", cause.name if cause else "?")
            return
        log.error("recovery gave up (%s); exiting with code %d in %.0f s", cause.name if cause else "?",
                  EXIT_GAVE_UP, delay)
        self.notifier.status(f"{self.status.line()}; exiting with code {EXIT_GAVE_UP} in {delay:.0f} s")

        def leave() -> None:
            assert self.supervisor is not None  # _gave_up is the supervisor's own callback
            if self.supervisor.state == LifecycleState.UNLOADED:
                self.exit_code = EXIT_GAVE_UP
                self.shutdown.set()

        asyncio.get_running_loop().call_later(delay, leave)


def bind_http(host: str, port: int) -> socket.socket:
    """The API's listening socket, made as hypercorn would make it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(100)
    except OSError:
        sock.close()
        raise
    return sock


async def http_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when GET /health on our own address gets an HTTP response (any status)."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(target, port), timeout)
    except (TimeoutError, OSError):
        return False
    try:
        writer.write(f"GET /health HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
        first = await asyncio.wait_for(reader.readline(), timeout)
        return first.startswith(b"HTTP/")
    except (TimeoutError, OSError):
        return False
    finally:
        writer.close()


def startup_failed(cause: str, problem: str, path: str | None = None, config: Config | None = None) -> int:
    """The configuration or the model cannot be served: one startup_failed journal entry naming the file and the
    problem (docs/journal.md), and EXIT_CONFIG for the caller to exit with (systemd does not restart it)."""
    emit(JournalSink(), Event.STARTUP_FAILED, cause=cause, path=path, detail=problem,
         model=config.model_name() if config else None, tp_size=config.tp_size if config else None)
    return EXIT_CONFIG


def named_file(text: str, *paths: str) -> str | None:
    """The first of `paths` that `text` (an error message) names, or None."""
    return next((p for p in paths if p and p in text), None)


def serve(config: Config) -> int:
    try:
        tokens = read_tokens(config)  # OSError, ValueError: missing, unreadable, empty or shared token file
    except OSError as exc:
        return startup_failed("token_file", exc.strerror or str(exc), exc.filename, config)
    except ValueError as exc:
        return startup_failed("token_file", str(exc),
                              named_file(str(exc), config.api_token_file, config.admin_token_file), config)
    try:
        connections.ensure_fd_limit(config.max_connections, config.tp_size)  # ConfigError: hard limit too low
    except ValueError as exc:  # (ConfigError is a ValueError)
        return startup_failed("fd_limit", str(exc), None, config)
    return asyncio.run(Server(config, tokens).run())
