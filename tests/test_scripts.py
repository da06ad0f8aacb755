"""scripts/ in CI: every Python script answers --help, ruff sees every one of them, and a few run a tiny CPU smoke.

The scripts are measurements for a GPU box (docs/benchmarks.md). Here the cheap ones run with the smallest
arguments that still take them through their whole path on a CPU, so that a change to what they drive (the
harness in tests/harness, the daemon, the runner) cannot break them unseen; their figures are not checked. Chosen
to cover what the scripts share: the rank bootstrap at TP=2 with both TP implementations (bench-tp), a fault
daemon with its admin API and stamped output (bench-recovery), gpu-prove's stage driver with an HTTP stage
(ckpt, http), and the grammar probe's host loop. The rest (GPU-only, or minutes long on a CPU) run as --help.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.harness.daemon import REPO, TEST_ENV

SCRIPTS = REPO / "scripts"
PYTHON = "#!/usr/bin/env python3"
BASH = "#!/usr/bin/env bash"


def shebang(path: Path) -> str:
    return path.read_text().split("\n", 1)[0]


def python_scripts() -> list[str]:
    return sorted(p.name for p in SCRIPTS.iterdir() if shebang(p) == PYTHON)


def run_script(name: str, *args: str, tmp_path: Path, timeout: float = 240) -> str:
    """Run scripts/NAME to its end (its temporary files under tmp_path; its daemons with the tests' settings:
    no spare workers, one CPU thread per rank); its output. Fails the test unless it exits 0."""
    env = dict(os.environ, TMPDIR=str(tmp_path), **TEST_ENV)
    done = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    assert done.returncode == 0, f"scripts/{name}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_script_is_python_that_ruff_lints_or_bash_that_it_skips():
    """ruff finds scripts/' extensionless programs only through pyproject.toml: all of scripts/ is included, the
    bash scripts are named to be left out. A new script must be one or the other (and a bash one named there)."""
    ruff = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]
    assert "scripts/*" in ruff["extend-include"]
    skipped = {Path(p).name for p in ruff["extend-exclude"] if p.startswith("scripts/")}
    for path in SCRIPTS.iterdir():
        assert shebang(path) in (PYTHON, BASH), f"scripts/{path.name}: neither {PYTHON} nor {BASH}"
        assert (shebang(path) == BASH) == (path.name in skipped), f"scripts/{path.name}: pyproject's extend-exclude"
    assert len(python_scripts()) >= 15


def test_every_python_script_answers_help():
    procs = {name: subprocess.Popen([sys.executable, str(SCRIPTS / name), "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, cwd=REPO)
             for name in python_scripts()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.startswith(f"usage: {name}"), f"scripts/{name} --help:\n{out[-3000:]}"


def test_bench_tp_at_tp2_on_cpu(builtin_model, tmp_path):
    out = run_script("bench-tp", "--tp-size", "2", "--device", "cpu", "--steps", "3", "--model", str(builtin_model),
                     tmp_path=tmp_path)
    assert "| neurond | 2 | cpu |" in out and "| transformers | 2 | cpu |" in out, out
    assert "same greedy tokens on every rank and both implementations: True" in out, out


def test_bench_recovery_one_fault(builtin_model, tmp_path):
    records = tmp_path / "records.json"
    out = run_script("bench-recovery", "--tp-size", "1", "--rank", "0", "--kinds", "raise", "--repeat", "1",
                     "--model", str(builtin_model), "--json", str(records), tmp_path=tmp_path)
    assert "| raise:decode | decode | 0 | 500 rank_failed |" in out, out
    assert "worker processes left: none" in out, out
    (record,) = json.loads(records.read_text())["records"]
    assert record["rung"] == "comm_rebuild" and record["next_status"] == 200, record


def test_gpu_prove_tiny_on_cpu(tmp_path):
    results = tmp_path / "out" / "results.json"
    out = run_script("gpu-prove", "--preset", "tiny", "--device", "cpu", "--dir", str(tmp_path / "tiny"), "--out",
                     str(results.parent), "--stages", "ckpt,http", "--repeat", "1", "--streams", "1",
                     "--max-model-len", "512", tmp_path=tmp_path)
    got = json.loads(results.read_text())
    assert not {"failed", "skipped"} & (set(got["ckpt"]) | set(got["http"])), got
    assert got["http"]["median"]["decode_tok_s"] > 0 and got["http"]["non_streamed"]["completion_tokens"] == 256
    assert "| neurond over HTTP (streamed) |" in out, out


def test_probe_grammar_masks(builtin_model, tmp_path):
    out = run_script("probe-grammar-masks", "--model", str(builtin_model), "--rows", "2", "--steps", "3",
                     "--threads", "1", tmp_path=tmp_path)
    assert "| 1 |" in out, out
