"""neurond's entries in the systemd journal: events (`JournalSink`) and log records (`JournalLogHandler`).

Every event becomes one journald entry, sent natively with systemd-python: its fixed MESSAGE_ID
(neurond/observe/catalog.py), PRIORITY by severity, SYSLOG_IDENTIFIER=neurond (the unit's SyslogIdentifier=
covers only stdout/stderr), CODE_FILE/CODE_LINE/CODE_FUNC of the code that caused it, and one uppercase
NEUROND_<NAME> field per event field. The MESSAGE starts with `neurond <event>:` so a plain grep finds it.

Where entries go, decided per entry (journald may come and go):
  - to journald when its socket exists (libsystemd silently drops entries when it does not);
  - also to stderr, as one structured line, unless stderr already is the journal (systemd's JOURNAL_STREAM
    names our stderr), which would store it twice;
  - to stderr when the send fails: a dead journald (stale socket: ECONNREFUSED) must never break serving.
A journald that is alive but stalled can still block the sender, exactly as it blocks stdout logging.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from types import FrameType

from neurond.observe.catalog import MESSAGES, priority_of
from neurond.observe.events import Event, EventSink, Observation
from neurond.observe.progress import rank_text

try:
    from systemd import journal as _journal
except ImportError:  # the [systemd] extra is not installed: stderr only
    _journal = None

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "neurond"
LEVEL_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

_failures = 0  # journald sends that raised (a stale socket); the first one is reported on stderr

# A slow load reports every second per rank: the journal keeps each rank's first and last report and one
# every this many seconds in between (a 10-minute load of 8 ranks: ~500 entries, not ~5000).
LOAD_PROGRESS_EVERY_S = 10.0


# ---------------------------------------------------------------------------------------------- transport
def journal_available() -> bool:
    return _journal is not None and os.path.exists(JOURNAL_SOCKET)


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=<dev>:<inode> of the stream it connected stdout/stderr to."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def write(entry: dict, stderr_line: str) -> bool:
    """Send one entry (journal field -> value); fall back to `stderr_line`. True when journald took it."""
    global _failures
    sent = False
    if journal_available():
        try:
            _journal.sendv(*(f"{k}={v}" if not isinstance(v, bytes) else k.encode() + b"=" + v
                             for k, v in entry.items()))
            sent = True
        except OSError as exc:  # ConnectionRefusedError: journald died and left its socket behind
            _failures += 1
            if _failures == 1:
                _stderr(f"neurond: journald refused an entry ({exc}); writing entries to stderr")
    if not sent or not stderr_is_journal():
        _stderr(stderr_line)
    return sent


def _stderr(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken stderr must not break the caller either
        pass


def structured_line(entry: dict) -> str:
    """One line, `KEY=value` pairs (value JSON-quoted when it has spaces, quotes, '=' or control characters);
    MESSAGE first, so `grep 'neurond fault_detected:'` works on stderr as on the journal."""
    return " ".join(f"{k}={_quote(v)}" for k, v in entry.items())


def _quote(v: object) -> str:
    s = v.decode(errors="replace") if isinstance(v, bytes) else str(v)
    return s if s and re.fullmatch(r"[^\s\"=\\]+", s) else json.dumps(s, ensure_ascii=False)


def parse_structured_line(line: str) -> dict[str, str]:
    """Inverse of structured_line (for tests and tools reading a journald-less daemon's stderr)."""
    out = {}
    for m in re.finditer(r'([A-Z0-9_]+)=("(?:[^"\\]|\\.)*"|\S+)', line):
        out[m.group(1)] = json.loads(m.group(2)) if m.group(2).startswith('"') else m.group(2)
    return out


# ---------------------------------------------------------------------------------------------- code site
_OBSERVE = str(Path(__file__).resolve().parent) + os.sep
_STATEMACHINE = importlib.util.find_spec("statemachine")
_SKIP_DIRS = (_OBSERVE,) + ((os.path.dirname(_STATEMACHINE.origin) + os.sep,)
                            if _STATEMACHINE and _STATEMACHINE.origin else ())
_SKIP_FILES = (str(Path(__file__).resolve().parent.parent / "lifecycle.py"),)  # neurond/lifecycle.py, the machine
# Functions that only pass an event on (the supervisor's _emit and _send, its after_transition listener,
# the pool listener's spawned, the server's startup_failed): CODE_* should name the code that decided, not the relay.
_RELAYS = frozenset({"emit", "_emit", "_send", "after_transition", "spawned", "startup_failed"})


def call_site() -> tuple[str, int, str]:
    """(file, line, function) of the first frame outside the event/lifecycle plumbing."""
    frame: FrameType | None = sys._getframe(1)
    fallback = None
    while frame is not None:
        code = frame.f_code
        name = code.co_filename
        if fallback is None:
            fallback = (name, frame.f_lineno, code.co_qualname)
        if not name.startswith(_SKIP_DIRS) and name not in _SKIP_FILES and code.co_name not in _RELAYS:
            return name, frame.f_lineno, code.co_qualname
        frame = frame.f_back
    return fallback or ("?", 0, "?")


# ---------------------------------------------------------------------------------------------- events
def field_name(name: str) -> str:
    """journald accepts A-Z, 0-9 and _ (no leading _) and silently drops anything else."""
    return "NEUROND_" + re.sub(r"[^A-Z0-9_]", "_", name.upper())


def _said(value: object, default: object = "?") -> object:
    """A fact as a MESSAGE shows it: `default` where the observation does not say it (None or '')."""
    return default if value is None or value == "" else value


def message_text(o: Observation) -> str:
    """The MESSAGE of one event: its stable prefix, what happened, and the incident it belongs to."""
    s = _said
    inc = f" (incident {o.incident})" if o.incident else ""
    text = {
        Event.TRANSITION: lambda: f"{s(o.state_from)} -> {s(o.state_to)} on {s(o.lifecycle_event)}, cause "
                                  f"{s(o.cause)}" + (f", rank {o.rank}" if o.rank is not None else "")
                                  + (f", rung {o.rung}" if o.rung else ""),
        Event.FAULT_DETECTED: lambda: f"{s(o.cause)} on rank {s(o.rank)}"
                                      + (f", request {o.request_id}" if o.request_id else ""),
        Event.ABORT_STARTED: lambda: f"aborting the communicator, attempt {s(o.attempt, 1)}",
        Event.ABORT_FINISHED: lambda: f"communicator aborted in {s(o.duration_ms)} ms",
        Event.ABORT_FAILED: lambda: f"abort not confirmed after {s(o.duration_ms)} ms: {s(o.detail, '')}",
        Event.RANK_KILLED: lambda: f"rank {s(o.rank)} killed with SIGKILL",
        Event.RANK_SPAWNED: lambda: f"rank {s(o.rank)} started as pid {s(o.pid)}",
        Event.COMM_REBUILT: lambda: f"new communicator in {s(o.duration_ms)} ms, weights kept",
        Event.RECOVERY_BACKOFF: lambda: f"waiting {s(o.duration_ms)} ms before attempt {s(o.attempt)}, after "
                                        f"{s(o.cause)}" + (f" on rank {o.rank}" if o.rank is not None else ""),
        Event.RECOVERY_FINISHED: lambda: f"healthy after {s(o.duration_ms)} ms via {s(o.rung)}, attempt "
                                         f"{s(o.attempt, 1)}, {s(o.outcome)}"
                                         + (f" ({o.outcome_why})" if o.outcome_why else ""),
        Event.GAVE_UP: lambda: f"recovery gave up ({s(o.detail, '')}); model unloaded",
        Event.REQUEST_FAILED: lambda: f"request {s(o.request_id)} failed with {s(o.status)} {s(o.cause)}"
                                      + (f" (rank {o.rank})" if o.rank is not None else ""),
        Event.LOAD_PROGRESS: lambda: f"rank {s(o.rank)} loaded "
                                     + rank_text(o.done_bytes, o.total_bytes, o.files_done, o.files_total),
        Event.STARTUP_FAILED: lambda: f"{s(o.cause)}: " + (f"{o.path}: " if o.path else "") + f"{s(o.detail, '')}",
    }[o.event]()
    return f"{MESSAGES[o.event].prefix} {text}{inc}"


def entry_for(o: Observation, site: tuple[str, int, str]) -> dict:
    """The journal fields of one event: one NEUROND_<NAME> per fact it says (None and '' left out)."""
    entry = {
        "MESSAGE": message_text(o),
        "MESSAGE_ID": MESSAGES[o.event].message_id,
        "PRIORITY": priority_of(o),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
        "CODE_FILE": site[0], "CODE_LINE": site[1], "CODE_FUNC": site[2],
        "NEUROND_EVENT": o.event.value,
    }
    for k, v in o.facts().items():
        entry[field_name(k)] = v
    return entry


class JournalSink(EventSink):
    """One journal entry per event, as it is given: the end of an incident carries the verdict the supervisor
    judged (NEUROND_OUTCOME clean | degraded | gave_up, neurond/judgement.py), so one field match finds clean
    recoveries."""

    def __init__(self) -> None:
        self.errors = 0
        self.sent = 0
        self._progress_logged: dict[int | None, float] = {}  # rank -> monotonic time of its last load_progress

    def observe(self, o: Observation) -> None:
        if o.event is Event.LOAD_PROGRESS and not self._progress_due(o):
            return
        entry = entry_for(o, call_site())
        if write(entry, structured_line(entry)):
            self.sent += 1

    def _progress_due(self, o: Observation) -> bool:
        """The first and last report of a rank's load, and one every LOAD_PROGRESS_EVERY_S in between."""
        now = time.monotonic()
        edge = o.files_done in (0, o.files_total)
        if edge or now - self._progress_logged.get(o.rank, float("-inf")) >= LOAD_PROGRESS_EVERY_S:
            self._progress_logged[o.rank] = now
            return True
        return False


# ---------------------------------------------------------------------------------------------- log records
class JournalLogHandler(logging.Handler):
    """Log records as journal entries: PRIORITY from the level, CODE_* from the record (the real call site),
    NEUROND_RANK in rank workers. stderr gets the classic formatted line under the same rule as events."""

    def __init__(self, fmt: str, rank: int | None = None) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(fmt))
        self.rank = rank

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            message = record.getMessage()
            if record.exc_info:
                assert self.formatter is not None  # set in __init__
                message += "\n" + self.formatter.formatException(record.exc_info)
            entry = {
                "MESSAGE": message,
                "PRIORITY": LEVEL_PRIORITY.get(record.levelno, 6),
                "SYSLOG_IDENTIFIER": IDENTIFIER,
                "CODE_FILE": record.pathname, "CODE_LINE": record.lineno, "CODE_FUNC": record.funcName,
                "LOGGER": record.name,
                "THREAD_NAME": record.threadName,
            }
            if self.rank is not None:
                entry["NEUROND_RANK"] = self.rank
            write(entry, line)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def setup_logging(level: str, rank: int | None = None) -> None:
    """Root logging for the leader (rank None) or a rank worker."""
    fmt = "neurond %(levelname)s %(name)s: %(message)s" if rank is None else \
        f"neurond[rank{rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        handlers=[JournalLogHandler(fmt, rank)], force=True)
