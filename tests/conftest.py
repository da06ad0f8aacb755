"""Shared fixtures: the built-in model, and real daemons (`neurond serve` subprocesses) on free ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# The longest tests go first: scripts/test spreads the modules over workers (pytest-xdist, --dist loadfile) in
# collection order, and the Debian package test alone is a quarter of the suite; started last, it is its tail.
FIRST = ("tests/packaging/",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))  # stable: the rest keep their order
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu-check on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("neurond-cache")


@pytest.fixture(scope="session")
def builtin_model(cache_dir) -> Path:
    from neurond.models.builtin import ensure_builtin_model

    return ensure_builtin_model(cache_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, what: str = ""):
    """Poll `predicate` until it returns something true, and return that; fail the test after `timeout` s."""
    t0 = time.monotonic()
    while not (value := predicate()):
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    """(status, headers with lowercase names, parsed JSON or raw bytes) — also for error statuses."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, hdrs, raw = r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw


# Test daemons run without spare worker processes unless a test asks (tests/pool/test_spares.py): the tests that
# count a daemon's child processes count its ranks. Their CPU ranks compute on one thread each: the suite runs
# two test workers on two cores, and a rank whose threads wait on a descheduled sibling at every operation ran
# the long answer of test_disconnect 3-25x slower beside other work (1 thread: 3.0-4.9 s, idle or beside one or
# two busy loops; 2 threads: 2.6 s idle, 9-14 s beside them; docs/benchmarks.md).
TEST_ENV = {"NEUROND_SPARE_WORKERS": "0", "NEUROND_CPU_THREADS": "1"}
# The device test daemons run on: cpu in CI; NEUROND_TEST_DEVICE=cuda runs the same API tests against a daemon on
# the GPU(s) of the device machine (scripts/gpu-check --api), where the sampling paths differ (graphs, kernels).
DEVICE = os.environ.get("NEUROND_TEST_DEVICE", "cpu")


class Daemon:
    def __init__(self, cache_dir: Path, tp_size: int, extra: list[str] | None = None, env: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = cache_dir / f"daemon-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "neurond", "serve", "--port", str(self.port), "--tp-size", str(tp_size),
             "--device", DEVICE, "--cache-dir", str(cache_dir), *(extra or [])],
            stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ, **{**TEST_ENV, **(env or {})}),
        )

    def url(self, path: str) -> str:
        return self.base + path

    def get(self, path: str, timeout: float = 10, headers: dict | None = None):
        return http("GET", self.url(path), headers=headers, timeout=timeout)

    def metrics(self, auth: dict | None = None) -> dict[str, float]:
        """GET /metrics as {sample as written, name and labels: value}, e.g.
        'neurond_requests_total{outcome="completed"}': 3.0. `auth`: the headers a daemon with a token needs."""
        status, headers, text = self.get("/metrics", headers=auth)
        assert status == 200 and headers["content-type"].startswith("text/plain"), (status, text)
        text = text.decode() if isinstance(text, bytes) else str(text)
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def steps(self, kind: str = "decode", auth: dict | None = None) -> float:
        """Calls of this kind (prefill, decode) the daemon made so far: its step latency histogram's count."""
        return self.metrics(auth).get(f'neurond_step_seconds_count{{kind="{kind}"}}', 0.0)

    def wait_steps(self, since: float, kind: str = "decode", timeout: float = 30.0, auth: dict | None = None) -> None:
        """Wait until the daemon made a call of `kind` after `since` was read from steps(): a request sent
        meanwhile is then on the ranks (instead of sleeping a time that a slow box may not honour)."""
        wait_until(lambda: self.steps(kind, auth) > since, timeout, what=f"a {kind} call")

    def chat(self, body: dict, headers: dict | None = None, timeout: float = 120):
        return http("POST", self.url("/v1/chat/completions"), json.dumps(body).encode(),
                    {"Content-Type": "application/json", **(headers or {})}, timeout)

    def wait_ready(self, timeout: float = 120) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _, _ = self.get("/ready", timeout=2)
                if status == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"daemon not ready after {timeout}s:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        """The leader's worker processes (ranks and spares): its children but the worker zygote."""
        return [pid for pid in self.children() if not is_zygote(pid)]

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        children = self.children()  # ranks, spares and the zygote: none may outlive the leader
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftover = [pid for pid in children if alive(pid)]
        assert not leftover, f"worker processes left after stop: {leftover}"
        return self.proc.returncode


def is_zygote(pid: int) -> bool:
    """The worker zygote (pool/launcher.py) names itself; its forked workers share its command line."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "neurond-zygote"
    except OSError:
        return False


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [19] start time; None: gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def describe(pid: int) -> str:
    """pid, state, parent and command line, for an assertion's message about a process nobody expected."""
    stat = proc_stat(pid)
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        stat = None
    if stat is None:
        return f"{pid} (gone)"
    return f"{pid} state={stat[0]} ppid={stat[1]} {args[:300]}"


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


@pytest.fixture(scope="session")
def start_daemon(cache_dir, builtin_model):
    started: list[Daemon] = []

    def start(tp_size: int = 1, extra: list[str] | None = None, env: dict | None = None, ready: bool = True) -> Daemon:
        d = Daemon(cache_dir, tp_size, extra, env)
        started.append(d)
        if ready:
            d.wait_ready()
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.stop()


@pytest.fixture(scope="session")
def daemon_tp1(start_daemon) -> Daemon:
    return start_daemon(1)


@pytest.fixture(scope="session")
def daemon_tp2(start_daemon) -> Daemon:
    return start_daemon(2)


MODEL = "neurond-builtin"


def chat_body(content: str = "Hello there", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


# CI sets CI=true. There every test must run: a tool, a package or a privilege that CI lacks is a broken setup,
# which a skip would hide behind a green run.
def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str) -> None:
    """Skip the test for `reason`; in CI (CI=true) fail it instead. Never returns."""
    if in_ci():
        pytest.fail(f"{reason}; CI (CI=true) must run this test", pytrace=False)
    pytest.skip(reason)


def need_root(reason: str) -> None:
    """Skip (in CI: fail) unless running as root, which CI does."""
    if os.geteuid() != 0:
        skip_or_fail(reason)
