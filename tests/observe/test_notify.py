"""sd_notify: the transport (missing, dangling, path and abstract sockets), the watchdog rule, and a real
daemon talking to a socket bound by the test: READY once HTTP answers, STATUS at transitions, WATCHDOG pings,
RELOADING=1 + MONOTONIC_USEC on SIGHUP then READY, STOPPING=1 with every worker reaped. That daemon runs with a
dead journald (a stale socket), which must not disturb any of it."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import threading
import time

import pytest

from neurond.observe.notify import Notifier, watchdog
from tests.conftest import chat_body
from tests.observe.journald import WrappedDaemon, need_private_journald


class NotifyListener:
    """The systemd side: an AF_UNIX datagram socket collecting (monotonic time, message)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, after: int = 0, timeout: float = 60) -> int:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for i, (_, fields) in enumerate(self.messages[after:], after):
                if key in fields:
                    return i
            time.sleep(0.02)
        raise TimeoutError(f"no {key} after message {after}: {self.messages}")

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def test_no_socket_means_no_op():
    env = {}
    n = Notifier(env)
    assert not n.enabled and n.notify(READY=1) is False and n.watchdog_interval_s is None


def test_dangling_socket_is_reported_once_and_never_raises(tmp_path, caplog):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.ready("x") is False and n.status("y") is False
    assert len([r for r in caplog.records if "does not take messages" in r.message]) == 1
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: ECONNREFUSED
    assert Notifier({"NOTIFY_SOCKET": str(stale)}).notify(WATCHDOG=1) is False


@pytest.mark.parametrize("abstract", [False, True])
def test_messages_arrive_on_path_and_abstract_sockets(tmp_path, abstract):
    address = f"@neurond-test-{os.getpid()}" if abstract else str(tmp_path / "notify.sock")
    listener = NotifyListener(address)
    env = {"NOTIFY_SOCKET": address, "OTHER": "kept"}
    n = Notifier(env)
    try:
        assert "NOTIFY_SOCKET" not in env and env["OTHER"] == "kept"  # rank workers must not inherit it
        t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert n.ready("healthy: m\nsecond line") and n.reloading("reloading") and n.stopping("stopping")
        listener.wait_for("STOPPING")
        (_, ready), (_, reloading), (_, stopping) = listener.messages
        assert ready == {"READY": "1", "STATUS": "healthy: m second line"}
        assert reloading["RELOADING"] == "1" and 0 <= int(reloading["MONOTONIC_USEC"]) - t0 < 5_000_000
        assert stopping["STOPPING"] == "1"
    finally:
        listener.close()


def test_watchdog_follows_systemds_rule():
    assert Notifier({"WATCHDOG_USEC": "3000000"}).watchdog_interval_s == 1.5
    assert Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 1.5
    assert Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "junk"}).watchdog_interval_s is None


def test_watchdog_pings_only_while_the_supervisor_is_responsive(tmp_path):
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    n = Notifier({"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "100000"})  # ping every 50 ms
    stuck = {"why": None}

    async def scenario():
        task = asyncio.create_task(watchdog(n, lambda: stuck["why"]))
        await asyncio.sleep(0.3)
        stuck["why"] = "reloading for 700 s"
        await asyncio.sleep(0.05)
        silent_from = len(listener.messages)
        await asyncio.sleep(0.3)
        silent_to = len(listener.messages)
        stuck["why"] = None
        await asyncio.sleep(0.2)
        task.cancel()
        return silent_from, silent_to

    try:
        silent_from, silent_to = asyncio.run(scenario())
        time.sleep(0.1)
        assert silent_from >= 4 and silent_to - silent_from <= 1  # at most one ping in flight when it stalled
        assert len(listener.messages) >= silent_to + 2  # pings resume
        assert all(m == {"WATCHDOG": "1"} for _, m in listener.messages)
    finally:
        listener.close()


def test_daemon_notifies_systemd_through_its_life(cache_dir, builtin_model, tmp_path):
    need_private_journald()
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "400000"}
    d = WrappedDaemon(cache_dir, 1, [], "dead", None, env=env)
    try:
        ready = listener.wait_for("READY")
        assert d.get("/health")[0] == 200  # READY=1 means the API answers
        statuses = [m["STATUS"] for _, m in listener.messages if "STATUS" in m]
        assert statuses[0].startswith("starting: neurond-builtin")
        d.wait_ready()
        healthy = listener.wait_for("STATUS")  # the model may be loaded before or after HTTP answers
        while not listener.messages[healthy][1]["STATUS"].startswith("healthy"):
            healthy = listener.wait_for("STATUS", healthy + 1)
        assert listener.messages[healthy][1]["STATUS"] == "healthy: neurond-builtin, tp_size=1, incidents=0"
        healthy = max(healthy, ready)
        pings = [t for t, m in listener.messages if "WATCHDOG" in m]
        assert len(pings) >= 2 and all(0.1 < b - a < 1.0 for a, b in itertools.pairwise(pings))

        workers = d.worker_pids()
        t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        os.kill(d.leader_pid(), signal.SIGHUP)
        reloading = listener.wait_for("RELOADING", healthy)
        assert int(listener.messages[reloading][1]["MONOTONIC_USEC"]) >= t0
        again = listener.wait_for("READY", reloading)
        assert "healthy" in listener.messages[again][1]["STATUS"]
        assert d.worker_pids() != workers and d.chat(chat_body(max_tokens=4))[0] == 200

        assert d.stop() == 0  # SIGTERM; stop() also checks every worker is gone
        stopping = listener.wait_for("STOPPING", again)
        assert listener.messages[-1][1] == {"STATUS": "stopped; all ranks reaped"} and stopping < len(listener.messages)
        log = d.log()
        assert "journald refused an entry" in log  # the stale socket: entries went to stderr instead
        assert 'MESSAGE="neurond transition: healthy -> reloading on reload, cause sighup' in log
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        listener.close()


def test_a_repair_state_outliving_every_deadline_means_unresponsive():
    from types import SimpleNamespace

    from neurond.config import Config
    from neurond.server import Server

    # bound: 4+6+2+2+0+30 = 44 s
    server = Server(Config(load_timeout_s=4, comm_timeout_s=3, abort_timeout_s=1, kill_grace_s=1,
                           recovery_backoff_s=0, recovery_backoff_max_s=0))
    assert server._unresponsive() is None  # no supervisor yet: starting
    server.supervisor = SimpleNamespace(state="reloading")
    server.status.since = time.monotonic() - 40
    assert server._unresponsive() is None
    server.status.since = time.monotonic() - 50
    assert server._unresponsive().startswith("reloading for 50 s (bound 44 s)")
    server.supervisor.state = "unloaded"  # waiting for an operator is not being stuck
    assert server._unresponsive() is None
    # the longest wait between two recovery attempts is part of the bound: 44 + 10 = 54 s
    waits = Server(Config(load_timeout_s=4, comm_timeout_s=3, abort_timeout_s=1, kill_grace_s=1,
                          recovery_backoff_s=1, recovery_backoff_max_s=10))
    waits.supervisor = SimpleNamespace(state="poisoned")
    waits.status.since = time.monotonic() - 50
    assert waits._unresponsive() is None
    waits.status.since = time.monotonic() - 60
    assert waits._unresponsive().startswith("poisoned for 60 s (bound 54 s)")
