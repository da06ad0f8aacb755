"""`neurond status`: the running daemon at a glance, read from its admin socket (GET /admin/status).

It reads the same configuration as the daemon (the TOML file, NEUROND_* variables) to find `admin_socket` and
`admin_token_file`, so it needs read access to the token file: run it as root or as the service user.

Exit codes, for scripts and monitoring:
  0  the daemon answered and the model is healthy
  1  the daemon answered and the model is not serving (loading, repairing, unloaded, stopping)
  2  it cannot ask: no admin API configured, a configuration error, the token file unreadable or refused
  3  no daemon answers on the admin socket (not running, or not yet listening)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from neurond.api.admin_client import AdminClient, AdminRefused, AdminUnavailable
from neurond.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from neurond.lifecycle import LifecycleState
from neurond.observe.progress import from_json, in_progress, rank_text, summary

EXIT_HEALTHY, EXIT_NOT_SERVING, EXIT_CANNOT_ASK, EXIT_UNREACHABLE = 0, 1, 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"TOML file (default {DEFAULT_CONFIG_PATH} if it exists)")
    parser.add_argument("--json", action="store_true", help="print GET /admin/status as it came (one JSON object)")


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(EXIT_CANNOT_ASK, f"configuration error: {exc}")
    if not config.admin_socket or not config.admin_token_file:
        return _fail(EXIT_CANNOT_ASK, "the admin API is not configured: set admin_socket (e.g. "
                     f'"/run/neurond/admin.sock") and admin_token_file in {args.config or DEFAULT_CONFIG_PATH}, '
                     "then restart the daemon")
    try:
        token = Path(config.admin_token_file).read_text().strip()
    except OSError as exc:
        return _fail(EXIT_CANNOT_ASK, f"cannot read admin_token_file {config.admin_token_file}: {exc.strerror} "
                     "(run as root or as the service user)")
    try:
        status = AdminClient(config.admin_socket, token).get("/admin/status")
    except AdminUnavailable as exc:
        return _fail(EXIT_UNREACHABLE, f"no daemon answers on {config.admin_socket} ({exc}); is it running? "
                     "(systemctl status neurond)")
    except AdminRefused as exc:
        return _fail(EXIT_CANNOT_ASK, f"the admin API refused: {exc} (does admin_token_file match the daemon's?)")
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else render(status))
    return EXIT_HEALTHY if status.get("state") == LifecycleState.HEALTHY else EXIT_NOT_SERVING


def _fail(code: int, message: str) -> int:
    print(f"neurond status: {message}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------------------------- rendering
def render(status: dict, now: float | None = None) -> str:
    """A few aligned lines a person reads at a glance (the --json form has every field)."""
    now = time.time() if now is None else now
    state, since = status.get("state", "?"), status.get("state_since")
    rows = [
        ("model", f"{status.get('model')}  tp_size={status.get('tp_size')}"),
        ("uptime", f"{duration(status.get('uptime_s'))} (since {_clock(status.get('started_at'))}, "
                   f"pid {status.get('pid')}, neurond {status.get('version')})"),
        ("incidents", _incidents(status)),
        ("last", _transition(status.get("last_transition"), now)),
        ("ranks", "  ".join(f"{rank}: pid {pid}" for rank, pid in sorted(status.get("pids", {}).items(),
                                                                          key=lambda kv: int(kv[0]))) or "none"),
    ]
    if status.get("spare_pids"):
        rows.append(("spares", "  ".join(f"pid {pid}" for pid in status["spare_pids"])))
    if status.get("zygote_pid"):
        rows.append(("zygote", f"pid {status['zygote_pid']} (ranks are forked from it)"))
    requests = status.get("requests") or {}
    if requests:
        rows.append(("requests", ", ".join(f"{requests.get(k, 0)} {k}" for k in ("completed", "failed", "cancelled"))))
    rows += _loading(status)
    head = f"neurond: {state}{_why(status)} for {duration(now - since) if since else '?'}"
    return "\n".join([head] + [f"  {name:<10} {value}" for name, value in rows])


def _why(status: dict) -> str:
    """' (rank_died on rank 1)': why the model is not healthy, from the cause of the last transition."""
    cause = status.get("last_cause") or {}
    if status.get("state") == LifecycleState.HEALTHY or not cause.get("cause"):
        return ""
    on_rank = f" on rank {cause['rank']}" if cause.get("rank") is not None else ""
    return f" ({cause['cause']}{on_rank})"


def _loading(status: dict) -> list[tuple[str, str]]:
    """The pool's load progress and each rank's, while a load is under way."""
    progress, world = from_json(status.get("load_progress") or {}), status.get("tp_size") or 1
    loading = status.get("state") in (LifecycleState.LOADING, LifecycleState.RELOADING)
    if not loading or not progress or not in_progress(progress, world):
        return []
    return [("loading", summary(progress, world))] + [
        ("", f"rank {rank}: " + rank_text(p.done_bytes, p.total_bytes, p.files_done, p.files_total))
        for rank, p in sorted(progress.items())]


def _incidents(status: dict) -> str:
    text = str(status.get("incidents", 0))
    current = status.get("current_incident")
    return text + (f", one in progress: {current} (journalctl -u neurond NEUROND_INCIDENT={current})"
                   if current else "")


def _transition(t: dict | None, now: float) -> str:
    if not t:
        return "none yet"
    why = ", ".join(x for x in (t.get("cause"), t.get("rung")) if x)
    at = t.get("at")
    when = f", {duration(now - at)} ago ({_clock(at)})" if at else ""
    return f"{t.get('event')}: {t.get('from')} -> {t.get('to')}" + (f" ({why})" if why else "") + when


def duration(seconds: float | None) -> str:
    """'45s', '12m 5s', '3h 2m', '2d 4h'."""
    if seconds is None:
        return "?"
    s = max(0, int(seconds))
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _clock(t: float | None) -> str:
    return "?" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
