"""What the leader process holds, read from /proc: open file descriptors, resident memory, and its
descendant processes; and every rank worker the soak has ever seen, to find any that outlived its pool.

A pid alone does not name a process for long on a busy box (other test runs start workers too), so a worker
is remembered as (pid, start time): a pid reused by another process is not mistaken for a survivor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tests.conftest import proc_stat


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def start_time(pid: int) -> int | None:
    fields = proc_stat(pid)
    return int(fields[19]) if fields else None


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` (children, grandchildren, ...), pid -> state letter (Z: an unreaped zombie)."""
    parent_of: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))
            if fields:
                parent_of[int(entry)] = (int(fields[1]), fields[0])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, state) in parent_of.items():
            if ppid == parent and child not in found:
                found[child] = state
                frontier.append(child)
    return found


@dataclass(frozen=True, slots=True)
class Worker:
    pid: int
    started: int  # clock ticks since boot (/proc/PID/stat field 22)


class WorkerTracker:
    """Remembers every rank worker seen in the admin status, to find the ones still running later."""

    def __init__(self) -> None:
        self.seen: set[Worker] = set()

    def note(self, pids) -> None:
        for pid in pids:
            if pid is None:
                continue
            started = start_time(int(pid))
            if started is not None:
                self.seen.add(Worker(int(pid), started))

    def running(self, exclude=()) -> list[int]:
        """Remembered workers still running (not zombies), other than `exclude`."""
        out = []
        for w in self.seen:
            fields = proc_stat(w.pid)
            if w.pid not in exclude and fields and int(fields[19]) == w.started and fields[0] != "Z":
                out.append(w.pid)
        return sorted(out)
