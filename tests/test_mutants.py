"""The mutant catalogue (tests/mutants.py) stays true to the code: every mutant's code is in its file exactly
once, its tests exist, and every promise has mutants. (Running them is scripts/mutants, a pre-merge step.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.mutants import MUTANTS, apply


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_the_mutant_applies_exactly_once(mutant, tmp_path):
    target = tmp_path / mutant.file
    target.parent.mkdir(parents=True)
    target.write_text((REPO / mutant.file).read_text())
    original = apply(mutant, tmp_path)
    assert target.read_text() != original


def test_every_promise_has_mutants_and_names_are_unique():
    assert {m.promise for m in MUTANTS} == {1, 2, 3, 4, 5}
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)


def test_every_named_test_exists():
    ids = sorted({t for m in MUTANTS for t in m.tests})
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-n", "0", *ids], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
