"""The documentation stays true to the code: its generated parts are current (options, metrics, journal
events, endpoints), every route, error code and journal event is documented, and every shell command in the
docs is either run by a test it names or says, next to it, that it is not run."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from neurond import docgen
from neurond.api.openapi import openapi_spec
from neurond.config import Config
from neurond.observe.catalog import MESSAGES
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
GUIDE, RUNBOOK, API = (REPO / "docs" / name for name in ("operator-guide.md", "runbook.md", "api.md"))
SHELL = ("sh", "bash", "shell", "console")
INTERPRETERS = ("bash", "sh", "python", "python3", "python3.11")
RUN_HERE = "tests/test_docs.py"  # blocks marked as run by this file are run below, as written


# ---------------------------------------------------------------------------------------------- generated parts
def test_generated_parts_are_current():
    for doc in DOCS:
        text = doc.read_text()
        assert docgen.render(text) == text, f"{doc} is stale: run python -m neurond.docgen"
    assert docgen.parts_in(GUIDE.read_text()) == ["options", "metrics"]
    assert docgen.parts_in(RUNBOOK.read_text()) == ["events"]
    assert docgen.parts_in(API.read_text()) == ["endpoints"]


def test_docgen_check_fails_on_a_stale_part(tmp_path, monkeypatch):
    (tmp_path / "x.md").write_text("<!-- generated: options -->\nold\n<!-- end generated: options -->\n")
    monkeypatch.setattr(docgen, "DOCS", tmp_path)
    assert docgen.main(["--check"]) == 1
    assert docgen.main([]) == 0 and docgen.main(["--check"]) == 0
    assert "| `tp_size` | `1` | `--tp-size` | `NEUROND_TP_SIZE` |" in (tmp_path / "x.md").read_text()


def test_guide_lists_every_setting_and_runbook_every_event():
    guide, runbook = GUIDE.read_text(), RUNBOOK.read_text()
    for name in Config.__dataclass_fields__:
        assert f"| `{name}` |" in guide, name
    for m in MESSAGES.values():
        assert f"### `{m.event.value}`\n\n- MESSAGE_ID `{m.message_id}`" in runbook, m.event


# ---------------------------------------------------------------------------------------------- the API reference
def _routes(path: Path) -> list[tuple[str, str]]:
    return [(m, p) for p, m in re.findall(r'Route\("([^"]+)", self\.\w+, methods=\["(\w+)"\]\)', path.read_text())]


def test_api_reference_has_every_route_and_response():
    text = API.read_text()
    routes = _routes(REPO / "neurond/api/app.py") + _routes(REPO / "neurond/api/admin.py")
    assert len(routes) >= 10
    for method, path in routes:
        assert f"`{method} {path}`" in text, (method, path)
    for path, operations in openapi_spec("m", True)["paths"].items():
        assert (path.startswith("/admin") or any(p == path for _, p in routes)), f"{path} in the spec, not routed"
        for method, op in operations.items():
            row = next(line for line in text.splitlines() if line.startswith(f"| `{method.upper()} {path}` |"))
            for status in op["responses"]:
                assert f"{status}: " in row, (path, status)


def _error_codes() -> dict[str, int | None]:
    """code -> status of every error neurond answers, found in the code that raises it."""
    codes: dict[str, int | None] = {}
    for path in (REPO / "neurond/api").glob("*.py"):
        for status, code in re.findall(r'APIError\(\s*(\d{3}),(?:(?!APIError\().)*?code="([a-z_]+)"',
                                       path.read_text(), re.S):
            codes[code] = int(status)
    engine = "".join(p.read_text() for p in (REPO / "neurond/engine").glob("*.py"))
    for status, code in re.findall(r'Failed\((\d{3}), "([a-z_]+)"', engine):
        codes[code] = int(status)
    from neurond.engine.blame import FAULT_STATUS

    codes.update(FAULT_STATUS)
    return codes


def test_api_reference_has_every_error_code_with_its_status():
    lines = API.read_text().splitlines()
    codes = _error_codes()
    assert {"model_not_found", "rank_timeout", "conflict", "shutting_down"} <= codes.keys()
    for code, status in codes.items():
        assert any(f"`{code}`" in line and str(status) in line for line in lines), (code, status)


# ---------------------------------------------------------------------------------------------- shell commands
@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    text: str
    marker: str  # the line before the fence

    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    out, lines, i = [], doc.read_text().splitlines(), 0
    while i < len(lines):
        m = re.fullmatch(r"```(\w*)\s*", lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        out.append(Block(doc, i + 1, m.group(1), "\n".join(lines[i + 1:end]), before.strip()))
        i = end + 1
    return out


def commands(text: str) -> list[list[str]]:
    """Each simple command of a block as words: continuation lines joined, comments dropped, split at
    |, &&, ||, ; and &."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        current: list[str] = []
        for token in lexer:
            if token in ("|", "&&", "||", ";", "&"):
                out.append(current)
                current = []
            else:
                current.append(token)
        out.append(current)
    return [c for c in out if c]


def words(command: list[str]) -> tuple[str, str | None]:
    """(program, subcommand) of a command: the script for `bash x` / `sh x.sh`, the word after it if it is one."""
    args = [a for a in command if not re.fullmatch(r"[A-Z_]+=.*", a)]
    if args and args[0] == "sudo":
        args = args[1:]
    program = os.path.basename(args[0])
    if program in INTERPRETERS and len(args) > 1 and not args[1].startswith("-"):
        args = args[1:]
        program = Path(args[0]).stem
    sub = args[1] if len(args) > 1 and re.fullmatch(r"[a-z][a-z-]*", args[1]) else None
    return program, sub


_LOOKS_LIKE_A_COMMAND = re.compile(r"(sudo |[A-Z_]+=\S+ )*(systemctl|journalctl|dpkg|apt(-get)?|curl|bash|sh|pip|"
                                   r"python3?(\.\d+)?|\.venv/\S+|scripts/\S+)( |$)")


def _all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc)]


def test_every_shell_block_is_run_by_a_test_or_says_it_is_not():
    shell = [b for b in _all_blocks() if b.lang in SHELL]
    assert len(shell) >= 15
    for block in _all_blocks():
        if block.lang == "":
            first = block.text.splitlines()[0] if block.text else ""
            assert not _LOOKS_LIKE_A_COMMAND.match(first), f"{block.where()}: commands belong in a ```sh block"
    for block in shell:
        run = re.fullmatch(r"\*Run by (.+?)\.\*", block.marker)
        skipped = re.fullmatch(r"\*Not run by the tests\b[ :]*(.*?)\.?\*", block.marker)
        assert run or (skipped and len(skipped.group(1)) > 10), \
            f"{block.where()}: say above the block which test runs it (*Run by tests/x.py.*) or why none does " \
            f"(*Not run by the tests: why.*), not {block.marker!r}"
        if not run or run.group(1) == RUN_HERE:  # those are run as written by test_blocks_run_here_succeed
            continue
        files = [REPO / f.strip() for f in re.split(r",| and ", run.group(1)) if f.strip()]
        assert all(f.is_file() for f in files), f"{block.where()}: {files}"
        source = "".join(f.read_text() for f in files)
        for command in commands(block.text):
            program, sub = words(command)
            missing = [w for w in (program, sub) if w and w not in source]
            assert not missing, f"{block.where()}: {' '.join(command)!r}: {missing} appear in none of {run.group(1)}"


def test_every_documented_neurond_command_parses():
    """Run or not, a documented `neurond` command names a subcommand and options that exist."""
    from neurond.cli import _parser

    seen = 0
    for block in _all_blocks():
        if block.lang not in SHELL:
            continue
        for command in commands(block.text):
            args = [a for a in command if not re.fullmatch(r"[A-Z_]+=.*", a) and a != "sudo"]
            if os.path.basename(args[0]) != "neurond":
                continue
            seen += 1
            try:
                _parser().parse_args(args[1:])
            except SystemExit as exc:
                assert exc.code == 0, f"{block.where()}: {' '.join(command)!r} does not parse"
    assert seen >= 10


def test_blocks_run_here_succeed(tmp_path):
    """The blocks marked as run by this file, run as written, with `neurond` being this checkout's."""
    shim = tmp_path / "neurond"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m neurond "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", PYTHONPATH=str(REPO))
    ran = 0
    for block in _all_blocks():
        if block.lang in SHELL and block.marker == f"*Run by {RUN_HERE}.*":
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], capture_output=True, text=True,
                                  cwd=REPO, env=env, timeout=120)
            assert proc.returncode == 0 and proc.stdout, f"{block.where()}: {proc.stderr[-2000:]}"
            ran += 1
    assert ran >= 1


@pytest.mark.parametrize("text, expected", [
    ("bash packaging/build-deb --version 1  # x", [(("build-deb", None))]),
    ("sudo neurond status --json | jq .state && FOO=1 sh journal-queries/mttr.sh -u neurond",
     [("neurond", "status"), ("jq", None), ("mttr", None)]),
    ("curl -s x \\\n  -d '{\"a\": 1}'", [("curl", None)]),
])
def test_command_words(text, expected):
    assert [words(c) for c in commands(text)] == expected
