"""Helpers for fault-injection tests: a daemon with the admin API on a unix socket, and its client."""

from __future__ import annotations

from tests.harness.daemon import Admin as _Admin, admin_settings, chat_body, write_settings

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
    values = {**admin_settings(tmp_path, TOKEN), **FAULT_SETTINGS, **settings}
    conf = write_settings(tmp_path / "neurond.toml", values)
    d = start_daemon(tp_size, ["--config", str(conf), *(extra or [])], **({"env": env} if env else {}))
    d.admin = Admin(values["admin_socket"])
    # Warm up so the step deadline has observations (before any, it is the ceiling).
    status, _, body = d.chat(chat_body(max_tokens=8, temperature=0))
    assert status == 200, f"warm-up request: {status} {body}\n{d.log()[-3000:]}"
    return d


class Admin(_Admin):
    """The fault daemons' admin API (tests.harness.daemon.Admin), with their token unless told another."""

    def __init__(self, socket_path: str, token: str = TOKEN) -> None:
        super().__init__(socket_path, token)


def wait_ready(d, want: int | set[int] = 200, timeout: float = 90) -> float:
    """Wait until /ready answers `want` again (after a fault: the repair's end, or a state it passes)."""
    return d.wait_ready(timeout, want, poll=0.05)
