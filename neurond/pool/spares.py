"""Spare worker processes: started ahead of need, so a rank replaced in a repair skips the imports.

A fresh worker spends most of its start importing torch and transformers (13-15 s of a 24-31 s full reload of
an 8B rank on an H200, benchmarks.md) before it reads a byte of its shard. A spare has done that already and
waits, holding no device, for the WorkerSpec that makes it a rank. The pool takes one when it spawns a rank;
the supervisor keeps `spare_workers` of them across pool generations (a full reload is a new pool).

A spare that died while it waited is dropped when found; one that dies between being taken and reading its
spec makes the pool start a fresh process instead. Spares are not ranks: their deaths are nobody's incident.
"""

from __future__ import annotations

import logging

from neurond.pool.launcher import Launcher
from neurond.pool.ranks import RankProcess

log = logging.getLogger("neurond.pool")


class SpareWorkers:
    def __init__(self, count: int, env: tuple[tuple[str, str], ...], launcher: Launcher) -> None:
        self.count = count
        self.env = env
        self.launcher = launcher
        self._idle: list[RankProcess] = []
        self.closed = False

    def fill(self) -> None:
        """Start spares until `count` are alive."""
        self._idle = [proc for proc in self._idle if self._alive(proc)]
        while not self.closed and len(self._idle) < self.count:
            proc = RankProcess.spare(self.env, self.launcher)
            log.info("spare worker started as pid %s", proc.pid)
            self._idle.append(proc)

    def take(self, env: tuple[tuple[str, str], ...]) -> RankProcess | None:
        """An alive spare started with this environment, or None; then starts its replacement. One whose
        imports are done goes first (a spare started by the previous repair may still be importing: 9.5 s of
        a replacement's 15.5 s on 2xH100 when two faults came 8 s apart), else the oldest."""
        if self.closed or dict(env) != dict(self.env):
            return None
        self._idle = [proc for proc in self._idle if self._alive(proc)]
        ready = [proc for proc in self._idle if proc.imported]
        proc = next(iter(ready or self._idle), None)
        if proc is not None:
            self._idle.remove(proc)
        self.fill()
        return proc

    def ready(self) -> int:
        """How many idle spares have done their imports."""
        return sum(1 for proc in self._idle if proc.process is not None and proc.process.poll() is None
                   and proc.imported)

    def close(self) -> None:
        """Kill and reap every idle spare (they hold no device: nothing to stop in order)."""
        self.closed = True
        for proc in self._idle:
            if proc.process is not None and proc.process.poll() is None:
                proc.process.kill()
                proc.process.wait(10)
            proc.close()
        self._idle = []

    @staticmethod
    def _alive(proc: RankProcess) -> bool:
        if proc.process is not None and proc.process.poll() is None:
            return True
        log.warning("spare worker pid %s exited with code %s while idle", proc.pid,
                    proc.process.returncode if proc.process else None)
        proc.close()
        return False

    def pids(self) -> list[int]:
        return [proc.pid for proc in self._idle if proc.pid is not None]
