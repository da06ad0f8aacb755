"""The message catalog: generated from neurond/observe/catalog.py, valid for journalctl (the CI syntax check),
and what `journalctl -x` shows next to a neurond entry, with the entry's fields filled in."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from neurond.observe.catalog import MESSAGES, render_catalog
from neurond.observe.events import Event, Observation
from neurond.observe.journal import entry_for
from tests.conftest import REPO
from tests.observe.journald import need_journal_remote, need_private_journald, write_journal_file

CATALOG = REPO / "systemd" / "neurond.catalog"


def _root(tmp_path: Path, text: str) -> Path:
    root = tmp_path / "root"
    (root / "usr/lib/systemd/catalog").mkdir(parents=True, exist_ok=True)
    (root / "usr/lib/systemd/catalog/neurond.catalog").write_text(text)
    return root


def _update(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["journalctl", f"--root={root}", "--update-catalog"], capture_output=True, text=True)


@pytest.fixture(autouse=True)
def _journalctl():
    if shutil.which("journalctl") is None:
        pytest.skip("journalctl not installed")


def test_catalog_file_is_generated_from_the_code():
    assert CATALOG.read_text() == render_catalog(), "run: python -m neurond.observe.catalog > systemd/neurond.catalog"


def test_catalog_syntax_is_valid_and_covers_every_event(tmp_path):
    root = _root(tmp_path, CATALOG.read_text())
    proc = _update(root)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    listed = subprocess.run(["journalctl", f"--root={root}", "--list-catalog"], capture_output=True, text=True).stdout
    assert {line.split()[0] for line in listed.splitlines()} == {m.message_id for m in MESSAGES.values()}
    broken = _update(_root(tmp_path / "broken", "stray text\n" + CATALOG.read_text()))
    assert broken.returncode != 0  # the check does catch a malformed catalog


def test_journalctl_x_explains_an_entry_with_its_fields(tmp_path):
    need_journal_remote()
    root = _root(tmp_path, CATALOG.read_text())
    assert _update(root).returncode == 0
    entry = entry_for(Observation(Event.GAVE_UP, incident="feed1234", cause="breaker_open", rank=1, rung="give_up",
                                  attempt=5, detail="5 recoveries within 600s"), ("x.py", 1, "f"))
    entry.update(__REALTIME_TIMESTAMP=1_700_000_000_000_000, _HOSTNAME="gpu-7")
    (root / "var/log/journal/0123456789abcdef0123456789abcdef").mkdir(parents=True)
    write_journal_file(root / "var/log/journal/0123456789abcdef0123456789abcdef/system.journal", [entry])
    # journalctl -x reads the catalog database of the host it runs on (also with --root or --directory), so
    # it runs in a mount namespace where the database built above is the host's.
    need_private_journald()
    script = (f"mount --bind {root}/var/lib/systemd/catalog/database /var/lib/systemd/catalog/database && "
              f"journalctl -x --no-pager -q --directory={root}/var/log/journal/0123456789abcdef0123456789abcdef")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                          text=True)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "neurond gave_up: recovery gave up (5 recoveries within 600s); model unloaded (incident feed1234)" in out
    assert "Subject: neurond gave up recovering and unloaded the model: 5 recoveries within 600s" in out
    assert "journalctl -u neurond NEUROND_INCIDENT=feed1234" in out and "Defined-By: neurond" in out


def test_docs_journal_runbook_covers_every_event():
    doc = (REPO / "docs" / "journal.md").read_text()
    for m in MESSAGES.values():
        assert m.message_id in doc and f"`{m.event.value}`" in doc, m.event
