"""The audit and the saved queries across reboots, rotations, resent entries and slow recoveries (issue 18), on
journal files written by systemd-journal-remote: an incident belongs to the daemon instance that had it (host,
boot id, PID, start), each entry counts once however many copies the collector stored, and "clean" means one
thing to the daemon, the queries and the audit."""

from __future__ import annotations

import json
import re
import time

import pytest

from neurond.judgement import CLEAN_WITHIN_S
from neurond.observe.catalog import MESSAGES
from neurond.observe.entries import unique
from neurond.observe.events import Event as E
from neurond.observe.incident import rebuild
from tests.conftest import REPO
from tests.observe.fleet import (
    Episode,
    abort,
    fault,
    host_entries,
    recovered,
    repair,
    startup,
    stop,
    write_fleet,
)
from tests.observe.journald import need_journal_remote, write_journal_file
from tests.observe.test_audit import audit, query

NOW = int(time.time() * 1e6)
REBOOTED = "0d2e4f6a8b1c4d3e9f5a7b6c8d0e1f23"  # the boot after the power cycle


def power_cycled() -> list[Episode]:
    """The case of issue 18. TP=2: rank_timeout, abort failed, full_reload loading; the GPU fell off the bus and
    the host was power-cycled (no stop entry). After the reboot neurond got the same PID and was stopped on
    request 700 s later, 820 s after the fault: within the stuck bound."""
    lost = (fault("p1", "rank_timeout", 1, status=504) + abort("p1", "rank_timeout", 1, ok=False)
            + repair("p1", "rank_timeout", 1, "full_reload", killed=[0, 1]))
    return [Episode(7200, startup(2)), Episode(3600, lost),
            Episode(3480, startup(2), boot=REBOOTED, booted_s=3540),
            Episode(2780, stop(), boot=REBOOTED, booted_s=3540)]


def watchdog_killed() -> list[Episode]:
    """Same boot: the watchdog killed a daemon mid-recovery and systemd started another (another PID) 90 s
    later, whose incident recovered cleanly; later the host was stopped on request."""
    return [Episode(7200, startup(2)),
            Episode(3600, fault("w1", "rank_died", 1) + abort("w1", "rank_died", 1)
                    + repair("w1", "rank_died", 1, "replace_ranks", [1])[:1]),
            Episode(3500, startup(2), pid=5151),
            Episode(3400, fault("w2", "rank_died", 0) + abort("w2", "rank_died", 1)
                    + repair("w2", "rank_died", 1, "replace_ranks", [0])
                    + recovered("w2", "rank_died", 1, "replace_ranks", 2900), pid=5151),
            Episode(3000, stop(), pid=5151)]


def pid_reused_in_one_boot() -> list[Episode]:
    """Same boot, same PID twice: the first daemon was killed mid-recovery (pid_max wrapped before the restart);
    the second one's start and stop are not the first one's."""
    return [Episode(7200, startup(2)),
            Episode(3600, fault("k1", "rank_timeout", 0, status=504) + abort("k1", "rank_timeout", 1)[:2]),
            Episode(3500, startup(2)), Episode(3300, stop())]


def no_end_at_all() -> list[Episode]:
    """A fault and nothing after it: no abort, no stop, no restart, not even the daemon's start in the journal."""
    return [Episode(3600, fault("n1", "rank_died", 1, request=False)[:1])]


def slow_recovery(old_daemon: bool) -> list[Episode]:
    """Recovered by the right rung on the first attempt, but 1,020 s after the fault. `old_daemon`: written by a
    daemon that judged NEUROND_OUTCOME without the time bound."""
    steps = (fault("slow", "rank_failed", 0, status=500) + abort("slow", "rank_failed", 1)
             + repair("slow", "rank_failed", 1, "comm_rebuild") + recovered("slow", "rank_failed", 1, "comm_rebuild",
                                                                             1_020_000))
    if old_daemon:
        steps = [(ev, dict(f, outcome="clean") if ev is E.RECOVERY_FINISHED else f) for ev, f in steps]
    return [Episode(7200, startup(1)), Episode(3600, steps, old_daemon=old_daemon)]


HOSTS = {  # host -> (tp, episodes, classes of its incidents)
    "gpu-cycled": (2, power_cycled(), ["stuck"]),
    "gpu-watchdog": (2, watchdog_killed(), ["stuck", "clean"]),
    "gpu-pidreuse": (2, pid_reused_in_one_boot(), ["stuck"]),
    "gpu-noend": (2, no_end_at_all(), ["stuck"]),
    "gpu-slow": (1, slow_recovery(False), ["degraded"]),
    "gpu-slow-old": (1, slow_recovery(True), ["degraded"]),
}


def entries(host: str) -> list[dict]:
    tp, episodes, _ = HOSTS[host]
    return host_entries(host, NOW, tp, episodes)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    need_journal_remote()
    directory = tmp_path_factory.mktemp("remote")
    for host in HOSTS:
        write_journal_file(directory / f"remote-{host}.journal", entries(host))
    return directory


def test_each_host_is_classified_within_its_daemon_instances(fleet):
    proc = audit("--directory", str(fleet), "--json")
    assert proc.returncode == 2, proc.stderr
    r = json.loads(proc.stdout)
    for host, (_, _, classes) in HOSTS.items():
        assert sorted(i["class"] for i in r["incidents"] if i["host"] == host) == sorted(classes), host
    needs = {(i["host"], i["incident"], i["class"]) for i in r["needs_action"]}
    assert needs == {("gpu-cycled", "p1", "stuck"), ("gpu-watchdog", "w1", "stuck"), ("gpu-pidreuse", "k1", "stuck"),
                     ("gpu-noend", "n1", "stuck"), ("gpu-slow", "slow", "degraded"),
                     ("gpu-slow-old", "slow", "degraded")}
    assert all(h["interrupted"] == 0 for h in r["hosts"].values())


def test_a_pid_reused_after_a_reboot_is_another_daemon(fleet):
    """The stop of the daemon after the reboot is not the end of the incident before it (issue 18)."""
    proc = audit("--file", str(fleet / "remote-gpu-cycled.journal"), "--json")
    assert proc.returncode == 2, proc.stdout  # was 0: "interrupted"
    r = json.loads(proc.stdout)
    assert r["hosts"]["gpu-cycled"]["stuck"] == 1 and r["hosts"]["gpu-cycled"]["interrupted"] == 0
    (inc,) = r["needs_action"]
    assert (inc["incident"], inc["class"], inc["end"], inc["pid"]) == ("p1", "stuck", "died", "4242")
    assert inc["boot_id"] != REBOOTED and "after a reboot" in inc["why"] and inc["state"] == "reloading"
    text = audit("--file", str(fleet / "remote-gpu-cycled.journal")).stdout
    assert re.search(r"gpu-cycled  STUCK  incident p1 since .* \(pid 4242\): rank_timeout on rank 1 -- ", text)


def test_a_daemon_killed_mid_recovery_is_stuck_at_once(fleet):
    """Its incident can never end, so it is stuck before the bound, and its successor's stop is not its own."""
    for host, killed in (("gpu-watchdog", "w1"), ("gpu-pidreuse", "k1")):
        proc = audit("--file", str(fleet / f"remote-{host}.journal"), "--stuck-after", "86400", "--json")
        assert proc.returncode == 2, host
        r = json.loads(proc.stdout)
        stuck = next(i for i in r["incidents"] if i["incident"] == killed)
        assert (stuck["class"], stuck["end"]) == ("stuck", "died") and "in the same boot" in stuck["why"], host
    r = json.loads(audit("--file", str(fleet / "remote-gpu-watchdog.journal"), "--json").stdout)
    assert r["mttr_ms"] == {"count": 1, "p50": 2900, "p95": 2900, "max": 2900}  # only w2, by pid 5151
    assert {i["incident"]: i["pid"] for i in r["incidents"]} == {"w1": "4242", "w2": "5151"}


def test_an_incident_with_no_end_at_all(fleet):
    """Open while younger than the bound, stuck after it; nothing else on the host decides."""
    path = str(fleet / "remote-gpu-noend.journal")
    r = json.loads(audit("--file", path, "--json").stdout)
    (inc,) = r["incidents"]
    assert (inc["class"], inc["end"], inc["state"]) == ("stuck", None, None) and "within 900 s" in inc["why"]
    assert audit("--file", path).returncode == 2
    later = audit("--file", path, "--stuck-after", "86400", "--json")
    assert later.returncode == 0 and json.loads(later.stdout)["incidents"][0]["class"] == "open"


def test_clean_means_one_thing_to_the_daemon_the_queries_and_the_audit(fleet):
    """A 1,020 s recovery: the daemon says degraded, clean-recoveries.sh leaves it out (also where an older
    daemon said clean) and the audit says degraded; and every recovery of both fleets is judged alike."""
    slow = [e for e in entries("gpu-slow") if e["NEUROND_EVENT"] == "recovery_finished"]
    assert [(e["NEUROND_OUTCOME"], e["NEUROND_OUTCOME_WHY"]) for e in slow] == [("degraded",
                                                                                 "recovered only after 1020 s")]
    for host in ("gpu-slow", "gpu-slow-old"):
        assert query("clean-recoveries", f"--file={fleet}/remote-{host}.journal") == [], host
        proc = audit("--file", str(fleet / f"remote-{host}.journal"), "--json")
        assert proc.returncode == 1
        (inc,) = json.loads(proc.stdout)["incidents"]
        assert (inc["class"], inc["why"]) == ("degraded", "recovered only after 1020 s")
    assert json.loads(audit("--file", str(fleet / "remote-gpu-slow-old.journal"), "--json").stdout)[
        "incidents"][0]["outcome"] == "clean"  # what that daemon said, shown beside the audit's verdict
    # The bound is one number everywhere it is written down.
    assert f"within {CLEAN_WITHIN_S:.0f} s of the fault" in MESSAGES[E.RECOVERY_FINISHED].text
    assert f"within_ms={CLEAN_WITHIN_S * 1000:.0f}" in (REPO / "journal-queries/clean-recoveries.sh").read_text()


def test_the_daemons_outcome_is_the_audits_class(fleet, tmp_path):
    write_fleet(tmp_path, now_us=NOW)
    for directory in (fleet, tmp_path):
        r = json.loads(audit("--directory", str(directory), "--json").stdout)
        recovered_ = [i for i in r["incidents"] if i["end"] == "recovered" and i["host"] != "gpu-slow-old"]
        assert recovered_ and all(i["outcome"] == i["class"] for i in recovered_), directory
        listed = query("clean-recoveries", f"--directory={directory}")
        assert len(listed) == sum(i["class"] == "clean" for i in r["incidents"])


# ---------------------------------------------------------------------------------------------- copies and rotation
RESENT_QUERIES = ["clean-recoveries", "hangs-detected", "aborts-failed", "reloads-failed", "gave-up",
                  "requests-failed", "incidents-per-host", "mttr"]


def _report(directory) -> dict:
    proc = audit("--directory", str(directory), "--json")
    r = json.loads(proc.stdout)
    for inc in r["needs_action"]:  # its journalctl command names the directory
        inc["command"] = inc["command"].replace(str(directory), "DIR")
    return {k: v for k, v in r.items() if k != "source"}


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """The default fleet (tests/observe/fleet.py) plus the issue's hosts, three ways, one directory each:
    as sent; with a resent tail in the same file (journal-upload after an outage); and rotated into two files
    (an archived and an active one, as journal-remote names them) that both hold the middle third of the
    entries."""
    need_journal_remote()
    pristine, resent, rotated = (tmp_path_factory.mktemp(n) for n in ("pristine", "resent", "rotated"))
    from tests.observe.fleet import HOSTS as FLEET

    hosts = {**{h: host_entries(h, NOW) for h in FLEET}, **{h: entries(h) for h in HOSTS}}
    for host, rows in hosts.items():
        write_journal_file(pristine / f"remote-{host}.journal", rows)
        half = len(rows) // 2
        write_journal_file(resent / f"remote-{host}.journal", rows + rows[half:])
        third = len(rows) // 3
        write_journal_file(rotated / f"remote-{host}@0000000000000001-{NOW:016x}.journal", rows[:2 * third + 1])
        write_journal_file(rotated / f"remote-{host}.journal", rows[third:])
    return pristine, resent, rotated


def test_resent_entries_count_once_in_the_audit(copies):
    pristine, resent, rotated = copies
    want = _report(pristine)
    assert want["mttr_ms"]["count"] == 6 and sum(h["requests_failed"] for h in want["hosts"].values()) == 11
    assert _report(resent) == want
    assert _report(rotated) == want


@pytest.mark.parametrize("name", RESENT_QUERIES)
def test_resent_entries_count_once_in_the_saved_queries(copies, name):
    pristine, resent, rotated = copies
    want = query(name, f"--directory={pristine}")
    assert want, name
    assert query(name, f"--directory={resent}") == want
    assert query(name, f"--file={rotated}/*.journal") == want


def test_an_incident_split_by_a_rotation_is_whole(tmp_path):
    """journal-remote rotated the host's file between w2's fault and its recovery: read together, the archived
    and the active file give one clean incident, from the daemon that had it."""
    need_journal_remote()
    rows = entries("gpu-watchdog")
    cut = next(n for n, e in enumerate(rows) if e["NEUROND_EVENT"] == "recovery_finished")
    write_journal_file(tmp_path / f"remote-gpu-watchdog@0000000000000001-{NOW:016x}.journal", rows[:cut])
    write_journal_file(tmp_path / "remote-gpu-watchdog.journal", rows[cut:])
    for source in (["--directory", str(tmp_path)], ["--file", f"{tmp_path}/*.journal"]):
        r = json.loads(audit(*source, "--json").stdout)
        assert {i["incident"]: (i["class"], i["pid"]) for i in r["incidents"]} == {
            "w1": ("stuck", "4242"), "w2": ("clean", "5151")}, source
        assert r["mttr_ms"]["count"] == 1 and r["hosts"]["gpu-watchdog"]["requests_failed"] == 2
    assert query("mttr", f"--directory={tmp_path}") == ["recoveries 1 p50 2900ms p95 2900ms max 2900ms"]


def test_copies_that_differ_only_in_the_cursor_count_once():
    """Copies differ in __CURSOR (the collector's position) and nothing else the audit keys on."""
    rows = entries("gpu-watchdog")
    as_read = [dict(e, __CURSOR=f"s=collector;i={n}") for n, e in enumerate(rows + rows)]
    as_read = [{k: str(v) for k, v in e.items()} for e in as_read]
    assert len(unique(as_read)) == len(rows)
    got = {i.incident: i.cls for i in rebuild(unique(as_read), NOW, 900)}
    assert got == {"w1": "stuck", "w2": "clean"}
