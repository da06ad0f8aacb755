"""`neurond audit` and the saved queries on a fleet of real journal files (tests/observe/fleet.py): each host
classified as it should be, the same answers from --directory, --file and -u neurond, and exit codes that
cron and monitoring can act on."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from neurond.observe.entries import unique
from neurond.observe.incident import rebuild
from tests.conftest import REPO
from tests.observe.fleet import EXPECTED, HOSTS, write_fleet
from tests.observe.journald import need_journal_remote

QUERIES = REPO / "journal-queries"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    need_journal_remote()
    directory = tmp_path_factory.mktemp("remote")
    write_fleet(directory)
    return directory


def audit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neurond", "audit", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def query(name: str, *source: str) -> list[str]:
    proc = subprocess.run(["sh", str(QUERIES / f"{name}.sh"), *source], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_audit_classifies_every_host_of_a_directory(fleet):
    proc = audit("--directory", str(fleet), "--json")
    assert proc.returncode == 2, proc.stderr  # something is stuck or gave up
    r = json.loads(proc.stdout)
    assert set(r["hosts"]) == set(HOSTS)
    for host, classes in EXPECTED.items():
        got = sorted(i["class"] for i in r["incidents"] if i["host"] == host)
        assert got == sorted(classes), host
        assert r["hosts"][host]["incidents"] == len(classes)
    degraded = next(i for i in r["incidents"] if i["class"] == "degraded")
    assert (degraded["incident"], degraded["why"]) == ("d2", "abort failed")
    assert r["by_cause"] == {"rank_died": {"replace_ranks": 1, "give_up": 1}, "rank_failed": {"comm_rebuild": 1},
                             "rank_timeout": {"replace_ranks": 1, "-": 1}}
    assert r["mttr_ms"] == {"count": 3, "p50": 3100, "p95": 5200, "max": 5200}
    assert r["hosts"]["gpu-degraded"]["mttr_ms"]["max"] == 5200 and r["hosts"]["gpu-degraded"]["requests_failed"] == 2
    needs = {(i["host"], i["class"]) for i in r["needs_action"]}
    assert needs == {("gpu-degraded", "degraded"), ("gpu-stuck", "stuck"), ("gpu-gaveup", "gave_up")}
    stuck = next(i for i in r["needs_action"] if i["class"] == "stuck")
    assert stuck["command"] == f"journalctl --directory={fleet} _HOSTNAME=gpu-stuck NEUROND_INCIDENT=s1"
    shown = subprocess.run(stuck["command"].split() + ["-q", "-o", "cat"], capture_output=True, text=True).stdout
    assert shown.splitlines()[0].startswith("neurond fault_detected: rank_timeout on rank 0")


def test_audit_text_table_and_exit_codes_by_worst_class(fleet):
    proc = audit("--directory", str(fleet))
    out = proc.stdout
    assert proc.returncode == 2 and "5 host(s), 5 incident(s)" in out
    assert "Needs an operator (3):" in out and "gpu-stuck  STUCK  incident s1" in out
    assert "MTTR over 3 recoveries: p50 3.10s, p95 5.20s, max 5.20s" in out
    row = next(line for line in out.splitlines() if line.startswith("gpu-degraded"))
    assert row.split()[:4] == ["gpu-degraded", "2", "1", "1"]
    assert audit("--file", str(fleet / "remote-gpu-clean.journal")).returncode == 0
    assert audit("--file", str(fleet / "remote-gpu-quiet.journal")).returncode == 0
    assert audit("--file", str(fleet / "remote-gpu-degraded.journal")).returncode == 1
    both = audit("--file", str(fleet / "remote-gpu-clean.journal"), "--file", str(fleet / "remote-gpu-stuck.journal"))
    assert both.returncode == 2 and "2 host(s), 2 incident(s)" in both.stdout
    assert audit("--file", str(fleet / "remote-gpu-stuck.journal"), "--stuck-after", "86400").returncode == 0  # open
    missing = audit("--file", str(fleet / "nothing-*.journal"))
    assert missing.returncode == 3 and "cannot read the journal" in missing.stderr


@pytest.mark.parametrize("source", ["directory", "file", "unit"])
def test_saved_queries_answer_alike_on_directory_files_and_unit(fleet, source):
    args = {"directory": [f"--directory={fleet}"], "file": [f"--file={fleet}/*.journal"],
            "unit": ["-u", "neurond", f"--directory={fleet}"]}[source]
    clean = query("clean-recoveries", *args)
    assert [line.split()[1] for line in clean] == ["gpu-degraded", "gpu-clean"]  # sorted by time
    assert all("recovery_finished" in line and ", clean (incident" in line for line in clean)
    hangs = query("hangs-detected", *args)
    assert [line.split()[1] for line in hangs] == ["gpu-stuck", "gpu-degraded"]
    assert [line.split()[1] for line in query("aborts-failed", *args)] == ["gpu-degraded"]
    assert len(query("reloads-failed", *args)) == 5 and all("gpu-gaveup" in x for x in query("reloads-failed", *args))
    gave_up = query("gave-up", *args)
    assert len(gave_up) == 1 and "gpu-gaveup" in gave_up[0] and "cause breaker_open" in gave_up[0]
    assert len(query("requests-failed", *args)) == 5
    assert query("incidents-per-host", *args) == [
        "gpu-clean 1 rank_failed=1", "gpu-degraded 2 rank_died=1 rank_timeout=1", "gpu-gaveup 1 rank_died=1",
        "gpu-stuck 1 rank_timeout=1"]
    assert query("mttr", *args) == ["recoveries 3 p50 3100ms p95 5200ms max 5200ms"]


def test_every_saved_query_documents_its_question_and_bad_result():
    scripts = sorted(QUERIES.glob("*.sh"))
    assert {s.stem for s in scripts} == {"clean-recoveries", "hangs-detected", "aborts-failed", "reloads-failed",
                                         "gave-up", "requests-failed", "incidents-per-host", "mttr"}
    from neurond.observe.catalog import BY_ID

    for script in scripts:
        text = script.read_text()
        assert "# Question:" in text and "# A bad result:" in text and "journalctl" in text, script
        assert "set -- -u neurond" in text  # one host by default
        ids = set(re.findall(r"MESSAGE_ID=([0-9a-f]{32})\b", text))
        assert ids and ids <= set(BY_ID), script


def _e(ts_s, event, inc=None, pid="1", **f):
    e = {"__REALTIME_TIMESTAMP": str(int(ts_s * 1e6)), "_HOSTNAME": "h", "_PID": pid, "NEUROND_EVENT": event}
    if inc:
        e["NEUROND_INCIDENT"] = inc
    e.update({f"NEUROND_{k.upper()}": str(v) for k, v in f.items()})
    return e


def test_unfinished_incidents_are_open_stuck_or_interrupted():
    def fault(t, inc, pid):
        return _e(t, "fault_detected", inc, pid, cause="rank_died", rank=1, tp_size=2)

    # Four daemons of one host, one boot, one after the other; the last one, still running, has no incident.
    entries = [fault(0, "stuck", "1"), fault(1000, "open", "2"), fault(2000, "stopped", "3"),
               _e(2010, "transition", pid="3", state_from="aborting", state_to="stopped"),  # systemctl stop
               fault(3000, "killed", "4"), _e(3050, "transition", pid="5", state_from="loading", state_to="healthy")]
    got = {i.incident: i.cls for i in rebuild(unique(entries), now_us=int(3100 * 1e6), stuck_after_s=900)}
    # "killed": pid 4 never stopped and neurond started again as pid 5: its incident can never end
    assert got == {"stuck": "stuck", "open": "stuck", "stopped": "interrupted", "killed": "stuck"}
    got = {i.incident: i.cls for i in rebuild(unique(entries), now_us=int(3100 * 1e6), stuck_after_s=5000)}
    # within the bound only the daemons that died are stuck: pids 1 and 2 were followed by another start
    assert got == {"stuck": "stuck", "open": "stuck", "stopped": "interrupted", "killed": "stuck"}
    alone = [fault(1000, "open", "2")]  # no later start on the host: the daemon may still be repairing
    assert [i.cls for i in rebuild(unique(alone), now_us=int(1100 * 1e6), stuck_after_s=900)] == ["open"]


def test_a_recovery_slower_than_the_bound_is_degraded():
    entries = [_e(0, "fault_detected", "i", cause="rank_failed", tp_size=1),
               _e(1200, "recovery_finished", "i", rung="comm_rebuild", attempt=1, duration_ms=1_200_000)]
    (inc,) = rebuild(unique(entries), now_us=int(2000e6), stuck_after_s=900)
    assert (inc.cls, inc.why, inc.mttr_ms) == ("degraded", "recovered only after 1200 s", 1_200_000)
    # the clean bound is fixed (NEUROND_OUTCOME means the same everywhere); --stuck-after is for unfinished ones
    (inc,) = rebuild(unique(entries), now_us=int(2000e6), stuck_after_s=86400)
    assert inc.cls == "degraded"


@pytest.mark.parametrize("cause, tp, impl, rung", [
    ("rank_failed", 1, None, "comm_rebuild"), ("out_of_memory", 4, "neurond", "comm_rebuild"),
    ("rank_died", 1, None, "full_reload"), ("rank_died", 2, "neurond", "replace_ranks"),
    ("rank_timeout", 8, None, "replace_ranks"), ("cuda_error", 2, None, "replace_ranks"),
    ("rank_failed", 2, "transformers", "full_reload"),
])
def test_the_cheapest_rung_that_fits(cause, tp, impl, rung):
    from neurond.judgement import judge_recovery, needed_rung

    assert needed_rung(cause, tp, impl) == rung
    assert judge_recovery(cause, tp, rung, 1, False, impl) == ("clean", "")
    if rung != "full_reload":
        assert judge_recovery(cause, tp, "full_reload", 1, False, impl)[0] == "degraded"


def test_journals_written_before_the_rename_still_say_their_rung():
    """NEUROND_RUNG was NEUROND_TIER until session 6: the audit reads a fleet's older journals too."""
    from neurond.observe.entries import parse

    old = parse({"NEUROND_EVENT": "recovery_finished", "NEUROND_TIER": "replace_ranks", "_HOSTNAME": "h"})
    new = parse({"NEUROND_EVENT": "recovery_finished", "NEUROND_RUNG": "comm_rebuild", "_HOSTNAME": "h"})
    assert (old.rung, new.rung) == ("replace_ranks", "comm_rebuild")
