"""JournalSink and the logging handler: the fields of each entry, where CODE_* points, the outcome as given,
and where entries go with a live journald (a private one, read back with journalctl), with none (stderr
lines) and with a dead one (a stale socket: refused, stderr, no exception)."""

from __future__ import annotations

import textwrap

import pytest

from neurond.config import Config
from neurond.lifecycle import Cause
from neurond.observe import journal
from neurond.observe.catalog import MESSAGES
from neurond.observe.events import Event, emit
from tests.observe.journald import (
    HOSTNAME,
    need_private_journald,
    read_journal,
    remove_cgroup,
    run_with_journal,
    unit_cgroup,
    wrap,
)


@pytest.fixture
def captured(monkeypatch):
    entries: list[dict] = []
    monkeypatch.setattr(journal, "write", lambda entry, line: entries.append(entry) or True)
    return entries


def test_every_event_has_its_id_fields_priority_and_greppable_message(captured):
    sink = journal.JournalSink()
    for event in Event:
        emit(sink, event, incident="inc1", cause="rank_died", rank=1, tp_size=2, model="m", state_from="healthy",
             state_to="poisoned", lifecycle_event="fault", request_id=None, detail="")
    assert len(captured) == len(Event)
    for event, entry in zip(Event, captured, strict=True):
        assert entry["MESSAGE_ID"] == MESSAGES[event].message_id
        assert entry["MESSAGE"].startswith(f"neurond {event.value}: ")
        assert entry["SYSLOG_IDENTIFIER"] == "neurond" and entry["NEUROND_EVENT"] == event.value
        assert (entry["NEUROND_INCIDENT"], entry["NEUROND_RANK"], entry["NEUROND_TP_SIZE"]) == ("inc1", 1, 2)
        assert "NEUROND_REQUEST_ID" not in entry and "NEUROND_DETAIL" not in entry  # None and "" left out
        assert all(k == k.upper() for k in entry)
    assert len({e["MESSAGE_ID"] for e in captured}) == len(Event)
    by = {e["NEUROND_EVENT"]: e for e in captured}
    assert (by["gave_up"]["PRIORITY"], by["fault_detected"]["PRIORITY"], by["rank_spawned"]["PRIORITY"]) == (2, 3, 6)
    assert by["transition"]["PRIORITY"] == 4  # into poisoned


def test_code_fields_name_the_deciding_code_not_the_plumbing(captured):
    from neurond.pool.supervisor import Supervisor

    sup = Supervisor(Config(), "/nonexistent", 4096, events=journal.JournalSink())

    def deciding_site():
        sup._send("loaded", Cause("startup"))  # -> lifecycle -> after_transition -> _emit -> emit -> sink

    deciding_site()
    emit(sup.events, Event.REQUEST_FAILED, request_id="r1", cause="rank_died")
    transition, failed = captured
    assert transition["CODE_FILE"] == __file__ and transition["CODE_FUNC"].endswith("deciding_site")
    assert failed["CODE_FUNC"].endswith("test_code_fields_name_the_deciding_code_not_the_plumbing")
    assert isinstance(failed["CODE_LINE"], int)


@pytest.mark.parametrize("outcome, why", [("clean", None), ("degraded", "abort failed")])
def test_the_end_of_an_incident_carries_the_verdict_it_was_given(captured, outcome, why):
    """The supervisor judges (tests/pool/test_supervisor.py); the journal writes the verdict, and its priority
    follows it (a degraded recovery is a warning)."""
    sink = journal.JournalSink()
    emit(sink, Event.FAULT_DETECTED, incident="i", cause="rank_failed", rank=0, tp_size=1)
    emit(sink, Event.ABORT_FAILED, incident="i", tp_size=1)  # judged by nobody here
    emit(sink, Event.RECOVERY_FINISHED, incident="i", cause="rank_failed", tp_size=1, duration_ms=12,
         rung="comm_rebuild", attempt=1, outcome=outcome, outcome_why=why)
    done = captured[-1]
    assert done["NEUROND_OUTCOME"] == outcome and done.get("NEUROND_OUTCOME_WHY") == why
    assert done["PRIORITY"] == (5 if outcome == "clean" else 4)


def test_without_journald_each_event_is_one_structured_stderr_line(monkeypatch, capsys):
    monkeypatch.setattr(journal, "JOURNAL_SOCKET", "/nonexistent/journal/socket")
    emit(journal.JournalSink(), Event.FAULT_DETECTED, incident="i", cause="rank_died", rank=1,
         detail='exit "code" 9\nsecond line')
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('MESSAGE="neurond fault_detected: rank_died on rank 1')
    parsed = journal.parse_structured_line(lines[0])
    assert parsed["MESSAGE_ID"] == MESSAGES[Event.FAULT_DETECTED].message_id
    assert parsed["NEUROND_DETAIL"] == 'exit "code" 9\nsecond line' and parsed["PRIORITY"] == "3"


EMITTER = textwrap.dedent("""
    import logging, sys
    from neurond.observe.events import Event, emit
    from neurond.observe.journal import JournalSink, setup_logging

    def fault_site():
        emit(JournalSink(), Event.FAULT_DETECTED, incident="abc", cause="rank_died", rank=1, tp_size=2,
             model="m", detail="two\\nlines")

    setup_logging("info", rank=1)
    fault_site()
    logging.getLogger("neurond.worker").error("rank %d: Decode failed", 1)
    print("done", flush=True)
""")


def test_entries_reach_a_real_journald_with_their_fields(tmp_path):
    need_private_journald()
    cgroup = unit_cgroup()
    try:
        proc = run_with_journal([__import__("sys").executable, "-c", EMITTER], tmp_path, cgroup)
    finally:
        remove_cgroup(cgroup)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr
    entries = read_journal(f"--directory={tmp_path / 'journal'}", matches=("SYSLOG_IDENTIFIER=neurond",))
    fault, record = entries
    assert fault["MESSAGE_ID"] == MESSAGES[Event.FAULT_DETECTED].message_id and fault["PRIORITY"] == "3"
    assert (fault["NEUROND_INCIDENT"], fault["NEUROND_RANK"], fault["NEUROND_DETAIL"]) == ("abc", "1", "two\nlines")
    assert fault["CODE_FUNC"] == "fault_site" and fault["_HOSTNAME"] == HOSTNAME
    assert record["MESSAGE"] == "rank 1: Decode failed" and record["NEUROND_RANK"] == "1"
    assert record["PRIORITY"] == "3" and record["CODE_FUNC"] == "<module>"
    if cgroup is not None:
        assert fault["_SYSTEMD_UNIT"] == "neurond.service"
    # stderr is not the journal here (no JOURNAL_STREAM), so the lines are on stderr as well
    assert "neurond fault_detected:" in proc.stderr and "Decode failed" in proc.stderr


def test_a_dead_journald_never_breaks_the_caller(tmp_path):
    need_private_journald()
    import subprocess
    import sys

    proc = subprocess.run(wrap("dead", None, None, [sys.executable, "-c", EMITTER]), capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHON": sys.executable}, timeout=60)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr
    assert "journald refused an entry" in proc.stderr and "Connection refused" in proc.stderr
    event = next(line for line in proc.stderr.splitlines() if "neurond fault_detected:" in line)
    assert journal.parse_structured_line(event)["NEUROND_INCIDENT"] == "abc"
    assert "neurond[rank1] ERROR rank 1: Decode failed" in proc.stderr


def test_a_tee_feeds_every_sink_and_keeps_code_fields_right(captured):
    from neurond.observe.events import EventSink, TeeSink

    class Broken(EventSink):
        def observe(self, o):
            raise RuntimeError("metrics backend down")

    broken = Broken()
    emit(TeeSink(broken, journal.JournalSink()), Event.RANK_KILLED, rank=3)
    (entry,) = captured
    assert broken.errors == 1 and entry["NEUROND_RANK"] == 3
    assert entry["CODE_FUNC"].endswith("test_a_tee_feeds_every_sink_and_keeps_code_fields_right")
