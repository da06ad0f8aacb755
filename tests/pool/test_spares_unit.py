"""SpareWorkers' choice of a spare, without processes: one whose imports are done goes first."""

from __future__ import annotations

from neurond.pool import spares as spares_module
from neurond.pool.launcher import Launcher
from neurond.pool.spares import SpareWorkers

ENV = (("A", "1"),)


class FakeProcess:
    def __init__(self) -> None:
        self.returncode = None

    def poll(self):
        return self.returncode


class FakeSpare:
    started = 0

    def __init__(self) -> None:
        FakeSpare.started += 1
        self.pid = FakeSpare.started
        self.process = FakeProcess()
        self.imported = False

    def close(self) -> None:
        pass


def _spares(monkeypatch, count: int) -> SpareWorkers:
    monkeypatch.setattr(spares_module.RankProcess, "spare", staticmethod(lambda env, launcher: FakeSpare()))
    s = SpareWorkers(count, ENV, Launcher())
    s.fill()
    return s


def test_an_imported_spare_goes_before_an_older_one_still_importing(monkeypatch):
    s = _spares(monkeypatch, 2)
    older, newer = s._idle
    newer.imported = True
    assert s.ready() == 1
    assert s.take(ENV) is newer
    assert s._idle[0] is older and len(s._idle) == 2  # refilled


def test_the_oldest_goes_when_none_is_imported_and_dead_ones_are_skipped(monkeypatch):
    s = _spares(monkeypatch, 3)
    first, second, _third = s._idle
    first.process.returncode = -9
    assert s.take(ENV) is second
    assert first not in s._idle and len(s._idle) == 3


def test_no_spare_for_another_environment(monkeypatch):
    s = _spares(monkeypatch, 1)
    assert s.take((("A", "2"),)) is None
    assert len(s._idle) == 1
