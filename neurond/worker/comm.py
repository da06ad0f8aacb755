"""The rank's communicator: rendezvous store, process group, abort.

One communicator per `comm_id`. Each is formed on a fresh TCPStore that rank 0 opens on a port the OS picks
(no fixed ports), so a rebuilt communicator never meets the remains of an aborted one.

Abort is called from the control thread while the compute thread may be stuck inside a collective. On NCCL
this unblocks the stuck call, which then returns *without an exception* (measured on 2xH200, torch 2.11, NCCL
2.28.9): the compute loop checks `aborted_since()` after every call and treats the step as failed.

On gloo, torch's abort (ProcessGroupGloo.abort, .shutdown) closes nothing: the group's TCP pairs close only when
the last reference to its context goes, so whether a peer stuck in a collective was released depended on who
still held one (measured with torch 2.13: released at once with no other reference, and only when the aborting
process exited with one). So on gloo the abort also shuts down, by hand, the TCP connections this rank opened
while forming the group (`_GlooConnections`): a collective waiting on them here fails at once, and so does the
peer's at the other end ("Connection closed by peer"). A rank that raised and its peer stuck in the collective it
never joined are then both idle after the abort: the pool repairs with a new communicator (comm_rebuild) instead of
killing the peer. shutdown() leaves the descriptors open (gloo still owns and closes them), so none is reused
under gloo's feet.
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta

import torch
import torch.distributed as dist


class Communicator:
    def __init__(self, rank: int, world_size: int, backend: str, device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.device = device
        self._store = None  # rank 0's master store for the next/current communicator
        self._lock = threading.Lock()
        self.comm_id: int | None = None
        self._aborts = 0  # bumped by abort(); the compute loop compares before/after each call
        self._gloo: _GlooConnections | None = None  # the current group's TCP connections (gloo only)

    # ------------------------------------------------------------------ rendezvous
    def open_store(self, timeout_s: float = 60.0) -> int:
        """Rank 0: open a master TCPStore on an OS-chosen port; return the port."""
        store = dist.TCPStore(
            "127.0.0.1", 0, self.world_size, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
        )
        self._store = store
        return store.port

    def join(self, comm_id: int, host: str, port: int, timeout_s: float) -> None:
        """Form process group `comm_id` on the store at host:port."""
        if self.rank == 0 and self._store is not None:
            store = self._store
        else:
            store = dist.TCPStore(host, port, self.world_size, False, timeout=timedelta(seconds=timeout_s))
        kwargs = {}
        before = _GlooConnections.snapshot() if self.backend == "gloo" else None
        if self.backend == "nccl":
            # Binding the device makes NCCL create its communicator eagerly, so a broken peer shows now
            # rather than at the first step, and lets abort reach it.
            kwargs["device_id"] = torch.device(self.device)
        dist.init_process_group(
            self.backend,
            store=dist.PrefixStore(f"comm{comm_id}", store),
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
            **kwargs,
        )
        # One tiny collective now: gloo connects its pairs lazily, at the first collective, and a peer that
        # dies while a rank is still connecting leaves that rank retrying until the group's timeout instead
        # of failing at once. Connected here, before any request, the first step's failures are prompt.
        dist.all_reduce(torch.zeros(1, device=self.device))
        with self._lock:
            self.comm_id = comm_id
            if before is not None:  # gloo's pairs, all connected by the collective above
                self._gloo = _GlooConnections(_GlooConnections.snapshot() - before)

    # ------------------------------------------------------------------ abort (control thread)
    def abort(self) -> tuple[bool, str]:
        """Abort every process group of this rank. Safe to call from any thread, and when none exists."""
        from torch.distributed import distributed_c10d as c10d

        with self._lock:
            self._aborts += 1
            if not dist.is_initialized():
                return True, "no communicator"
            try:
                # Sub-groups (the device mesh's) first, the default group last.
                for group in list(c10d._world.pg_map.keys()):
                    if group is not c10d.GroupMember.WORLD:
                        try:
                            c10d._abort_process_group(group)
                        except Exception:  # best effort on sub-groups; WORLD decides
                            pass
                c10d._abort_process_group()
                self.comm_id = None
                if self._gloo is not None:
                    self._gloo.shut_down()
                    self._gloo = None
                return True, ""
            except Exception as exc:
                return False, f"{type(exc).__name__}: {exc}"

    def abort_count(self) -> int:
        return self._aborts

    def aborted_since(self, mark: int) -> bool:
        return self._aborts != mark


class _GlooConnections:
    """The stream sockets a gloo group opened (those that appeared while it formed), to shut down at abort.

    Each is known by descriptor and inode together: shut_down() touches a descriptor only while it is still the
    same socket, so one closed meanwhile and reused for something else is left alone."""

    def __init__(self, sockets: set[tuple[int, str]]) -> None:
        self.sockets = sockets

    @staticmethod
    def snapshot() -> set[tuple[int, str]]:
        """(descriptor, "socket:[inode]") of every socket this process has open."""
        found = set()
        for name in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{name}")
            except OSError:  # closed since listed
                continue
            if target.startswith("socket:"):
                found.add((int(name), target))
        return found

    def shut_down(self) -> int:
        """shutdown(SHUT_RDWR) every connected stream socket of the group that is still open; returns how many.
        (Listening sockets are skipped: gloo's own, and rank 0's store, which a new communicator never reuses.)"""
        current = self.snapshot()
        done = 0
        for fd, _ in sorted(self.sockets & current):  # still open as the same socket
            try:
                sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                if sock.type == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    sock.shutdown(socket.SHUT_RDWR)
                    done += 1
            except OSError:  # not connected (any more)
                pass
            finally:
                sock.close()  # the duplicate only; the group's descriptor stays gloo's
        return done
