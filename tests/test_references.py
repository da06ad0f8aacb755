"""What the code's prose names exists: every file a docstring or comment in neurond/ names (`pool/ladder.py`,
`docs/recovery.md`, `tests/...`, `scripts/test`, a module of the same package), and every module, file and
`Class.member` docs/architecture.md names. A file moved or renamed fails here until the prose follows it."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

NEUROND = REPO / "neurond"
ARCHITECTURE = REPO / "docs" / "architecture.md"

# A path with a directory: ends in one of these, or starts with one of the repository's top-level directories.
_PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w-]+\.(?:py|md|sh|service|catalog|sysusers|tmpfiles|toml))\b"
                   r"|(?<![\w./-])((?:scripts|packaging|systemd|journal-queries|docs|tests|\.ci)/[\w./-]*\w)")
# A module or document named without its directory: `scheduler.py` (of the same package), `recovery.md` (docs/).
_BARE = re.compile(r"(?<![\w./-])([a-z_][\w-]*\.(?:py|md))\b")
# Files named in neurond/ that are not the repository's: (file that names it, the path), and why.
NOT_OURS = {
    ("neurond/worker/zygote.py", "_inductor/runtime/benchmarking.py"): "torch's",
}


def prose(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    source = path.read_text()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                yield node.body[0].lineno, doc


def named_files(text: str) -> Iterator[tuple[str, bool]]:
    """(path, whether it was named with a directory) for every file `text` names (PREFIX/...: a placeholder)."""
    for m in _PATH.finditer(text):
        name = (m.group(1) or m.group(2)).rstrip(".")
        if not name.split("/")[0].isupper():
            yield name, True
    for m in _BARE.finditer(text):
        yield m.group(1), False


def found(name: str, with_dir: bool, here: Path) -> bool:
    """`name` is a file or directory of the repository: from its root, from neurond/, or (named without a
    directory) beside `here`; a document also in docs/."""
    places = [REPO, NEUROND] if with_dir else [here]
    if name.endswith(".md"):
        places.append(REPO / "docs")
    return any((place / name).exists() for place in places)


def _sources() -> list[Path]:
    return sorted(NEUROND.rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_file_named_in_the_code_exists(path):
    rel = str(path.relative_to(REPO))
    missing = sorted({f"{rel}:{line}: {name}" for line, text in prose(path) for name, with_dir in named_files(text)
                      if (rel, name) not in NOT_OURS and not found(name, with_dir, path.parent)})
    assert missing == []


def test_the_references_are_found():
    """The patterns find what they must and leave alone what is not a file of the repository."""
    text = ("pool/ladder.py, `engine/blocks.py`; docs/recovery.md, (docs/chaos.md) and recovery.md; scripts/test; "
            "tests/engine/fakes.py::FakeSupervisor; scheduler.py. Not: /etc/neurond/neurond.toml, q/k/v, "
            "PREFIX/lib/sysusers.d/neurond.conf, "
            "config.json, https://example.com/a/b.py")
    assert sorted(named_files(text)) == sorted([
        ("pool/ladder.py", True), ("engine/blocks.py", True), ("docs/recovery.md", True), ("docs/chaos.md", True),
        ("recovery.md", False), ("scripts/test", True), ("tests/engine/fakes.py", True), ("scheduler.py", False)])
    assert found("pool/ladder.py", True, NEUROND / "engine") and found("scheduler.py", False, NEUROND / "engine")
    assert not found("scheduler.py", False, NEUROND / "pool") and not found("pool/lifecycle.py", True, NEUROND)


# ---------------------------------------------------------------------------------------------- architecture.md
def _classes() -> dict[str, list[tuple[ast.ClassDef, Path]]]:
    out: dict[str, list[tuple[ast.ClassDef, Path]]] = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, []).append((node, path))
    return out


def _members(cls: ast.ClassDef) -> set[str]:
    """What a class defines: its methods, class-level names and the attributes its methods assign to self."""
    names: set[str] = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
    return names


def test_architecture_names_only_modules_and_files_that_exist():
    text = ARCHITECTURE.read_text()
    missing = [name for name, with_dir in named_files(text)
               if not (found(name, True, NEUROND) if with_dir else
                       name.endswith(".md") and (REPO / "docs" / name).exists() or any(NEUROND.rglob(name)))]
    for module in re.findall(r"\bneurond(?:\.\w+)+", text):
        parts = module.split(".")
        if not (REPO.joinpath(*parts).with_suffix(".py").exists() or (REPO.joinpath(*parts) / "__init__.py").exists()):
            missing.append(module)
    assert missing == []


def test_architecture_names_only_class_members_that_exist():
    classes = _classes()
    missing = []
    for cls, member in re.findall(r"`([A-Z]\w+)\.([a-z_]\w*)`", ARCHITECTURE.read_text()):
        if not any(member in _members(node) for node, _ in classes.get(cls, [])):
            missing.append(f"{cls}.{member}")
    assert missing == []
