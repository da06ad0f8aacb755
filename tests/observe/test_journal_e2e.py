"""End to end on a real journal: a daemon whose only journald is a private one (its own mount namespace, in a
cgroup named neurond.service) takes an injected fault and repairs itself; then the journal tells that one
incident completely, from the leader and from the rank worker, and the saved queries and `neurond audit`
find exactly it."""

from __future__ import annotations

import json
import subprocess
import sys

from neurond.observe.catalog import MESSAGES
from neurond.observe.events import Event
from tests.conftest import REPO, chat_body
from tests.faults import fault_daemon, wait_ready
from tests.observe.journald import (
    HOSTNAME,
    WrappedDaemon,
    need_private_journald,
    read_journal,
    remove_cgroup,
    unit_cgroup,
)


def test_a_fault_in_a_real_journal_is_one_complete_clean_incident(cache_dir, builtin_model, tmp_path):
    need_private_journald()
    journal_dir = tmp_path / "journal-root"
    journal_dir.mkdir()
    cgroup = unit_cgroup()
    try:
        def start(tp_size, extra):
            d = WrappedDaemon(cache_dir, tp_size, extra, "live", journal_dir, cgroup)
            d.wait_ready()
            return d

        d = fault_daemon(start, tmp_path, 1)
        leader, (worker,) = d.leader_pid(), d.worker_pids()
        assert d.admin.inject(0, "raise", "decode").status_code == 200
        status, _, body = d.chat(chat_body(max_tokens=8))
        assert (status, body["error"]["code"]) == (500, "rank_failed")
        wait_ready(d)
        assert d.chat(chat_body(max_tokens=4))[0] == 200
        assert d.stop() == 0
    finally:
        remove_cgroup(cgroup)

    source = f"--directory={journal_dir / 'journal'}"
    entries = read_journal(source, matches=("SYSLOG_IDENTIFIER=neurond",))
    events = [e for e in entries if "NEUROND_EVENT" in e]
    assert all(e["MESSAGE_ID"] == MESSAGES[Event(e["NEUROND_EVENT"])].message_id for e in events)
    assert all(e["_PID"] == str(leader) and e["_HOSTNAME"] == HOSTNAME for e in events)
    if cgroup is not None:
        assert all(e.get("_SYSTEMD_UNIT") == "neurond.service" for e in entries)

    incidents = {e["NEUROND_INCIDENT"] for e in events if "NEUROND_INCIDENT" in e}
    assert len(incidents) == 1
    (incident,) = incidents
    story = [(e["NEUROND_EVENT"], e.get("NEUROND_LIFECYCLE_EVENT")) for e in events
             if e.get("NEUROND_INCIDENT") == incident]
    assert story == [("fault_detected", None), ("transition", "fault"), ("request_failed", None),
                     ("transition", "abort"), ("abort_started", None), ("abort_finished", None),
                     ("transition", "repair"), ("comm_rebuilt", None), ("recovery_finished", None),
                     ("transition", "recovered")]
    by = {e["NEUROND_EVENT"]: e for e in events if e.get("NEUROND_INCIDENT") == incident}
    fault = by["fault_detected"]
    assert (fault["NEUROND_CAUSE"], fault["NEUROND_RANK"], fault["PRIORITY"]) == ("rank_failed", "0", "3")
    assert fault["CODE_FILE"].endswith("neurond/pool/supervisor.py") and fault["CODE_FUNC"] == "Supervisor._fault"
    assert (fault["NEUROND_MODEL"], fault["NEUROND_TP_SIZE"]) == ("neurond-builtin", "1")
    failed = by["request_failed"]
    assert failed["CODE_FILE"].endswith("neurond/engine/engine.py") and failed["NEUROND_STATUS"] == "500"
    assert failed["NEUROND_REQUEST_ID"] == fault["NEUROND_REQUEST_ID"]
    done = by["recovery_finished"]
    assert (done["NEUROND_RUNG"], done["NEUROND_ATTEMPT"], done["NEUROND_OUTCOME"]) == ("comm_rebuild", "1", "clean")
    assert done["CODE_FUNC"] == "Supervisor._recover" and int(done["NEUROND_DURATION_MS"]) > 0
    # the rank worker's own entry: its pid, its rank, the real site
    (raised,) = [e for e in entries if e.get("NEUROND_RANK") == "0" and "Decode failed" in e["MESSAGE"]]
    assert raised["_PID"] == str(worker) and raised["PRIORITY"] == "3" and "NEUROND_EVENT" not in raised
    assert raised["CODE_FILE"].endswith("neurond/worker/main.py") and raised["CODE_FUNC"] == "_failure"

    def query(name, *src):
        proc = subprocess.run(["sh", str(REPO / "journal-queries" / f"{name}.sh"), *src], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    sources = [[source], [f"--file={journal_dir}/journal/*/*.journal"]]
    sources += [[source, "-u", "neurond"]] if cgroup else []
    for src in sources:
        (clean,) = query("clean-recoveries", *src)
        assert f"(incident {incident})" in clean and "via comm_rebuild" in clean
        (failed_line,) = query("requests-failed", *src)
        assert "failed with 500 rank_failed" in failed_line
        assert query("incidents-per-host", *src) == [f"{HOSTNAME} 1 rank_failed=1"]
        assert query("mttr", *src)[0].startswith("recoveries 1 p50 ")
        for name in ("hangs-detected", "aborts-failed", "reloads-failed", "gave-up"):
            assert query(name, *src) == [], name

    proc = subprocess.run([sys.executable, "-m", "neurond", "audit", "--directory", str(journal_dir / "journal"),
                           "--json"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(proc.stdout)
    (inc,) = r["incidents"]
    assert (inc["host"], inc["incident"], inc["class"], inc["cause"], inc["rung"]) == \
        (HOSTNAME, incident, "clean", "rank_failed", "comm_rebuild")
    assert r["needs_action"] == [] and r["mttr_ms"]["count"] == 1 and r["hosts"][HOSTNAME]["requests_failed"] == 1
