"""Start-up errors about the configuration or the model: `neurond serve` exits with code 2 (EXIT_CONFIG, which the
unit's RestartPreventExitStatus=2 keeps systemd from restarting), at once and before any rank starts, with one
`startup_failed` journal entry naming the file and the problem (docs/journal.md).

Each case is a real `neurond serve` process on a broken copy of the built-in model: its files are symlinks to the
session's built-in model, but the one a case breaks. Without a journald the daemon writes the entry to stderr as
one structured line with the same fields, which is what these tests read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neurond.observe.catalog import MESSAGES
from neurond.observe.events import Event
from neurond.observe.journal import parse_structured_line
from neurond.server import EXIT_CONFIG
from tests.conftest import TEST_ENV, free_port

# A failed start must not wait for anything: no rank loads, no breaker. (Through the breaker, unreadable weights
# took 55 s and exited with 4, and systemd restarted the daemon for ever.) Tests give up on a daemon after this.
PROMPT_S = 30


def serve(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[int, dict, str, float]:
    """Run `neurond serve` to its end: (exit code, its one startup_failed entry, its output, seconds it ran)."""
    cmd = [sys.executable, "-m", "neurond", "serve", "--port", str(free_port()), "--device", "cpu", "--tp-size", "1",
           "--cache-dir", str(tmp_path / "cache"), *args]
    environ = {k: v for k, v in os.environ.items() if k != "NEUROND_CONFIG"} | TEST_ENV | (env or {})
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PROMPT_S, env=environ)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"neurond serve still running after {PROMPT_S} s:\n{out[-3000:]}")
    elapsed = time.monotonic() - t0
    out = done.stdout + done.stderr
    entries = [parse_structured_line(line) for line in out.splitlines() if "NEUROND_EVENT=startup_failed" in line]
    assert len(entries) == 1, f"exit {done.returncode}, {len(entries)} startup_failed entries:\n{out[-3000:]}"
    return done.returncode, entries[0], out, elapsed


def assert_refused(tmp_path: Path, args: list[str], cause: str, path: Path, says: str, env: dict | None = None) -> dict:
    code, entry, out, elapsed = serve(tmp_path, *args, env=env)
    assert code == EXIT_CONFIG == 2, out[-3000:]
    assert entry["MESSAGE_ID"] == MESSAGES[Event.STARTUP_FAILED].message_id and entry["PRIORITY"] == "2"
    assert (entry["NEUROND_CAUSE"], entry["NEUROND_PATH"]) == (cause, str(path)), entry
    assert says in entry["NEUROND_DETAIL"], entry
    assert entry["MESSAGE"] == f"neurond startup_failed: {cause}: {path}: {entry['NEUROND_DETAIL']}"
    assert "NEUROND_EVENT=rank_spawned" not in out and "Traceback" not in out, out[-3000:]
    assert elapsed < PROMPT_S
    return entry


@pytest.fixture
def model(builtin_model: Path, tmp_path: Path) -> Path:
    """A copy of the built-in model whose files are symlinks to the real ones: a case replaces what it breaks."""
    copy = tmp_path / "model"
    copy.mkdir()
    for f in builtin_model.iterdir():
        (copy / f.name).symlink_to(f)
    return copy


def replaced(model: Path, name: str, content: bytes | None = None) -> Path:
    """`name` in the copy, no longer a link to the real file: `content`, or nothing at all when None."""
    path = model / name
    path.unlink(missing_ok=True)
    if content is not None:
        path.write_bytes(content)
    return path


def test_malformed_config_json(model, tmp_path):
    path = replaced(model, "config.json", b'{"model_type": "llama", "hidden_size": 128,\n')
    assert_refused(tmp_path, ["--model", str(model)], "model_config", path, "not valid JSON")


def test_config_json_without_what_the_model_needs(model, tmp_path):
    cfg = json.loads((model / "config.json").read_text())
    del cfg["num_attention_heads"]
    path = replaced(model, "config.json", json.dumps(cfg).encode())
    entry = assert_refused(tmp_path, ["--model", str(model)], "model_config", path, "num_attention_heads")
    assert "must be a positive integer, got None" in entry["NEUROND_DETAIL"]


def test_weights_with_a_garbage_header(model, tmp_path):
    path = replaced(model, "model.safetensors", (1 << 40).to_bytes(8, "little") + b"not a header" * 10)
    assert_refused(tmp_path, ["--model", str(model)], "weights", path, f"its header would be {1 << 40} bytes")


def test_truncated_weights(model, tmp_path, builtin_model):
    """A checkpoint copied halfway: the header is whole, the tensors' bytes are not."""
    whole = (builtin_model / "model.safetensors").read_bytes()
    path = replaced(model, "model.safetensors", whole[: len(whole) // 2])
    assert_refused(tmp_path, ["--model", str(model)], "weights", path, "are not within the file's")


def test_weights_that_cannot_be_read(model, tmp_path):
    """Root reads every file whatever its mode, so the unreadable files are a directory and a dangling link."""
    path = replaced(model, "model.safetensors")
    path.mkdir()
    assert_refused(tmp_path, ["--model", str(model)], "weights", path, "cannot be read: Is a directory")
    path.rmdir()
    path.symlink_to(tmp_path / "gone.safetensors")
    assert_refused(tmp_path, ["--model", str(model)], "weights", path, "cannot be read: No such file or directory")


def test_missing_tokenizer(model, tmp_path):
    path = replaced(model, "tokenizer.json")
    assert_refused(tmp_path, ["--model", str(model)], "tokenizer", path, "missing")


def test_missing_model_directory(tmp_path):
    path = tmp_path / "no-such-model"
    assert_refused(tmp_path, ["--model", str(path)], "model_dir", path, "no such directory")
    path.mkdir()  # a directory, but no checkpoint in it
    assert_refused(tmp_path, ["--model", str(path)], "model_dir", path, "no config.json")


def test_malformed_configuration_file(tmp_path):
    conf = tmp_path / "neurond.toml"
    conf.write_text("tp_size = 2\nno_such_setting = 1\n")
    assert_refused(tmp_path, ["--config", str(conf)], "config", conf, "unknown setting 'no_such_setting'")


def test_missing_token_file(tmp_path):
    path = tmp_path / "api.token"
    assert_refused(tmp_path, [], "token_file", path, "No such file or directory", {"NEUROND_API_TOKEN_FILE": str(path)})


def test_built_in_model_that_cannot_be_written(tmp_path):
    """The cache directory is a file: the built-in model cannot be written there."""
    cache = tmp_path / "cache"
    cache.write_text("")
    assert_refused(tmp_path, [], "builtin_model", cache, "writing the built-in model failed")
