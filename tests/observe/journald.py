"""Real journals for tests: a private systemd-journald in a mount namespace (tests/observe/private-journal.sh),
and journal files written by systemd-journal-remote from export format. No mocks: what the tests read is what
journalctl reads on a production host."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need_root
from tests.harness.daemon import REPO, Daemon, is_zygote

WRAPPER = Path(__file__).with_name("private-journal.sh")
JOURNALD = "/lib/systemd/systemd-journald"
JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"
HOSTNAME = socket.gethostname()


def need_private_journald() -> None:
    """Skip (with the reason) where a private journald cannot run; it must run on CI (Debian 12, root)."""
    need_root("a private journald needs root (mount namespace)")
    for tool in ("unshare", "journalctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    if not os.access(JOURNALD, os.X_OK):
        pytest.skip(f"{JOURNALD} not installed")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m not permitted here: {probe.stderr.decode().strip()}")


def need_journal_remote() -> None:
    if not os.access(JOURNAL_REMOTE, os.X_OK):
        pytest.skip(f"{JOURNAL_REMOTE} not installed (apt-get install systemd-journal-remote; scripts/setup does)")


def wrap(mode: str, journal_dir: Path | None, cgroup: Path | None, cmd: list[str]) -> list[str]:
    return ["unshare", "-m", "--propagation", "private", "bash", str(WRAPPER), mode,
            str(journal_dir) if journal_dir else "-", str(cgroup) if cgroup else "-", *cmd]


def unit_cgroup() -> Path | None:
    """A cgroup2 directory named system.slice/neurond.service (journald then records _SYSTEMD_UNIT), or None."""
    with open("/proc/self/mounts") as f:
        roots = [line.split()[1] for line in f if line.split()[2] == "cgroup2"]
    for root in roots:
        path = Path(root) / "system.slice" / "neurond.service"
        try:
            path.mkdir(parents=True, exist_ok=True)
            return path
        except OSError:
            continue
    return None


def remove_cgroup(path: Path | None) -> None:
    for p in (path, path.parent if path else None):
        try:
            if p is not None:
                p.rmdir()  # only when empty: another user of system.slice keeps it
        except OSError:
            pass


def run_with_journal(cmd: list[str], journal_dir: Path, cgroup: Path | None = None, env: dict | None = None,
                     timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(wrap("live", journal_dir, cgroup, cmd), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHON=sys.executable, **(env or {})))


def read_journal(*source: str, matches: tuple[str, ...] = ()) -> list[dict]:
    out = subprocess.run(["journalctl", "--no-pager", "-q", "-o", "json", *source, *matches],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


class WrappedDaemon(Daemon):
    """`neurond serve` started through private-journal.sh (live journald, or a dead one's stale socket)."""

    def __init__(self, cache_dir: Path, tp_size: int, extra: list[str], mode: str, journal_dir: Path | None,
                 cgroup: Path | None = None, env: dict | None = None) -> None:
        self.wrapper = (mode, journal_dir, cgroup)
        super().__init__(cache_dir, tp_size, extra, {"PYTHON": sys.executable, **(env or {})}, device="cpu",
                         cwd=REPO)

    def spawn(self, cmd: list[str], **kw) -> subprocess.Popen:
        return super().spawn(wrap(*self.wrapper, cmd), **kw)

    def leader_pid(self) -> int | None:
        """The neurond process: the wrapper's child that is not journald."""
        for pid in _children(self.proc.pid):
            try:
                if "neurond" in Path(f"/proc/{pid}/cmdline").read_text():
                    return pid
            except OSError:
                continue
        return None

    def worker_pids(self) -> list[int]:
        leader = self.leader_pid()
        return [pid for pid in _children(leader) if not is_zygote(pid)] if leader else []


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


# ---------------------------------------------------------------------------------------------- export format
def export_entry(fields: dict) -> bytes:
    """One entry in systemd's journal export format; values with a newline use the binary form."""
    out = bytearray()
    for k, v in fields.items():
        raw = v if isinstance(v, bytes) else str(v).encode()
        if b"\n" in raw:
            out += k.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
        else:
            out += k.encode() + b"=" + raw + b"\n"
    return bytes(out + b"\n")


def write_journal_file(path: Path, entries: list[dict]) -> None:
    """A real journal file from entries (each needs __REALTIME_TIMESTAMP, or journal-remote drops it)."""
    data = b"".join(export_entry(e) for e in entries)
    proc = subprocess.run([JOURNAL_REMOTE, "-o", str(path), "-"], input=data, capture_output=True)
    assert proc.returncode == 0 and path.exists(), proc.stderr.decode()
    written = read_journal(f"--file={path}")
    assert len(written) == len(entries), f"journal-remote kept {len(written)} of {len(entries)} entries"
