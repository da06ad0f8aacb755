"""`python -m neurond.worker.zygote SOCKET_FD`: the worker zygote, started by the leader, never by hand.

A worker started from scratch spends seconds importing torch and transformers before it reads its spec (7-10 s of
CPU on a 2-core box; 13-15 s of an 8B rank's full reload on an H200). The zygote does those imports once
(`preimport`), then forks a worker for each request from the leader: the child has them behind it and goes
straight to waiting for its spec (`__main__.serve`), as a spare does.

It never touches a device: no CUDA context exists in it, so none is inherited. Each child is forked twice over
(the zygote's child forks the worker and exits), so that the worker is orphaned at once and adopted by the leader,
a child subreaper (pool/launcher.py): the leader then waits for it and reads its exit status as for a worker it
started itself. The child arms its death signal only once it is the leader's: armed before, the exit of the
short-lived middle process would deliver it.

Whether the imports left forks usable for CUDA is checked, not assumed: torch poisons every later fork once
anything asked the CUDA runtime (a device count, say), and a rank forked then cannot start ("Cannot re-initialize
CUDA in forked subprocess"). So the zygote forks one throwaway child that asks torch, and answers b"unsafe"
instead of b"ready" if it would be: the leader then starts ranks from scratch.

Protocol on the SOCK_SEQPACKET socket: the zygote sends b"ready" once imported (or b"unsafe", then exits); then
each b"fork" message from the leader carries the child's two pipe ends (SCM_RIGHTS) and is answered with the
worker's pid (4 bytes, signed; negative: the fork failed with that errno). EOF: the leader is gone or done, and the
zygote exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import sys
import time
import traceback
import warnings
from multiprocessing.connection import Connection

from neurond.worker.__main__ import preimport, serve
from neurond.worker.main import _die_with_parent

PID = struct.Struct("i")
ADOPTION_TIMEOUT_S = 10.0  # the middle process exits right after the fork: adoption takes microseconds


def set_process_name(name: str) -> None:
    """The kernel's name for this process (`ps -o comm`, /proc/PID/comm): zygote and ranks share a command line."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(15, name.encode()[:15])  # PR_SET_NAME
    except OSError:
        pass


def main() -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the leader, which stops us in order
    set_process_name("neurond-zygote")
    leader = os.getppid()
    sock = socket.socket(fileno=int(sys.argv[1]))
    # torch's compiler asks `torch.cuda.is_available()` as it is imported (_inductor/runtime/benchmarking.py,
    # torch 2.11). By default that asks the CUDA runtime, which poisons every later fork; asked through NVML it
    # does not (measured on an H200: scripts/probe-zygote-cuda --compiler). Forked ranks inherit the setting.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    preimport()
    # Python 3.12 warns on fork() in a process with more than one thread. The only other thread here is numpy's
    # OpenBLAS server, idle (nothing computed yet), which its own pthread_atfork handler shuts down before a fork.
    warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks", category=DeprecationWarning)
    if not forks_can_use_cuda():
        sock.send(b"unsafe")
        os._exit(0)
    sock.send(b"ready")
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 16, 2)
        except OSError:
            break
        if not msg:
            break
        try:
            answer = _fork(sock, fds, leader) if len(fds) == 2 else -22  # EINVAL
        except OSError as exc:
            answer = -(exc.errno or 1)
        for fd in fds:
            os.close(fd)
        sock.send(PID.pack(answer))
    os._exit(0)


def forks_can_use_cuda() -> bool:
    """Whether a child forked now could initialise CUDA (torch's bad-fork flag, set in a child when the parent
    had asked the CUDA runtime). Answered by a throwaway child: the flag is set only in children."""
    import torch

    child = os.fork()
    if child == 0:
        os._exit(1 if torch.cuda._is_in_bad_fork() else 0)
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0


def _fork(sock: socket.socket, fds: list[int], leader: int) -> int:
    """Fork a worker on these pipe ends, orphaned to the leader; its pid once the leader has adopted it."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(r)
            worker = os.fork()
            if worker == 0:
                os.close(w)
                _worker(sock, fds, leader)  # never returns
            os.write(w, PID.pack(worker))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read(PID.size)
    os.waitpid(middle, 0)  # gone: its child is the leader's now
    if len(data) != PID.size:
        raise OSError(10, "the middle process died before the worker's fork")  # ECHILD
    return PID.unpack(data)[0]


def _worker(sock: socket.socket, fds: list[int], leader: int) -> None:
    try:
        sock.close()
        set_process_name("neurond-worker")
        deadline = time.monotonic() + ADOPTION_TIMEOUT_S
        while os.getppid() != leader:  # not adopted yet (or the leader is gone: then it never is)
            if time.monotonic() > deadline:
                os._exit(1)
            time.sleep(0.0005)
        _die_with_parent()
        if os.getppid() != leader:  # the leader died between the check and arming the signal
            os._exit(0)
        serve(Connection(fds[0]), Connection(fds[1]))
    except BaseException:  # the worker's own end: nothing may unwind into the zygote's loop
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(1)  # serve never returns


if __name__ == "__main__":
    main()
