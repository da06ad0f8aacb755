"""`neurond status` against a real daemon (TP=2, admin socket), run as an operator runs it: the command line,
its output and its exit code. The same daemon shows that load progress travels from each rank's loader to
STATUS=, the journal entries and /admin/status, and, last, that a repair (a rank killed mid-decode) shows in
`neurond status`, in /metrics (detection and recovery histograms, recoveries by cause and rung) and in the
load progress of the replacement rank only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from unittest.mock import ANY

import pytest

from neurond.observe.catalog import MESSAGES
from neurond.observe.events import Event
from neurond.observe.journal import parse_structured_line
from neurond.status import render
from tests.conftest import REPO, chat_body, http
from tests.faults import TOKEN, Admin, wait_ready
from tests.harness.daemon import admin_settings, write_settings
from tests.observe.test_notify import NotifyListener


def neurond(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neurond", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="module")
def daemon(start_daemon, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("status")
    listener = NotifyListener(str(tmp / "notify.sock"))
    conf = write_settings(tmp / "neurond.toml", {**admin_settings(tmp, TOKEN), "fault_injection": True})
    started = time.time()
    d = start_daemon(2, ["--config", str(conf)], env={"NOTIFY_SOCKET": listener.address})
    d.conf, d.listener, d.started, d.tmp = str(conf), listener, started, tmp
    d.admin = Admin(str(tmp / "admin.sock"))
    yield d
    d.stop()
    listener.close()


def test_status_shows_a_healthy_daemon_at_a_glance(daemon):
    assert daemon.chat(chat_body(max_tokens=4))[0] == 200
    proc = neurond("status", "--config", daemon.conf)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("neurond: healthy for ")
    rows = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert rows["model"] == "neurond-builtin  tp_size=2"
    assert rows["incidents"] == "0"
    assert rows["last"].startswith("loaded: loading -> healthy (startup), ")
    assert rows["requests"].startswith("1 completed, 0 failed")
    pids = sorted(int(p) for p in rows["ranks"].replace(":", "").split()[2::3])
    assert pids == sorted(daemon.worker_pids())
    assert f"pid {daemon.proc.pid}," in rows["uptime"]


def test_status_json_has_every_field_and_the_finished_load(daemon, builtin_model):
    proc = neurond("status", "--json", "--config", daemon.conf)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert (status["state"], status["model"], status["tp_size"], status["pid"]) == (
        "healthy", "neurond-builtin", 2, daemon.proc.pid)
    assert 0 < status["uptime_s"] <= time.time() - daemon.started + 1
    assert status["last_transition"]["to"] == "healthy" and status["state_since"] == status["last_transition"]["at"]
    documented = (REPO / "docs" / "api.md").read_text()
    assert [key for key in status if f"`{key}`" not in documented] == []  # every field is in the API reference
    size = (builtin_model / "model.safetensors").stat().st_size
    assert status["load_progress"] == {str(rank): {"rank": rank, "done_bytes": size, "total_bytes": size,
                                                   "files_done": 1, "files_total": 1} for rank in (0, 1)}


def test_load_progress_reaches_status_line_and_journal(daemon, builtin_model):
    statuses = [m["STATUS"] for _, m in daemon.listener.messages if "STATUS" in m]
    loading = [s for s in statuses if s.startswith("loading") and "; loaded " in s]
    assert loading, statuses  # STATUS= during the load carried the pool's progress
    assert "rank 0" in loading[0] and "rank 1" in loading[0]
    assert not any("; loaded " in s for s in statuses if s.startswith("healthy"))
    size = (builtin_model / "model.safetensors").stat().st_size
    entries = daemon.journal("load_progress")
    assert {e["MESSAGE_ID"] for e in entries} == {MESSAGES[Event.LOAD_PROGRESS].message_id}
    reports = sorted((int(e["NEUROND_RANK"]), int(e["NEUROND_FILES_DONE"]), int(e["NEUROND_DONE_BYTES"]))
                     for e in entries)
    assert reports == [(0, 0, 0), (0, 1, size), (1, 0, 0), (1, 1, size)]  # each rank's first and last report


def test_status_exit_codes_and_errors(daemon, tmp_path):
    unconfigured = tmp_path / "plain.toml"
    unconfigured.write_text("tp_size = 2\n")
    proc = neurond("status", "--config", str(unconfigured))
    assert proc.returncode == 2 and "admin API is not configured" in proc.stderr and proc.stdout == ""

    nobody = tmp_path / "nobody.toml"
    nobody.write_text(f'admin_socket = "{tmp_path / "none.sock"}"\nadmin_token_file = "{daemon.tmp / "admin.token"}"\n')
    proc = neurond("status", "--config", str(nobody))
    assert proc.returncode == 3 and f"no daemon answers on {tmp_path / 'none.sock'}" in proc.stderr

    (tmp_path / "wrong.token").write_text("not-the-token\n")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(f'admin_socket = "{daemon.tmp / "admin.sock"}"\nadmin_token_file = "{tmp_path / "wrong.token"}"\n')
    proc = neurond("status", "--config", str(wrong))
    assert proc.returncode == 2 and "HTTP 401" in proc.stderr

    proc = neurond("status", "--config", str(unconfigured), env={"NEUROND_ADMIN_SOCKET": str(daemon.tmp / "admin.sock"),
                                                               "NEUROND_ADMIN_TOKEN_FILE": str(tmp_path / "missing")})
    assert proc.returncode == 2 and "cannot read admin_token_file" in proc.stderr

    # Not serving: 1, with the state and why.
    assert daemon.admin.client.post("/admin/unload").status_code == 202
    wait_ready(daemon, want=503)
    deadline = time.monotonic() + 30
    while (proc := neurond("status", "--config", daemon.conf)).stdout.startswith("neurond: healthy"):
        assert time.monotonic() < deadline
    assert proc.returncode == 1 and proc.stdout.startswith("neurond: unloaded (operator_unload) for ")
    assert daemon.admin.client.post("/admin/load").status_code == 202
    wait_ready(daemon)
    assert neurond("status", "--config", daemon.conf).returncode == 0


def test_render_shows_a_load_in_progress():
    now = 1_800_000_000.0
    status = {
        "state": "reloading", "state_since": now - 75, "model": "llama", "tp_size": 2,
        "version": "1.2.3", "pid": 42, "started_at": now - 7300, "uptime_s": 7300, "incidents": 3,
        "current_incident": "feed1234", "pids": {"0": 100, "1": 101},
        "last_cause": {"cause": "rank_died", "rank": 1, "rung": "replace_ranks"},
        "last_transition": {"event": "repair", "from": "aborting", "to": "reloading", "cause": "rank_died",
                            "rung": "replace_ranks", "at": now - 75},
        "load_progress": {"0": {"rank": 0, "done_bytes": 4 << 30, "total_bytes": 4 << 30, "files_done": 2,
                                "files_total": 2},
                          "1": {"rank": 1, "done_bytes": 1 << 30, "total_bytes": 4 << 30, "files_done": 1,
                                "files_total": 2}},
        "requests": {"completed": 10, "failed": 1, "cancelled": 0},
    }
    text = render(status, now)
    assert text.splitlines()[0] == "neurond: reloading (rank_died on rank 1) for 1m 15s"
    assert "  uptime     2h 1m (since " in text and "pid 42, neurond 1.2.3)" in text
    assert "  incidents  3, one in progress: feed1234 (journalctl -u neurond NEUROND_INCIDENT=feed1234)" in text
    assert "  last       repair: aborting -> reloading (rank_died, replace_ranks), 1m 15s ago (" in text
    assert "  loading    loaded 5.0 GiB of 8.0 GiB (62%): rank 0 100%, rank 1 25%" in text
    assert "             rank 1: 1.0 GiB of 4.0 GiB (25%), 1/2 files" in text
    assert "  requests   10 completed, 1 failed, 0 cancelled" in text


def test_a_repair_shows_in_status_metrics_and_journal(daemon):
    """Last: it leaves an incident behind. Rank 1 is killed mid-decode: rank_died, replace_ranks (the request
    is replayed after the repair and completes)."""
    assert daemon.admin.inject(1, "sigkill", "decode").status_code == 200
    status, _, body = daemon.chat(chat_body(max_tokens=8))
    assert status == 200, body
    wait_ready(daemon)
    proc = neurond("status", "--config", daemon.conf)
    assert proc.returncode == 0, proc.stderr
    assert "  incidents  1\n" in proc.stdout
    assert "  last       recovered: reloading -> healthy (rank_died, replace_ranks), " in proc.stdout

    _, _, text = http("GET", daemon.url("/metrics"))
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text.decode()) for s in family.samples}
    assert samples[("neurond_fault_detection_seconds_count", (("cause", "rank_died"),))] == 1
    assert samples[("neurond_recoveries_total", (("cause", "rank_died"), ("rung", "replace_ranks")))] == 1
    assert samples[("neurond_recovery_seconds_count", (("rung", "replace_ranks"),))] == 1
    assert samples[("neurond_load_progress_ratio", (("rank", "1"),))] == 1.0
    assert samples[("neurond_lifecycle_state", (("state", "healthy"),))] == 1
    info = [labels for name, labels in samples if name == "neurond_info"]
    assert info == [(("model", "neurond-builtin"), ("tp_size", "2"), ("version", ANY))]
    assert ("process_start_time_seconds", ()) in samples

    incident = json.loads(neurond("status", "--json", "--config", daemon.conf).stdout)["last_cause"]["incident"]
    entries = [parse_structured_line(line) for line in daemon.log().splitlines()
               if f"NEUROND_INCIDENT={incident}" in line]
    reloaded = [(e["NEUROND_RANK"], e["NEUROND_FILES_DONE"]) for e in entries if e["NEUROND_EVENT"] == "load_progress"]
    assert reloaded == [("1", "0"), ("1", "1")]  # only the replacement loads, within the incident
