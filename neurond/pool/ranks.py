"""One rank worker process as the leader sees it: start (pool/launcher.py), pipes, death notice (pidfd), kill.

Everything here is non-blocking on the event loop: replies and the process sentinel are watched with
`loop.add_reader`, so a rank's death is noticed the moment the process exits, not by polling. Sending a
small command writes straight into the pipe (the worker reads it promptly and only one call per rank is in
flight, so the pipe buffer never fills); a large one (a long prompt) is written from a thread, so a rank that
stopped reading can never block the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

from neurond import protocol as p
from neurond.pool.launcher import Launcher, Process

Command = p.StepCommand | p.ControlCommand | p.WorkerSpec

log = logging.getLogger("neurond.pool")

_DIRECT_SEND_LIMIT = 16 * 1024  # bytes; well under the 64 KiB pipe buffer


class RankProcess:
    """A spawned worker. `on_reply(rank, reply)` and `on_exit(rank, exitcode)` run on the event loop."""

    def __init__(self, spec: p.WorkerSpec | None, launcher: Launcher) -> None:
        self.spec = spec
        self.launcher = launcher
        self.rank = spec.rank if spec is not None else -1
        self.env: dict[str, str] = {}
        self.process: Process | None = None
        self._pidfd: int | None = None
        self.step_conn: Connection | None = None
        self.ctrl_conn: Connection | None = None
        self.exitcode: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: list[int] = []
        self._exited: asyncio.Event | None = None
        self._imported = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.exitcode is None

    @classmethod
    def spare(cls, env: tuple[tuple[str, str], ...], launcher: Launcher) -> RankProcess:
        """A worker process started before it is needed: it imports torch and transformers, then waits for
        the WorkerSpec that makes it a rank (`assign`). It holds no device until then."""
        proc = cls(None, launcher)
        proc._launch(env)
        return proc

    def _launch(self, env: tuple[tuple[str, str], ...]) -> None:
        self.env = dict(env)
        self.process, self.step_conn, self.ctrl_conn = self.launcher.launch(env)

    @property
    def imported(self) -> bool:
        """Whether the process said its imports are done (p.Imported; read here only before `start`)."""
        if not self._imported and self._loop is None and self.ctrl_conn is not None:
            try:
                while self.ctrl_conn.poll():
                    self._imported = isinstance(self.ctrl_conn.recv(), p.Imported) or self._imported
            except (EOFError, OSError):
                pass
        return self._imported

    def assign(self, spec: p.WorkerSpec) -> None:
        """Make a spare this rank (before `start`)."""
        self.spec = spec
        self.rank = spec.rank

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_reply: Callable[[int, object], None],
        on_exit: Callable[[int, int | None], None],
    ) -> None:
        """Start the process (or take over a spare's) and send it its spec. Raises OSError when a spare died."""
        spec = self.spec
        assert spec is not None  # a spare is assigned its spec first
        if self.process is None:
            self._launch(spec.env)
        process, step_conn, ctrl_conn = self.process, self.step_conn, self.ctrl_conn
        assert process is not None and step_conn is not None and ctrl_conn is not None  # _launch made them
        step_conn.send(spec)
        # A pidfd becomes readable when the process exits: death is an event, not something to poll for.
        self._pidfd = os.pidfd_open(process.pid)
        self._loop = loop
        self._exited = exited = asyncio.Event()

        def drain(conn: Connection) -> None:
            try:
                while conn.poll():
                    on_reply(self.rank, conn.recv())
            except (EOFError, OSError):
                self._unwatch(conn.fileno())  # the sentinel reports the death itself

        def reaped() -> None:
            self._unwatch_all()
            _kill_group(process.pid)  # still a zombie here: its pid, the group's id, cannot have been reused
            code = process.poll()
            self.exitcode = code if code is not None else -1
            # Replies sent just before death are still in the pipes: deliver them first.
            for conn in (step_conn, ctrl_conn):
                try:
                    while conn.poll():
                        on_reply(self.rank, conn.recv())
                except (EOFError, OSError):
                    pass
            exited.set()
            on_exit(self.rank, self.exitcode)

        for conn in (step_conn, ctrl_conn):
            loop.add_reader(conn.fileno(), drain, conn)
            self._watched.append(conn.fileno())
        loop.add_reader(self._pidfd, reaped)
        self._watched.append(self._pidfd)

    def _unwatch(self, fd: int) -> None:
        if fd in self._watched and self._loop is not None:
            self._loop.remove_reader(fd)
            self._watched.remove(fd)

    def _unwatch_all(self) -> None:
        for fd in list(self._watched):
            self._unwatch(fd)

    # ------------------------------------------------------------------ sending
    # (Either pipe takes any command: the pool sends a call's one command on the channel the call is for.)
    async def send_step(self, cmd: Command) -> None:
        await self._send(self.step_conn, cmd)

    async def send_control(self, cmd: Command) -> None:
        await self._send(self.ctrl_conn, cmd)

    async def _send(self, conn: Connection | None, cmd: Command) -> None:
        if not self.alive or conn is None:
            raise BrokenPipeError(f"rank {self.rank} is not running")
        data = bytes(ForkingPickler.dumps(cmd))
        if len(data) <= _DIRECT_SEND_LIMIT:
            conn.send_bytes(data)
        else:
            await asyncio.to_thread(conn.send_bytes, data)

    # ------------------------------------------------------------------ stopping
    def signal(self, signum: int) -> None:
        if self.alive and self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    async def wait_exit(self, timeout: float) -> bool:
        """Wait until the sentinel fired (the process is reaped). True when it has exited."""
        if self._exited is None:
            return True
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            pass
        return not self.alive

    def close(self) -> None:
        """Release the pipes and the reaped process object; call after exit."""
        self._unwatch_all()
        for conn in (self.step_conn, self.ctrl_conn):
            if conn is not None:
                try:
                    conn.close()
                except OSError:
                    pass
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def _kill_group(pid: int) -> None:
    """Kill what is left of a dead rank's process group (worker/__main__.py: each rank leads one): its compile
    workers, orphaned to the leader, would otherwise run on for seconds. None left, or never made: nothing."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
