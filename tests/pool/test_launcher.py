"""The worker zygote (pool/launcher.py, worker/zygote.py): ranks forked from it are the leader's own children,
their deaths read with the right exit status and repaired as before; a dead zygote is replaced while the repair
that found it starts its rank from scratch; none of it outlives the daemon."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from neurond.config import Config, ConfigError
from neurond.pool.launcher import zygote_wanted
from tests.conftest import alive, chat_body, is_zygote, proc_stat
from tests.faults import fault_daemon, wait_ready


def _ppid(pid: int) -> int:
    stat = proc_stat(pid)
    assert stat is not None, f"pid {pid} is gone"
    return int(stat[1])


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _replaced(d, rank: str, old_pid: int, timeout: float = 90) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status = d.admin.status()
        if status["state"] == "healthy" and status["pids"].get(rank) not in (None, old_pid):
            return status
        time.sleep(0.05)
    raise TimeoutError(f"rank {rank} was not replaced:\n{d.log()[-4000:]}")


def test_ranks_are_forked_adopted_repaired_and_reaped(start_daemon, tmp_path):
    d = fault_daemon(start_daemon, tmp_path, 2)
    leader = d.proc.pid
    status = d.admin.status()
    zygote, ranks = status["zygote_pid"], status["pids"]
    assert zygote and is_zygote(zygote) and _ppid(zygote) == leader
    for pid in ranks.values():  # forked by the zygote, adopted by the leader
        assert _ppid(pid) == leader and _comm(pid) == "neurond-worker"
    assert sorted(d.children()) == sorted([zygote, *ranks.values()])

    # A forked rank's death is read with its real exit status, and its replacement is forked too.
    os.kill(ranks["1"], signal.SIGKILL)
    status = _replaced(d, "1", ranks["1"])
    assert "rank 1: process exited with code -9" in d.log()
    new = status["pids"]["1"]
    assert _ppid(new) == leader and _comm(new) == "neurond-worker" and status["zygote_pid"] == zygote
    assert d.chat(chat_body(max_tokens=6, temperature=0))[0] == 200

    # A dead zygote: the next repair starts its rank from scratch (it never waits for a new zygote's imports),
    # a new zygote is started, and the one after forks from it.
    os.kill(zygote, signal.SIGKILL)
    time.sleep(0.5)
    os.kill(new, signal.SIGKILL)
    status = _replaced(d, "1", new)
    scratch = status["pids"]["1"]
    assert _comm(scratch) != "neurond-worker"  # a fresh interpreter, not a fork
    assert f"worker zygote pid {zygote} exited with code -9; starting another" in d.log()
    t0 = time.monotonic()
    while not ((second := d.admin.status()["zygote_pid"]) and second != zygote and is_zygote(second)):
        assert time.monotonic() - t0 < 90, d.log()[-4000:]
        time.sleep(0.1)
    os.kill(scratch, signal.SIGKILL)
    _replaced(d, "1", scratch)
    # (the second zygote may still be importing: this replacement is forked or fresh, and either is fine)
    wait_ready(d)
    assert d.chat(chat_body(max_tokens=6, temperature=0))[0] == 200

    children = d.children()
    d.stop()  # asserts that no rank is left
    assert not any(alive(pid) for pid in children), "the zygote or a rank outlived the daemon"
    assert not alive(zygote) and not alive(second)


def test_which_ranks_the_zygote_forks(monkeypatch):
    assert zygote_wanted("cpu", "cpu") and not zygote_wanted("cpu", "cuda")
    assert zygote_wanted("all", "cuda") and not zygote_wanted("off", "cpu")
    # device auto: CPU ranks unless the machine has an NVIDIA driver (the leader never asks CUDA itself)
    for driver in (False, True):
        monkeypatch.setattr("neurond.pool.launcher.os.path.exists",
                            lambda path, driver=driver: driver and path == "/proc/driver/nvidia")
        assert zygote_wanted("cpu", "auto") is not driver
    with pytest.raises(ConfigError, match="worker_zygote must be cpu, all or off"):
        Config(worker_zygote="yes").validate()


def test_an_adopted_worker_reads_like_popen():
    """Exit status as subprocess.Popen gives it: the code, or minus the signal; kill and wait as Popen's."""
    import subprocess

    from neurond.pool.launcher import Adopted

    def forked(body) -> Adopted:
        pid = os.fork()
        if pid == 0:
            try:
                body()
            finally:
                os._exit(0)
        return Adopted(pid)

    exits = forked(lambda: os._exit(3))
    assert exits.wait(10) == 3 and exits.poll() == 3
    sleeper = forked(lambda: time.sleep(60))
    assert sleeper.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        sleeper.wait(0.05)
    sleeper.kill()
    assert sleeper.wait(10) == -signal.SIGKILL
    sleeper.kill()  # once reaped: nothing to signal, no error
    assert Adopted(os.getpid()).poll() == -1  # not a child: its status is not ours to read


class FakeZygote:
    """Stands in for launcher.Zygote: records each start in `started`; subclasses set how it behaves."""

    alive, ready, unsafe = True, False, False

    def __init__(self, env, started: list) -> None:
        import types

        started.append(self)
        self.process = types.SimpleNamespace(pid=1, returncode=None if self.alive else 1, kill=lambda: None)

    def poll_ready(self) -> bool:
        return self.ready and self.alive

    def close(self) -> None:
        pass


def test_a_zygote_that_keeps_dying_is_given_up(monkeypatch):
    """Each launch that finds the zygote dead starts the rank from scratch and a new zygote; after
    MAX_ZYGOTE_FAILURES in a row no more are started (one that cannot import would cost seconds per launch)."""
    import asyncio
    import types

    from neurond.pool import launcher

    started = []

    class DeadZygote(FakeZygote):
        alive = False

    monkeypatch.setattr(launcher, "Zygote", lambda env: DeadZygote(env, started))
    scratch = types.SimpleNamespace(pid=2)
    monkeypatch.setattr(launcher, "_exec", lambda env, fds: scratch)
    monkeypatch.setattr(launcher, "_become_subreaper", lambda: None)
    env = (("A", "1"),)
    la = launcher.Launcher(env, zygote=True)
    asyncio.run(la.wait_ready(0.2))  # a pool's start: returns once the zygote is gone
    assert len(started) == 1
    for _ in range(2 * launcher.MAX_ZYGOTE_FAILURES):
        process, step, ctrl = la.launch(env)
        step.close()
        ctrl.close()
        assert process is scratch
    asyncio.run(la.wait_ready(0.2))  # a later pool (a full reload) does not start one either
    assert len(started) == launcher.MAX_ZYGOTE_FAILURES and la.zygote_pid is None


def test_a_failed_fork_falls_back_on_fresh_pipes(monkeypatch):
    """A fork that timed out may still happen later: its worker must not share the pipes of the rank started
    from scratch instead (it would read that rank's spec). The fallback gets new pipes; the zygote is replaced."""
    import types

    from neurond.pool import launcher

    sent, given, started = [], [], []

    class StuckZygote(FakeZygote):
        ready = True

        def fork(self, fds) -> int:
            sent.extend(os.fstat(fd).st_ino for fd in fds)
            raise OSError("timed out")

    fresh = types.SimpleNamespace(pid=2)

    def scratch(env, fds):
        given.extend(os.fstat(fd).st_ino for fd in fds)
        return fresh

    monkeypatch.setattr(launcher, "Zygote", lambda env: StuckZygote(env, started))
    monkeypatch.setattr(launcher, "_exec", scratch)
    la = launcher.Launcher((), zygote=True)
    la.zygote = StuckZygote((), started)
    process, step, ctrl = la.launch(())
    assert process is fresh and len(started) == 2  # replaced
    assert len(sent) == len(given) == 2 and not set(sent) & set(given)
    step.close()
    ctrl.close()



STRAYS = r"""
import asyncio, logging, os, subprocess, sys, time
from neurond.pool.launcher import Launcher, _zombie_children

logging.basicConfig(level=logging.INFO)

async def main():
    launcher = Launcher()
    launcher.adopt_orphans()
    rank, _, _ = launcher.launch(())  # a real worker started from scratch (it waits for its spec): killed
    rank.kill()
    # Another process the launcher started: it starts a child of its own, says its pid, and dies with code 3.
    # The child, orphaned to this subreaper, exits a moment later, as a dead rank's compile workers do.
    dies = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                             "print(subprocess.Popen(['sleep', '0.5']).pid, flush=True); sys.exit(3)"],
                            stdout=subprocess.PIPE, text=True)
    launcher._started.add(dies.pid)
    orphan = int(dies.stdout.readline())
    t0 = time.monotonic()
    while os.path.exists(f"/proc/{orphan}") and time.monotonic() - t0 < 20:
        await asyncio.sleep(0.05)
    assert not os.path.exists(f"/proc/{orphan}"), "the orphan was not reaped"
    await asyncio.sleep(0.2)
    # The started ones are left for their owner: zombies still, their exit status theirs to read.
    assert set(_zombie_children()) == {dies.pid, rank.pid}, _zombie_children()
    assert dies.wait(5) == 3 and rank.wait(5) == -9
    launcher.close()
    print("ok")

asyncio.run(main())
"""


def test_orphans_below_the_ranks_are_reaped_and_started_processes_left_alone(tmp_path):
    """As a subreaper the leader inherits a dead rank's children; they must not pile up as zombies, and reaping
    them must not steal the exit status of a process the pool waits for."""
    import subprocess
    import sys

    script = tmp_path / "strays.py"
    script.write_text(STRAYS)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr[-3000:]
    assert "reaped 1 orphaned process" in done.stderr, done.stderr[-3000:]


def test_a_zygote_whose_forks_cannot_use_cuda_is_never_used(monkeypatch, caplog):
    """On a GPU box the zygote's imports may ask the CUDA runtime (torch's compiler does, measured on an H200),
    after which torch refuses CUDA in every fork. The zygote then answers b"unsafe": the launcher says so once and
    starts every rank from scratch, for good."""
    import asyncio
    import types

    from neurond.pool import launcher

    started = []

    class UnsafeZygote(FakeZygote):
        alive, unsafe = False, True  # it exits after its answer

    monkeypatch.setattr(launcher, "Zygote", lambda env: UnsafeZygote(env, started))
    scratch = types.SimpleNamespace(pid=2)
    monkeypatch.setattr(launcher, "_exec", lambda env, fds: scratch)
    monkeypatch.setattr(launcher, "_become_subreaper", lambda: None)
    la = launcher.Launcher((), zygote=True)
    asyncio.run(la.wait_ready(5.0))
    assert la.zygote is None and not la.use_zygote and "initialised CUDA" in caplog.text
    process, step, ctrl = la.launch(())
    step.close()
    ctrl.close()
    assert process is scratch and len(started) == 1


def test_the_zygote_asks_a_fork_whether_cuda_is_usable_there(monkeypatch):
    """torch's bad-fork flag is set only in children: the check forks one and reads its answer."""
    import torch

    from neurond.worker.zygote import forks_can_use_cuda

    assert forks_can_use_cuda()
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)  # as in a child of a poisoned parent
    assert not forks_can_use_cuda()
