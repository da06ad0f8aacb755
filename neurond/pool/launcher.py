"""How the leader starts a worker process: forked by the zygote, or from scratch.

From scratch is a fresh interpreter running `python -m neurond.worker` (not multiprocessing's spawn, which
re-imports the leader's __main__ in the child: the worker should carry nothing of the leader). It imports torch and
transformers itself: seconds of CPU before it can take its spec.

The zygote (worker/zygote.py) did those imports once; a worker forked from it is ready in milliseconds, so a
replaced rank, a spare's replacement and a full reload's ranks skip them. The leader becomes a child subreaper so
that the forked workers, orphaned by the zygote's double fork, are its own children: it waits for them and reads
their exit status exactly as for a worker it started itself (`Adopted`), and they die with it (PR_SET_PDEATHSIG).

A launch never waits for the zygote: one asked for while it is still importing, after it died, or for another
environment starts from scratch, and a dead or unresponsive zygote is replaced in the background. Only a pool's
first start waits for it (`wait_ready`, bounded by the load deadline), since its ranks would import as long.

By default (`worker_zygote = "all"`) the zygote forks CUDA ranks as well as CPU ones. That is safe only if nothing
in the imports asked the CUDA runtime: torch then refuses CUDA in every fork. The zygote checks before it says
ready and answers b"unsafe" otherwise; the launcher then starts ranks from scratch for good (worker/zygote.py;
scripts/probe-zygote-cuda, measured on 2xH200 in docs/benchmarks.md).

As a subreaper the leader also inherits every orphan below it: a dead rank's own children (torch.compile's compile
workers on CUDA, killed with the rank's process group by pool/ranks.py) and a worker forked after its fork had timed
out. The launcher reaps those on SIGCHLD (`reap_strays`), leaving alone the processes it started, whose exit status
the pool reads itself.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from multiprocessing.connection import Connection

log = logging.getLogger("neurond.pool")

PID = struct.Struct("i")  # the zygote's answer (worker/zygote.py)
FORK_TIMEOUT_S = 2.0  # a fork of the zygote takes milliseconds; longer, and it is replaced
# Zygotes that died or failed to fork in a row before the launcher stops starting them (one that cannot import
# would otherwise be restarted at every launch, seconds of CPU each, while ranks start from scratch anyway).
MAX_ZYGOTE_FAILURES = 3
PR_SET_CHILD_SUBREAPER = 36

Env = tuple[tuple[str, str], ...]


class Adopted:
    """A worker forked by the zygote and adopted by the leader: the parts of subprocess.Popen the pool uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not our child (never adopted): its status is lost
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        return code

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


Process = subprocess.Popen | Adopted


class Zygote:
    """The leader's side of one zygote process, started with `env`."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.ready = False
        self.unsafe = False  # its imports left forks unable to use CUDA (worker/zygote.py): never to be used
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "neurond.worker.zygote", str(child.fileno())],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=dict(os.environ, **dict(env)))
        child.close()
        self.sock.setblocking(False)
        log.info("worker zygote started as pid %s", self.process.pid)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def poll_ready(self) -> bool:
        """Whether the zygote said its imports are done (never blocks)."""
        if not self.ready and not self.unsafe:
            try:
                said = self.sock.recv(16)
            except OSError:  # nothing yet (BlockingIOError), or gone: `alive` says which
                said = b""
            self.ready, self.unsafe = said == b"ready", said == b"unsafe"
        return self.ready and self.alive

    def fork(self, fds: tuple[int, int]) -> int:
        """The pid of a worker forked on these pipe ends, already the leader's child. OSError on failure."""
        self.sock.settimeout(FORK_TIMEOUT_S)
        try:
            socket.send_fds(self.sock, [b"fork"], list(fds))
            data = self.sock.recv(16)
        finally:
            self.sock.setblocking(False)
        if len(data) != PID.size:
            raise OSError(f"the zygote answered {data!r}")
        pid = PID.unpack(data)[0]
        if pid < 0:
            raise OSError(-pid, f"the zygote could not fork: {os.strerror(-pid)}")
        return pid

    def close(self) -> None:
        self.sock.close()  # EOF: the zygote exits by itself
        if self.process.poll() is None:
            try:
                self.process.wait(2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class Launcher:
    """Starts worker processes with `env` over the leader's environment; forks them from a zygote when
    `zygote` is set and it is ready."""

    def __init__(self, env: Env = (), zygote: bool = False) -> None:
        self.env = env
        self.use_zygote = zygote
        self.zygote: Zygote | None = None  # started by the first pool's start (wait_ready)
        self.closed = False
        self._failures = 0  # zygotes lost in a row (reset by a fork)
        self._started: set[int] = set()  # pids of what this launcher started (the pool reaps those itself)
        self._loop: asyncio.AbstractEventLoop | None = None  # where the SIGCHLD handler is, once a subreaper

    def launch(self, env: Env) -> tuple[Process, Connection, Connection]:
        """A started worker process and the leader's ends of its step and control pipes."""
        if self._zygote_ready(env):
            assert self.zygote is not None
            step_parent, step_child, ctrl_parent, ctrl_child = _pipes()
            try:
                pid = self.zygote.fork((step_child.fileno(), ctrl_child.fileno()))
            except OSError as exc:
                log.warning("worker zygote pid %s failed to fork (%s); starting another", self.zygote.process.pid,
                            exc)
                # Never reused for the fallback: a fork that answered late would give its worker these pipes
                # too. Closed, such a worker reads EOF instead of a spec and exits.
                for conn in (step_parent, step_child, ctrl_parent, ctrl_child):
                    conn.close()
                self._replace()
            else:
                self._failures = 0
                self._started.add(pid)
                step_child.close()
                ctrl_child.close()
                return Adopted(pid), step_parent, ctrl_parent
        step_parent, step_child, ctrl_parent, ctrl_child = _pipes()
        try:
            process = _exec(env, (step_child.fileno(), ctrl_child.fileno()))
        finally:
            step_child.close()
            ctrl_child.close()
        self._started.add(process.pid)
        return process, step_parent, ctrl_parent

    def _zygote_ready(self, env: Env) -> bool:
        """Whether this launch can fork from the zygote; replaces one found dead."""
        zygote = self.zygote
        if zygote is None or self.closed or dict(env) != dict(self.env):
            return False
        if zygote.poll_ready():
            return True
        if zygote.unsafe:
            self._give_up_unsafe()
        elif not zygote.alive:
            log.warning("worker zygote pid %s exited with code %s; starting another", zygote.process.pid,
                        zygote.process.returncode)
            self._replace()
        return False

    def _replace(self) -> None:
        old = self.zygote
        if old is not None:
            old.process.kill()
            old.close()
        self._failures += 1
        if self._failures >= MAX_ZYGOTE_FAILURES:
            log.error("worker zygote lost %d times in a row; ranks start from scratch from now on", self._failures)
            self.zygote, self.use_zygote = None, False
            return
        self._start_zygote()

    def _start_zygote(self) -> None:
        self.zygote = Zygote(self.env)
        self._started.add(self.zygote.process.pid)

    def _give_up_unsafe(self) -> None:
        assert self.zygote is not None
        log.error("worker zygote pid %s: its imports initialised CUDA, so ranks forked from it could not use it; "
                  "ranks start from scratch from now on (set worker_zygote = \"cpu\" or \"off\")",
                  self.zygote.process.pid)
        self.zygote.close()
        self.zygote, self.use_zygote = None, False

    async def wait_ready(self, timeout_s: float) -> None:
        """Until the zygote is ready to fork (or gone, or `timeout_s` passed: launches then start from scratch)."""
        if self.use_zygote and self.zygote is None and not self.closed:
            self.adopt_orphans()  # before the first fork: the zygote's workers must be orphaned to the leader
            self._start_zygote()
        deadline = time.monotonic() + timeout_s
        while (zygote := self.zygote) is not None and not self.closed and zygote.alive \
                and not zygote.poll_ready() and not zygote.unsafe and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.zygote is not None and self.zygote.unsafe:
            self._give_up_unsafe()

    @property
    def zygote_pid(self) -> int | None:
        return self.zygote.process.pid if self.zygote is not None and self.zygote.alive else None

    def adopt_orphans(self) -> None:
        """Make the leader a child subreaper (orphans below it become its children) and reap the strays among
        them on SIGCHLD. Call from the running event loop."""
        if self._loop is None or self._loop.is_closed():
            _become_subreaper()
            self._loop = asyncio.get_running_loop()
            self._loop.add_signal_handler(signal.SIGCHLD, self.reap_strays)

    def reap_strays(self) -> list[int]:
        """Reap the exited children this launcher did not start; returns their pids. The ones it started stay
        for the pool to reap and read (their pids leave the set once reaped; a pid is not reused before)."""
        self._started = {pid for pid in self._started if os.path.exists(f"/proc/{pid}")}
        reaped = []
        for pid in _zombie_children():
            if pid not in self._started:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        reaped.append(pid)
                except ChildProcessError:
                    pass
        if reaped:
            log.info("reaped %d orphaned process(es) below the ranks: pids %s", len(reaped), reaped)
        return reaped

    def close(self) -> None:
        self.closed = True
        if self.zygote is not None:
            self.zygote.close()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None


def zygote_wanted(setting: str, device: str) -> bool:
    """Whether ranks are forked from the zygote (`worker_zygote`). "cpu" leaves CUDA ranks out; with device auto
    the leader, which never touches CUDA, takes the machine for CPU-only when it has no NVIDIA driver loaded."""
    if setting != "cpu":
        return setting == "all"
    return device == "cpu" or (device == "auto" and not os.path.exists("/proc/driver/nvidia"))


def _pipes() -> tuple[Connection, Connection, Connection, Connection]:
    """The step pipe's and the control pipe's ends: (step parent, step child, control parent, control child)."""
    step_parent, step_child = multiprocessing.Pipe(duplex=True)
    ctrl_parent, ctrl_child = multiprocessing.Pipe(duplex=True)
    return step_parent, step_child, ctrl_parent, ctrl_child


def _exec(env: Env, fds: tuple[int, int]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "neurond.worker", str(fds[0]), str(fds[1])],
                            pass_fds=fds, stdin=subprocess.DEVNULL, env=dict(os.environ, **dict(env)))


def _become_subreaper() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _zombie_children() -> list[int]:
    """Pids of this process's children that have exited and are not yet reaped (state Z in /proc)."""
    me, found = os.getpid(), []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stat = f.read()
            except OSError:  # gone meanwhile
                continue
            state, ppid = stat[stat.rindex(")") + 2:].split()[:2]  # comm, in parentheses, may hold spaces
            if state == "Z" and int(ppid) == me:
                found.append(int(entry.name))
    return found
