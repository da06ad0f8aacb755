"""Helpers for fault-injection tests: a daemon with the admin API on a unix socket, and its client."""

from __future__ import annotations

import time

import httpx

from tests.conftest import chat_body

TOKEN = "test-admin-token"


# Fault daemons' settings (short deadlines, a breaker that never opens), unless a test overrides them.
FAULT_SETTINGS = {
    "fault_injection": True,
    "step_deadline_floor_s": 1.0,
    "step_deadline_ceiling_s": 20.0,
    "abort_timeout_s": 2.0,
    "kill_grace_s": 2.0,
    "breaker_max_failures": 1000,
    "unloaded_exit_s": 0.0,
    "load_timeout_s": 20.0,
    "load_stall_timeout_s": 8.0,
}


def fault_daemon(start_daemon, tmp_path, tp_size: int, env: dict | None = None, extra: list[str] | None = None,
                 **settings):
    token = tmp_path / "admin.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)  # neurond refuses a token file others may read
    values = {
        "admin_socket": str(tmp_path / "admin.sock"),
        "admin_token_file": str(token),
        **FAULT_SETTINGS,
        **settings,
    }
    conf = tmp_path / "neurond.toml"
    conf.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in values.items()))
    d = start_daemon(tp_size, ["--config", str(conf), *(extra or [])], **({"env": env} if env else {}))
    d.admin = Admin(values["admin_socket"])
    # Warm up so the step deadline has observations (before any, it is the ceiling).
    status, _, body = d.chat(chat_body(max_tokens=8, temperature=0))
    assert status == 200, f"warm-up request: {status} {body}\n{d.log()[-3000:]}"
    return d


def journal(d, event: str) -> list[dict[str, str]]:
    """The daemon's journal entries of `event` so far, oldest first, as fields (read from its stderr log, where
    it writes each entry as one line of the same fields)."""
    from neurond.observe.journal import parse_structured_line

    marker = f"NEUROND_EVENT={event} "
    return [parse_structured_line(line) for line in d.log().splitlines() if marker in line + " "]


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)


class Admin:
    def __init__(self, socket_path: str, token: str = TOKEN) -> None:
        self.socket_path = socket_path
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://admin",
                                   headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def inject(self, rank: int, kind: str, phase: str, count: int = 1, after: int = 0) -> httpx.Response:
        return self.client.post("/admin/faults", json={"rank": rank, "kind": kind, "phase": phase, "count": count,
                                                       "after": after})

    def status(self) -> dict:
        return self.client.get("/admin/status").json()


def wait_ready(d, want: int = 200, timeout: float = 90) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if d.get("/ready", timeout=2)[0] == want:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"/ready never returned {want}:\n{d.log()[-4000:]}")
