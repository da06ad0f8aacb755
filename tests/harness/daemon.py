"""A neurond daemon under test: `neurond serve` in a process of its own, asked over HTTP, stopped clean.

    d = Daemon(cache_dir, tp_size=2)         # started on a free port; the tests' defaults (TEST_ENV, DEVICE)
    d.wait_ready()                           # /ready 200, or the daemon's log in the exception
    status, headers, body = d.chat(chat_body(max_tokens=8))
    d.metrics(), d.log(), Admin(socket).inject(...)
    d.stop()                                 # SIGTERM; asserts that none of its worker processes is left

Tests get one through tests/conftest.py's `start_daemon` fixture (which also stops it). Scripts measure with it:
they pass their own settings and environment (`checkout_env`, `test_env=False`), their own log file, and time
their requests with their own httpx client (`client()`, `stream_chat`), so that what they measure is what
they measured before sharing this.

No pytest here, and torch and httpx are imported only by the calls that need them.
"""

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

REPO = Path(__file__).resolve().parent.parent.parent
MODEL = "neurond-builtin"

# Test daemons run without spare worker processes unless a test asks (tests/pool/test_spares.py): the tests that
# count a daemon's child processes count its ranks. Their CPU ranks compute on one thread each: the suite runs
# two test workers on two cores, and a rank whose threads wait on a descheduled sibling at every operation ran
# the long answer of test_disconnect 3-25x slower beside other work (1 thread: 3.0-4.9 s, idle or beside one or
# two busy loops; 2 threads: 2.6 s idle, 9-14 s beside them; docs/benchmarks.md).
TEST_ENV = {"NEUROND_SPARE_WORKERS": "0", "NEUROND_CPU_THREADS": "1"}
# The device test daemons run on: cpu in CI; NEUROND_TEST_DEVICE=cuda runs the same API tests against a daemon on
# the GPU(s) of the device machine (scripts/gpu-check --api), where the sampling paths differ (graphs, kernels).
DEVICE = os.environ.get("NEUROND_TEST_DEVICE", "cpu")


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


def chat_body(content: str = "Hello there", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {sample as written, name and labels: value}, e.g.
    'neurond_requests_total{outcome="completed"}': 3.0."""
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


# ------------------------------------------------------------------------------------------------ settings
def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)


def write_settings(path: Path, settings: dict) -> Path:
    """A neurond.toml with these settings (flat: neurond's settings have no tables), for `--config`."""
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items()))
    return path


def write_token(path: Path, token: str) -> str:
    """A bearer token file neurond accepts (it refuses one others may read); its path."""
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path)


def admin_settings(workdir: Path, token: str) -> dict:
    """The settings of an admin API on a unix socket in `workdir`, with `token` (admin.token there)."""
    return {"admin_socket": str(workdir / "admin.sock"),
            "admin_token_file": write_token(workdir / "admin.token", token)}


def checkout_env(settings: dict | None = None) -> dict:
    """Environment for a script's daemon: this checkout's neurond (PYTHONPATH, for the leader and its workers),
    unbuffered output (a log read while it runs is up to date) and `settings` (NEUROND_* variables)."""
    return {"PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1", **(settings or {})}


# ------------------------------------------------------------------------------------------------ the daemon
class Daemon:
    """`neurond serve` on a free port of 127.0.0.1, started at once (not waited for: `wait_ready`).

    The command is `python -m neurond serve [--model M] [--config F] --port P [--tp-size N] --device D
    --cache-dir C [extra...]` (tp_size None: the setting's own). Its environment is this process's, then
    TEST_ENV (unless test_env=False), then `env`. Its output goes to `stdout` when given (a pipe, DEVNULL; then
    `log_path`, if any, is where log() reads), else to `log_path` (default CACHE_DIR/daemon-PORT.log),
    truncated, or appended to with append=True."""

    def __init__(self, cache_dir: Path | str, tp_size: int | None = 1, extra: list[str] | None = None,
                 env: dict | None = None, *, device: str = DEVICE, model: str | Path | None = None,
                 config: str | Path | None = None, test_env: bool = True, log_path: Path | None = None,
                 append: bool = False, stdout=None, cwd: str | Path | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "neurond", "serve", *(["--model", str(model)] if model else []),
                    *(["--config", str(config)] if config else []), "--port", str(self.port),
                    *(["--tp-size", str(tp_size)] if tp_size is not None else []), "--device", device,
                    "--cache-dir", str(cache_dir), *(extra or [])]
        self.log_path = log_path if log_path is not None or stdout is not None else \
            Path(cache_dir) / f"daemon-{self.port}.log"
        self._log = None if stdout is not None else open(self.log_path, "ab" if append else "wb")
        environ = dict(os.environ, **{**(TEST_ENV if test_env else {}), **(env or {})})
        self.started = time.monotonic()
        self.proc = self.spawn(self.cmd, stdout=self._log if stdout is None else stdout, env=environ, cwd=cwd)

    def spawn(self, cmd: list[str], **kw) -> subprocess.Popen:
        """Start the command (a subclass may wrap it: tests/observe/journald.py)."""
        return subprocess.Popen(cmd, stderr=subprocess.STDOUT, **kw)

    # ------------------------------------------------------------------ HTTP
    def url(self, path: str) -> str:
        return self.base + path

    def get(self, path: str, timeout: float = 10, headers: dict | None = None):
        return http("GET", self.url(path), headers=headers, timeout=timeout)

    def chat(self, body: dict, headers: dict | None = None, timeout: float = 120):
        return http("POST", self.url("/v1/chat/completions"), json.dumps(body).encode(),
                    {"Content-Type": "application/json", **(headers or {})}, timeout)

    def served_model(self) -> str:
        """The id /v1/models names (the built-in model's, or the checkpoint's)."""
        return self.get("/v1/models")[2]["data"][0]["id"]

    def metrics(self, auth: dict | None = None) -> dict[str, float]:
        """GET /metrics as parse_metrics gives it. `auth`: the headers a daemon with a token needs."""
        status, headers, text = self.get("/metrics", headers=auth)
        assert status == 200 and headers["content-type"].startswith("text/plain"), (status, text)
        return parse_metrics(text.decode() if isinstance(text, bytes) else str(text))

    def steps(self, kind: str = "decode", auth: dict | None = None) -> float:
        """Calls of this kind (prefill, decode) the daemon made so far: its step latency histogram's count."""
        return self.metrics(auth).get(f'neurond_step_seconds_count{{kind="{kind}"}}', 0.0)

    def wait_steps(self, since: float, kind: str = "decode", timeout: float = 30.0, auth: dict | None = None) -> None:
        """Wait until the daemon made a call of `kind` after `since` was read from steps(): a request sent
        meanwhile is then on the ranks (instead of sleeping a time that a slow box may not honour)."""
        wait_until(lambda: self.steps(kind, auth) > since, timeout, what=f"a {kind} call")

    def client(self, timeout: float):
        """An httpx client on the API, for a script's timed requests (kept-alive connections, streaming)."""
        import httpx

        return httpx.Client(base_url=self.base, timeout=timeout)

    def wait_ready(self, timeout: float | None = 120, want: int | set[int] = 200, poll: float = 0.1) -> float:
        """Poll /ready every `poll` s until it answers `want` (a status or a set of them); return the seconds
        waited. Raises with the daemon's log when it exits first, or after `timeout` s (None: no limit)."""
        wanted = {want} if isinstance(want, int) else set(want)
        t0 = time.monotonic()
        while timeout is None or time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/ready", timeout=2)[0] in wanted:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(poll)
        raise TimeoutError(f"/ready never returned {want} in {timeout} s:\n{self.log()[-4000:]}")

    # ------------------------------------------------------------------ processes
    def worker_pids(self) -> list[int]:
        """The leader's worker processes (ranks and spares): its children but the worker zygote."""
        return [pid for pid in self.children() if not is_zygote(pid)]

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path is not None else ""

    def journal(self, event: str) -> list[dict[str, str]]:
        """Its journal entries of `event` so far, oldest first, as fields (read from its log, where it writes each
        entry as one line of the same fields)."""
        from neurond.observe.journal import parse_structured_line

        entries = (parse_structured_line(line) for line in self.log().splitlines() if "NEUROND_EVENT=" in line)
        return [e for e in entries if e.get("NEUROND_EVENT") == event]

    def stop(self, timeout: float = 30, check: bool = True) -> int:
        """SIGTERM, and SIGKILL after `timeout` s; the exit status. With `check`, also wait (up to 10 s) for the
        worker processes it had (ranks, spares, the zygote) to go, and assert that none is left."""
        children = self.children() if check else []  # none may outlive the leader
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftover = [pid for pid in children if alive(pid)]
        assert not leftover, f"worker processes left after stop: {leftover}"
        return self.proc.returncode


def stream_chat(client, body: dict, on_token=None) -> dict:
    """POST a streamed chat completion on an httpx client and read it to its end. Returns t0 and end (perf_counter
    before sending, after the end), stamps (perf_counter at each chunk with content; `on_token()` is called
    after each), text (those contents) and usage (the last chunk's, or None). Raises on a status but 200."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    text: list[str] = []
    usage = None
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {resp.read().decode()[:500]}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            usage = data.get("usage") or usage
            for ch in data.get("choices") or []:
                if ch["delta"].get("content"):
                    stamps.append(time.perf_counter())
                    text.append(ch["delta"]["content"])
                    if on_token is not None:
                        on_token()
    return {"t0": t0, "end": time.perf_counter(), "stamps": stamps, "text": text, "usage": usage}


class Admin:
    """The admin API on the daemon's unix socket (`admin_socket`), with its bearer token."""

    def __init__(self, socket_path: str, token: str) -> None:
        import httpx

        self.socket_path = socket_path
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://admin",
                                   headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def inject(self, rank: int, kind: str, phase: str, count: int = 1, after: int = 0):
        return self.client.post("/admin/faults", json={"rank": rank, "kind": kind, "phase": phase, "count": count,
                                                       "after": after})

    def status(self) -> dict:
        return self.client.get("/admin/status").json()


# ------------------------------------------------------------------------------------------------ /proc
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
