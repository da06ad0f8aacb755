"""systemd/neurond.service under a real systemd: PID 1 of private pid, mount, uts and cgroup namespaces
(tests/observe/private-systemd.sh, which enforces ../shared/README.md's warning: DefaultDependencies=no and
tmpfs over /tmp and /var/tmp). The unit file is the shipped one; a drop-in changes only what this machine or
a quick test needs. Shown: the unit is active only after READY=1, STATUS= follows the lifecycle, a hung leader
is killed by the watchdog and restarted, `systemctl reload` goes through RELOADING=1/READY=1, and a stop
leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, http, proc_stat
from tests.observe.journald import need_private_journald

SYSTEMD = "/lib/systemd/systemd"
BOOT = Path(__file__).with_name("private-systemd.sh")

TARGET = """[Unit]
Description=neurond unit test
DefaultDependencies=no
Wants=systemd-journald.service neurond.service
"""
# Only what differs from the shipped unit, and why.
DROP_IN = """[Unit]
# The WARNING in shared/README.md: no sysinit.target (its tmpfiles rules would clean the real /tmp).
DefaultDependencies=no
[Service]
ExecStart=
ExecStart={exe} serve --device cpu --tp-size 1 --port {port} --cache-dir /run/neurond-cache
# Quick enough for a test.
WatchdogSec=2s
# One spare worker, not the default two: still a spare through the restart, the reload and the stop (none may be
# left), at half the imports competing with each start on a 2-core box.
Environment=NEUROND_SPARE_WORKERS=1
RestartSec=200ms
TimeoutAbortSec=2s
# The interpreter here lives under /root (mode 700): run as root and let it be read.
User=
Group=
ProtectHome=read-only
# /etc is the real one inside the test namespaces: create nothing there.
ConfigurationDirectory=
"""


class PrivateSystemd:
    def __init__(self, work: Path, cache: Path) -> None:
        self.cgroup = _test_cgroup()
        self.log = open(work / "systemd.log", "wb")
        cmd = ["unshare", "--pid", "--fork", "--mount", "--uts", "--cgroup", "--propagation", "private",
               "--mount-proc", "bash", str(BOOT), str(work), str(cache), "neurond-test.target"]
        procs = str(self.cgroup / "cgroup.procs")

        def enter_cgroup():  # the cgroup namespace is rooted where unshare runs
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=enter_cgroup)
        self.pid1 = None
        deadline = time.monotonic() + 20
        while self.pid1 is None and time.monotonic() < deadline and self.proc.poll() is None:
            kids = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
            self.pid1 = int(kids[0]) if kids else None
            time.sleep(0.05)
        if self.pid1 is None:
            self.close()
            raise AssertionError(f"systemd did not start: {(work / 'systemd.log').read_text()[-2000:]}")

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(["nsenter", "-t", str(self.pid1), "-m", "-p", *cmd], capture_output=True, text=True,
                              timeout=60)
        assert not check or proc.returncode == 0, proc.stderr
        return proc.stdout

    def show(self) -> dict[str, str]:
        out = self.run("systemctl", "show", "neurond", "-p", "ActiveState,SubState,MainPID,StatusText,NRestarts,Result",
                       check=False)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait(self, cond, timeout: float = 60) -> dict[str, str]:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            state = self.show()
            if cond(state):
                return state
            time.sleep(0.1)
        raise TimeoutError(f"{self.show()}\n{self.run('journalctl', '--no-pager', '-n', '40', check=False)}")

    def processes(self, pattern: str) -> list[int]:
        """Host pids of this systemd's descendants whose command line matches."""
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        return [int(pid) for pid in out if int(pid) != self.pid1 and _ancestor(int(pid), self.pid1)]

    def leader_host_pid(self) -> int:
        (pid,) = self.processes("neurond serve")
        return pid

    def close(self) -> None:
        if self.proc.poll() is None and self.pid1 is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.run("systemctl", "exit", "0", check=False)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.pid1, signal.SIGKILL)  # ends the whole pid namespace
                self.proc.wait(10)
        self.log.close()
        for d in sorted((p for p in self.cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            d.rmdir()
        self.cgroup.rmdir()


def _ancestor(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        stat = proc_stat(pid)
        if stat is None:
            return False
        pid = int(stat[1])
    return False


def _test_cgroup() -> Path:
    with open("/proc/self/mounts") as f:
        roots = [line.split()[1] for line in f if line.split()[2] == "cgroup2"]
    for root in roots:
        path = Path(root) / f"neurond-systemd-test-{os.getpid()}"
        try:
            path.mkdir()
            return path
        except OSError:
            continue
    pytest.skip("no writable cgroup2 hierarchy for a private systemd")


def test_unit_under_a_real_systemd(tmp_path, cache_dir, builtin_model):
    need_private_journald()
    if not os.access(SYSTEMD, os.X_OK) or shutil.which("nsenter") is None:
        pytest.skip("systemd or nsenter not installed")
    exe = REPO / ".venv" / "bin" / "neurond"
    if not exe.exists():
        pytest.skip("needs the virtualenv's neurond (scripts/setup)")
    if any(REPO.resolve().is_relative_to(d) for d in (Path("/tmp"), Path("/var/tmp"))):
        # The private systemd must mount tmpfs over /tmp and /var/tmp (shared/README.md's WARNING), which
        # hides a checkout that lives there, virtualenv included.
        pytest.skip(f"the checkout {REPO} is under /tmp or /var/tmp, which the private systemd hides")
    port = free_port()
    units = tmp_path / "units"
    (units / "neurond.service.d").mkdir(parents=True)
    shutil.copy(REPO / "systemd" / "neurond.service", units / "neurond.service")
    (units / "neurond.service.d" / "test.conf").write_text(DROP_IN.format(exe=exe, port=port))
    (units / "neurond-test.target").write_text(TARGET)

    sd = PrivateSystemd(tmp_path, cache_dir)
    try:
        # active only once READY=1 came, and READY=1 only once HTTP answers
        first = sd.wait(lambda s: s.get("ActiveState") in ("active", "failed"))
        assert first["ActiveState"] == "active", first
        assert http("GET", f"http://127.0.0.1:{port}/health", timeout=5)[0] == 200
        healthy = sd.wait(lambda s: s["StatusText"].startswith("healthy"))
        assert healthy["StatusText"] == "healthy: neurond-builtin, tp_size=1, incidents=0"

        # a hung leader: the watchdog kills it (SIGABRT, then SIGKILL) and Restart=on-failure starts a new one
        os.kill(sd.leader_host_pid(), signal.SIGSTOP)
        again = sd.wait(lambda s: s["NRestarts"] == "1" and s["ActiveState"] == "active"
                        and s["StatusText"].startswith("healthy"))
        assert again["MainPID"] != healthy["MainPID"]
        said = sd.run("journalctl", "--no-pager", "-q", "-u", "neurond", "-o", "cat")
        assert "Watchdog timeout" in said and "neurond transition: loading -> healthy" in said

        # systemctl reload -> SIGHUP -> RELOADING=1 ... READY=1; the unit stays active
        sd.run("systemctl", "reload", "neurond")
        reloaded = sd.wait(lambda s: s["SubState"] == "running" and s["StatusText"].startswith("healthy"))
        events = [json.loads(line) for line in sd.run("journalctl", "--no-pager", "-q", "-u", "neurond", "-o", "json",
                                                      "NEUROND_CAUSE=sighup").splitlines()]
        assert [e["NEUROND_STATE_TO"] for e in events] == ["reloading", "healthy"]
        assert all(e["_SYSTEMD_UNIT"] == "neurond.service" and e["SYSLOG_IDENTIFIER"] == "neurond" for e in events)
        assert reloaded["MainPID"] == again["MainPID"]

        # stop: STOPPING=1, every rank reaped by neurond itself, nothing left for systemd to kill
        sd.run("systemctl", "stop", "neurond")
        stopped = sd.show()
        assert (stopped["ActiveState"], stopped["Result"]) == ("inactive", "success"), stopped
        assert "stopped; all ranks reaped" in sd.run("journalctl", "--no-pager", "-q", "-u", "neurond", "-o", "cat")
        assert sd.processes("neurond (serve|.worker)") == []  # leader and rank workers
    finally:
        sd.close()
