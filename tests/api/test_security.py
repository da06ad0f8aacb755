"""Security (issue 7): the API token comes from a file; the admin API and fault injection are off unless
configured, listen only on a private unix socket, need their own token, and are never reachable over the
network; requests beyond the limits get 413 / 431 / 429 / 503 (body and head sizes: test_validation.py and
test_hostile.py; concurrent requests: test_hostile.py; the queue: here); and no prompt text or token ids
reach the daemon's logs or journal lines, faults included.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from neurond.config import Config, ConfigError, load_config
from neurond.server import Tokens
from tests.conftest import MODEL, REPO, chat_body, http, wait_until
from tests.faults import Admin, wait_ready
from tests.harness.daemon import admin_settings, write_settings, write_token

API_TOKEN = "api-token-7f3c"
ADMIN_TOKEN = "admin-token-91d2"
BEARER = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture(scope="module")
def locked(start_daemon, tmp_path_factory):
    """A daemon with every lock on: API token, admin socket with its own token, fault injection (for the
    log test), and room for one queued request only."""
    tmp = tmp_path_factory.mktemp("locked")
    settings = {"api_token_file": write_token(tmp / "api.token", API_TOKEN), **admin_settings(tmp, ADMIN_TOKEN),
                "fault_injection": True, "max_queued_requests": 1, "step_deadline_floor_s": 1.0,
                "kill_grace_s": 2.0, "unloaded_exit_s": 0}
    conf = write_settings(tmp / "neurond.toml", settings)
    d = start_daemon(1, ["--config", str(conf)])
    d.socket_path = settings["admin_socket"]
    d.admin = Admin(d.socket_path, ADMIN_TOKEN)
    yield d
    d.stop()


def _chat(d, body: dict, token: str | None = API_TOKEN, scheme: str = "Bearer", timeout: float = 120):
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    return d.chat(body, headers=headers, timeout=timeout)


# ---------------------------------------------------------------------------------------------- tokens
def test_tokens_come_from_files_never_from_the_command_line(locked):
    secret_fields = [f.name for f in dataclasses.fields(Config) if "token" in f.name and "tokens" not in f.name]
    assert secret_fields and all(name.endswith("_file") for name in secret_fields), secret_fields
    proc = subprocess.run([sys.executable, "-m", "neurond", "serve", "--api-token", "x"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments: --api-token" in proc.stderr
    for name in ("cmdline", "environ"):
        with open(f"/proc/{locked.proc.pid}/{name}", "rb") as f:
            data = f.read()
        assert API_TOKEN.encode() not in data and ADMIN_TOKEN.encode() not in data


def test_api_token_guards_every_v1_route_and_only_the_exact_token_passes(locked):
    body = chat_body(max_tokens=2)
    for token, scheme in ((None, "Bearer"), ("", "Bearer"), (API_TOKEN, "Basic"), (API_TOKEN[:-1], "Bearer"),
                          (API_TOKEN + "x", "Bearer"), (ADMIN_TOKEN, "Bearer")):
        status, _, err = _chat(locked, body, token, scheme)
        assert (status, err["error"]["code"]) == (401, "invalid_api_key"), (token, scheme)
    assert http("GET", locked.url("/v1/models"))[0] == 401
    completion = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    json_type = {"Content-Type": "application/json"}
    assert http("POST", locked.url("/v1/completions"), completion, json_type)[0] == 401
    assert http("POST", locked.url("/v1/completions"), completion, {**json_type, **BEARER})[0] == 200
    assert _chat(locked, body, API_TOKEN, "bearer")[0] == 200  # the scheme is case-insensitive (RFC 7235)
    assert http("GET", locked.url("/v1/models"), headers=BEARER)[0] == 200
    for probe in ("/health", "/ready"):  # load balancers and systemd probe without a token
        assert locked.get(probe)[0] == 200


def test_api_token_guards_the_metrics_and_the_openapi_description(locked):
    """What the metrics say (model, load, incidents) and the API's description are for the token's holders
    too: a clear 401 without the token, the content with it."""
    for path in ("/metrics", "/openapi.json"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}):
            status, hdrs, err = http("GET", locked.url(path), headers=headers)
            assert (status, err["error"]["code"], err["error"]["type"]) == \
                (401, "invalid_api_key", "authentication_error"), (path, headers, status)
            assert "x-request-id" not in hdrs
    status, _, text = http("GET", locked.url("/metrics"), headers=BEARER)
    assert status == 200 and b"neurond_requests_total" in text
    status, _, spec = http("GET", locked.url("/openapi.json"), headers=BEARER)
    assert status == 200 and spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics", "/openapi.json"):
        assert all(op.get("security") == [{"bearer": []}] for op in spec["paths"][path].values()), path
    for path in ("/health", "/ready"):
        assert all("security" not in op for op in spec["paths"][path].values()), path
    assert http("GET", locked.url("/no/such/path"))[0] == 404  # an unknown path stays a 404


@pytest.mark.parametrize(("mode", "owner", "euid", "says"), [
    (0o600, 1000, 1000, None),  # the service user's own, nobody else's
    (0o400, 1000, 1000, None),
    (0o640, 0, 1000, None),  # root's, the service's group reads it: the package's admin token
    (0o600, 0, 0, None),
    (0o644, 0, 1000, "lets every user read it"),
    (0o604, 1000, 1000, "lets every user read it"),
    (0o640, 1000, 1000, "lets its group read it, and it is not root's"),
    (0o660, 0, 1000, "lets its group write it"),
    (0o602, 1000, 1000, "lets others write it"),
    (0o666, 0, 0, "lets its group and others write it"),
    (0o600, 1234, 1000, "owned by uid 1234"),  # another user's: it could read or replace it
    (0o600, 1234, 0, "owned by uid 1234"),
])
def test_token_file_modes(mode, owner, euid, says):
    from neurond.server import token_file_problem

    problem = token_file_problem(stat.S_IFREG | mode, owner, euid)
    assert (problem is None) if says is None else (problem is not None and says in problem), (oct(mode), problem)
    assert token_file_problem(stat.S_IFDIR | 0o700, euid, euid) == "not a regular file"


def test_token_files_others_could_read_or_change_are_refused(tmp_path):
    """Exit code 2 before anything loads, naming the file and what is wrong with it: an API token at 0644 (the
    umask's default), an admin token another user owns; the same files at 0600 and owned by the user the
    daemon runs as are read."""
    from neurond.server import read_tokens

    api, admin = tmp_path / "api.token", tmp_path / "admin.token"
    api.write_text("api-secret\n")
    admin.write_text("admin-secret\n")
    api.chmod(0o644)
    admin.chmod(0o600)
    settings = {"api_token_file": str(api), "admin_socket": str(tmp_path / "a.sock"), "admin_token_file": str(admin)}
    config = Config(**settings)
    with pytest.raises(ValueError, match=f"api_token_file {api}: mode 0644 lets every user read it"):
        read_tokens(config)
    api.chmod(0o600)
    assert read_tokens(config) == Tokens("api-secret", "admin-secret")
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(admin, 65534, -1)
        with pytest.raises(ValueError, match=f"admin_token_file {admin}: owned by uid 65534"):
            read_tokens(config)
        os.chown(admin, 0, -1)
    api.chmod(0o644)
    t0 = time.monotonic()
    proc = _serve_exit(tmp_path, settings)
    assert proc.returncode == 2 and f"{api}: mode 0644 lets every user read it" in proc.stderr, \
        (proc.returncode, proc.stderr[-2000:])
    assert time.monotonic() - t0 < 30 and not (tmp_path / "a.sock").exists()


def test_ready_says_the_state_and_cause_never_the_detail():
    """/ready needs no token: its 503 names the lifecycle state and the cause, never the cause's detail (a rank's
    exception text, paths): that is for the journal and the admin status (AdminAPI.status: last_cause.detail)."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from neurond.api.app import API
    from neurond.lifecycle import Cause
    from tests.api.fakes import FakeEngine, FakePool

    detail = "RuntimeError: /srv/models/secret-project/model-00002.safetensors: CUDA error at 0x7f3a"
    cause = Cause("rank_failed", incident="i-1", rank=1, detail=detail)
    api = API(SimpleNamespace(name=MODEL), FakeEngine(), FakePool("reloading", cause), max_body_bytes=1000,
              default_max_tokens=8)
    with TestClient(api.app()) as client:
        reply = client.get("/ready")
    assert reply.status_code == 503 and reply.headers["retry-after"]
    assert reply.json() == {"status": "unavailable", "state": "reloading", "cause": "rank_failed",
                            "reason": "rank_failed"}
    assert "secret-project" not in reply.text


# ---------------------------------------------------------------------------------------------- admin API
def _listening(pid: int) -> tuple[set[int], set[str]]:
    """(TCP ports, unix socket paths) the process listens on, from /proc/net: nothing else is bound."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    paths = set()
    with open(f"/proc/{pid}/net/unix") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if len(cols) >= 8 and cols[6] in inodes and int(cols[3], 16) & 0x10000:  # __SO_ACCEPTCON
                paths.add(cols[7])
    return ports, paths


def test_admin_api_is_off_unless_configured(daemon_tp1):
    for method, path in (("GET", "/admin/status"), ("POST", "/admin/faults"), ("POST", "/admin/reload"),
                         ("POST", "/admin/load"), ("POST", "/admin/unload")):
        assert http(method, daemon_tp1.url(path), b"{}")[0] == 404, path
    assert _listening(daemon_tp1.proc.pid) == ({daemon_tp1.port}, set())  # the API port, nothing else


def test_admin_listens_only_on_its_private_unix_socket(locked):
    assert _listening(locked.proc.pid) == ({locked.port}, {locked.socket_path})
    mode = os.stat(locked.socket_path).st_mode
    assert stat.S_ISSOCK(mode) and mode & 0o077 == 0, oct(mode)  # the service user's only
    # Fault injection is on, and still nothing of the admin API answers on the network port.
    for token in (ADMIN_TOKEN, API_TOKEN):
        fault = json.dumps({"rank": 0, "kind": "raise", "phase": "decode"}).encode()
        reply = http("POST", locked.url("/admin/faults"), fault,
                     {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        assert reply[0] == 404, reply


def test_admin_needs_its_own_token(locked):
    no_token = Admin(locked.socket_path).client.get("/admin/status", headers={"Authorization": ""})
    assert no_token.status_code == 401
    assert Admin(locked.socket_path, token=API_TOKEN).client.get("/admin/status").status_code == 401
    assert Admin(locked.socket_path, token=API_TOKEN).inject(0, "raise", "decode").status_code == 401
    assert locked.admin.client.get("/admin/status").status_code == 200


def _serve_exit(tmp_path, settings: dict) -> subprocess.CompletedProcess:
    conf = write_settings(tmp_path / "neurond.toml", settings)
    return subprocess.run([sys.executable, "-m", "neurond", "serve", "--config", str(conf), "--device", "cpu",
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=60)


def test_unsafe_admin_setups_are_refused_at_start(tmp_path):
    """Exit code 2 before anything loads: fault injection without the admin socket, an admin socket without a
    token, one that is not an absolute unix socket path (a "host:port" would silently become a file name), a
    token shared with the public API, an empty token file."""
    with pytest.raises(ConfigError, match="fault_injection needs admin_socket"):
        load_config(None, env={}, overrides={"fault_injection": True})
    with pytest.raises(ConfigError, match="admin_socket needs admin_token_file"):
        load_config(None, env={}, overrides={"admin_socket": "/run/neurond/admin.sock"})
    for where in ("0.0.0.0:9000", "admin.sock"):
        with pytest.raises(ConfigError, match="absolute path of a unix socket"):
            load_config(None, env={}, overrides={"admin_socket": where, "admin_token_file": "/x"})
    shared = tmp_path / "shared.token"
    shared.write_text("same\n")
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    for token in (shared, empty):
        token.chmod(0o600)
    admin = {"admin_socket": str(tmp_path / "a.sock"), "fault_injection": True}
    for settings, says in (({**admin, "admin_token_file": str(shared), "api_token_file": str(shared)},
                            "must differ"),
                           ({**admin, "admin_token_file": str(empty)}, "is empty"),
                           ({**admin, "admin_token_file": str(tmp_path / "missing")}, "No such file")):
        t0 = time.monotonic()
        proc = _serve_exit(tmp_path, settings)
        assert proc.returncode == 2 and says in proc.stderr, (settings, proc.returncode, proc.stderr[-2000:])
        assert time.monotonic() - t0 < 30 and not (tmp_path / "a.sock").exists()


# ---------------------------------------------------------------------------------------------- limits
def test_requests_beyond_the_queue_get_503_with_retry_after(locked):
    """max_queued_requests = 1: one request generating, one waiting; the others are refused at once."""
    long_body = chat_body("a long answer please", max_tokens=1500, temperature=1.0, seed=8)
    results: list = []
    calls = locked.steps(auth=BEARER)
    first = threading.Thread(target=lambda: results.append(_chat(locked, long_body)))
    first.start()
    locked.wait_steps(calls, auth=BEARER)  # generating: it holds the engine; the next one queues, the rest find it full
    more = [threading.Thread(target=lambda: results.append(_chat(locked, chat_body(max_tokens=2))))
            for _ in range(4)]
    for t in more:
        t.start()
    for t in [first, *more]:
        t.join(120)
    refused = [(s, h, b) for s, h, b in results if s != 200]
    assert refused and all(s == 503 and b["error"]["code"] == "server_overloaded" and "retry-after" in h
                           for s, h, b in refused), refused
    assert len(results) - len(refused) >= 2  # the generating one and the queued one


# ---------------------------------------------------------------------------------------------- privacy
def _ended(d) -> int:
    """Generations that ran to their end or were cancelled (admin status `requests`)."""
    counts = d.admin.status()["requests"]
    return counts["completed"] + counts["cancelled"]


def test_no_prompt_text_or_token_ids_in_the_logs_even_on_faults(locked):
    """A unique marker prompt goes through every path that logs: served, streamed, hung up mid-stream,
    refused as invalid, failed by a rank raising, running out of memory and segfaulting (a respawn). Neither
    the marker nor any run of its token ids may appear in the daemon's output (its journal lines included)."""
    from neurond.engine.tokenizer import ChatTokenizer
    from neurond.models.builtin import builtin_dir

    marker = "zq" + os.urandom(6).hex() + "secret"
    prompt = f"My password is {marker}, keep it safe"
    body = chat_body(prompt, max_tokens=8, temperature=0)
    assert _chat(locked, body)[0] == 200
    assert _chat(locked, dict(body, stream=True))[0] == 200
    ended = _ended(locked)
    with socket.create_connection(("127.0.0.1", locked.port), timeout=30) as s:  # hang up mid-stream
        payload = json.dumps(dict(body, stream=True, max_tokens=200)).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {API_TOKEN}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert s.recv(100)
    # The faults below are each blamed on the one request in the failed step (docs/recovery.md); were the hung-up
    # generation still in the batch (a busy box notices the hang-up late), the step would hold two, both would be
    # replayed and the OOM's request would succeed (CI saw exactly that).
    deadline = time.monotonic() + 60
    while _ended(locked) == ended:
        assert time.monotonic() < deadline, "the hung-up generation never ended"
        time.sleep(0.05)
    assert _chat(locked, dict(body, messages=[{"role": "wizard", "content": prompt}]))[0] == 400
    assert _chat(locked, chat_body(prompt * 300))[0] == 400  # over the context window
    # (a segfault interrupts the request, which is replayed after the repair: 200)
    recovered = locked.log().count("NEUROND_EVENT=recovery_finished")
    for kind, phase, want in (("raise", "prefill", 500), ("oom", "decode", 503), ("segfault", "decode", 200)):
        assert locked.admin.inject(0, kind, phase).status_code == 200
        assert _chat(locked, body)[0] == want
        wait_ready(locked)
    assert _chat(locked, body)[0] == 200
    # Every line of the three incidents is written: each ends with its recovery_finished entry.
    wait_until(lambda: locked.log().count("NEUROND_EVENT=recovery_finished") >= recovered + 3, 30,
               "the three recoveries in the log")

    log = locked.log()
    assert log.count("NEUROND_EVENT=fault_detected") >= 3  # the faults were journaled
    assert marker not in log and "My password" not in log
    tokenizer = ChatTokenizer(builtin_dir(locked.log_path.parent))

    def ids(text: str) -> list[int]:
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    full, empty = ids(prompt), ids("")
    head = next(i for i, (a, b) in enumerate(zip(full, empty + [None], strict=False)) if a != b)
    tail = next(i for i, (a, b) in enumerate(zip(reversed(full), reversed([None] + empty), strict=False)) if a != b)
    text_ids = [str(i) for i in full[head:len(full) - tail]]  # the prompt's own tokens, not the template's
    assert len(text_ids) >= 8, text_ids
    for sep in (", ", " ", ","):
        for i in range(len(text_ids) - 3):
            assert sep.join(text_ids[i:i + 4]) not in log, text_ids[i:i + 4]
