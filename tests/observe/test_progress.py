"""Load progress from the worker's loader to its readers: load_shard reports as files finish (rate-limited, first
and last always), the journal keeps each rank's first and last report and one per interval, STATUS= shows the
pool's progress only while a load is under way, and the texts say the same everywhere."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from neurond.observe import journal
from neurond.observe.events import Event, emit
from neurond.observe.notify import LifecycleStatus, Notifier
from neurond.observe.progress import human_bytes, in_progress, rank_text, summary
from neurond.protocol import LoadProgress

GIB = 1024**3


def test_texts():
    assert (human_bytes(0), human_bytes(1536), human_bytes(16 * GIB + GIB // 10)) == ("0 B", "1.5 KiB", "16.1 GiB")
    assert rank_text(GIB, 4 * GIB, 1, 4) == "1.0 GiB of 4.0 GiB (25%), 1/4 files"
    assert rank_text(None, None, None, None) == "? of ? (?), ?/? files"
    progress = {0: LoadProgress(0, 2 * GIB, 4 * GIB, 2, 4), 1: LoadProgress(1, 0, 4 * GIB, 0, 4)}
    assert summary(progress, 3) == "loaded 2.0 GiB of 8.0 GiB (25%): rank 0 50%, rank 1 0%, rank 2 starting"
    assert in_progress(progress, 2) and in_progress({0: LoadProgress(0, 1, 1, 1, 1)}, 2)
    assert not in_progress({0: LoadProgress(0, 1, 1, 1, 1), 1: LoadProgress(1, 1, 1, 1, 1)}, 2)


@pytest.fixture
def captured(monkeypatch):
    entries: list[dict] = []
    monkeypatch.setattr(journal, "write", lambda entry, line: entries.append(entry) or True)
    return entries


def test_journal_keeps_first_last_and_one_per_interval(captured, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(journal.time, "monotonic", lambda: clock[0])
    sink = journal.JournalSink()

    def report(rank, files_done, at):
        clock[0] = at
        emit(sink, Event.LOAD_PROGRESS, rank=rank, done_bytes=files_done * GIB, total_bytes=10 * GIB,
             files_done=files_done, files_total=10)

    report(0, 0, 1000.0)  # first: kept
    report(1, 0, 1000.0)  # another rank's first: kept
    report(0, 1, 1001.0)  # 1 s later: dropped
    report(0, 2, 1009.0)  # 9 s after the last kept one: dropped
    report(0, 3, 1010.5)  # 10.5 s: kept
    report(0, 4, 1011.0)  # dropped
    report(0, 10, 1011.5)  # last: kept
    kept = [(e["NEUROND_RANK"], e["NEUROND_FILES_DONE"]) for e in captured]
    assert kept == [(0, 0), (1, 0), (0, 3), (0, 10)]
    last = captured[-1]
    assert last["MESSAGE"] == "neurond load_progress: rank 0 loaded 10.0 GiB of 10.0 GiB (100%), 10/10 files"
    assert last["MESSAGE_ID"] == "ea493c1d73014a738199268f50e1bd0d" and last["PRIORITY"] == 6
    assert last["NEUROND_TOTAL_BYTES"] == 10 * GIB


def test_status_line_shows_progress_only_while_loading():
    sent: list[str] = []
    notifier = Notifier({})
    notifier.status = sent.append  # what would go to systemd as STATUS=
    status = LifecycleStatus(notifier, "m", 2)
    progress = {0: LoadProgress(0, GIB, 2 * GIB, 1, 2)}
    status.source = SimpleNamespace(incidents=0, load_progress=progress)
    emit(status, Event.LOAD_PROGRESS, rank=0)
    assert sent == ["loading: m, tp_size=2, incidents=0; loaded 1.0 GiB of 2.0 GiB (50%): rank 0 50%, rank 1 starting"]
    progress.update({0: LoadProgress(0, 2 * GIB, 2 * GIB, 2, 2), 1: LoadProgress(1, 2 * GIB, 2 * GIB, 2, 2)})
    assert status.line() == "loading: m, tp_size=2, incidents=0"  # loaded: nothing left to show
    status.state, progress[1] = "healthy", LoadProgress(1, 0, 2 * GIB, 0, 2)
    assert status.line() == "healthy: m, tp_size=2, incidents=0"
    emit(status, Event.RANK_SPAWNED, rank=0)  # other events leave STATUS= to the transitions
    assert len(sent) == 1


def test_load_shard_reports_as_bytes_arrive_and_only_then(tmp_path_factory, monkeypatch):
    """The leader takes a loading rank's silence as a stalled load (load_stall_timeout_s): reports come while
    bytes arrive and as files finish, and never repeat themselves (a stuck read must look silent)."""
    from neurond.models.shaped import shaped_preset, write_shaped_checkpoint
    from neurond.worker import loader, tp

    model = tmp_path_factory.mktemp("tiny")
    write_shaped_checkpoint(model, shaped_preset("tiny"))
    files = sorted(model.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    assert len(files) > 2

    def load(interval: float) -> list[tuple[int, int, int, int]]:
        calls = []
        monkeypatch.setattr(loader, "PROGRESS_INTERVAL_S", interval)
        loader.load_shard(str(model), "cpu", "auto", 0, 1, tp.CollectiveGuard(), lambda *c: calls.append(c))
        return calls

    for interval in (0.0, 3600.0):
        reports = load(interval)
        assert reports[0] == (0, total, 0, len(files)) and reports[-1] == (total, total, len(files), len(files))
        assert all(a != b for a, b in itertools.pairwise(reports)), "a report that repeats the last one"
        assert [c[0] for c in reports] == sorted(c[0] for c in reports)
        assert [c[2] for c in reports] == sorted(c[2] for c in reports)
        assert all(c[0] <= total for c in reports)
    # Without the interval's wake-ups a report comes only as files finish: at most one per file, plus the first.
    assert len(load(3600.0)) <= len(files) + 1


def test_the_journal_gets_a_load_at_its_start_its_files_and_its_end_not_every_report():
    import asyncio

    from neurond.config import Config
    from neurond.pool.supervisor import Supervisor
    from tests.engine.fakes import Recorder

    async def scenario() -> list[tuple[int, int]]:
        sink = Recorder()
        sup = Supervisor(Config(spare_workers=0), "/nonexistent", 4096, events=sink)
        for counts in [(0, 2 * GIB, 0, 2), (GIB // 2, 2 * GIB, 0, 2), (GIB, 2 * GIB, 1, 2), (GIB + 1, 2 * GIB, 1, 2),
                       (2 * GIB, 2 * GIB, 2, 2), (2 * GIB, 2 * GIB, 2, 2), (2 * GIB, 2 * GIB, 2, 2),
                       (0, 2 * GIB, 0, 2)]:  # ... bytes within files, the warm-up's repeats, then a new load
            sup.progress(LoadProgress(0, *counts))
        return [(o.done_bytes, o.files_done) for o in sink.seen if o.event is Event.LOAD_PROGRESS]

    assert asyncio.run(scenario()) == [(0, 0), (GIB, 1), (2 * GIB, 2), (0, 0)]
