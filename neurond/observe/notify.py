"""sd_notify for a Type=notify unit: READY, STATUS, WATCHDOG, RELOADING and STOPPING.

The protocol is one datagram of `KEY=value` lines to the AF_UNIX socket named by $NOTIFY_SOCKET ('@' for
the abstract namespace). It is written here rather than with systemd-python's `daemon.notify` so that it
works without the [systemd] extra and so that every failure mode is one caught OSError: no NOTIFY_SOCKET
(not started by systemd: every call is a no-op), or a dangling one (ENOENT, ECONNREFUSED: logged once, then
ignored; serving never depends on systemd hearing us).

The variables are taken out of the environment at start, as sd_notify's unset_environment does, so rank
workers never inherit them: with NotifyAccess=main systemd would reject their messages anyway, and a worker
pinging the watchdog would hide a stuck leader.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from neurond.lifecycle import LifecycleState
from neurond.observe.events import Event, EventSink, Observation
from neurond.observe.progress import in_progress, summary
from neurond.protocol import LoadProgress

log = logging.getLogger("neurond.notify")


class Notifier:
    def __init__(self, environ: dict | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.pop("NOTIFY_SOCKET", None) or None
        usec, pid = env.pop("WATCHDOG_USEC", None), env.pop("WATCHDOG_PID", None)
        # systemd's rule (sd_watchdog_enabled): WATCHDOG_USEC set, and WATCHDOG_PID unset or ours.
        self.watchdog_usec = None
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self.sent: list[str] = []  # last few messages, for /admin/status readers and tests
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Ping at half the timeout, as sd_watchdog_enabled(3) recommends."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def notify(self, **fields: object) -> bool:
        """notify(READY=1, STATUS="...") sends `READY=1\\nSTATUS=...`. True when the datagram went out."""
        if self.address is None:
            return False
        text = "\n".join(f"{k}={_one_line(v)}" for k, v in fields.items())
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(text.encode(), addr)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("NOTIFY_SOCKET %s does not take messages (%s); systemd will not hear from neurond",
                            self.address, exc)
            return False
        self.sent = (self.sent + [text])[-32:]
        return True

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status)

    def reloading(self, status: str) -> bool:
        # MONOTONIC_USEC lets systemd tell this reload from an older one (required from systemd 253 on).
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
                           STATUS=status)

    def stopping(self, status: str) -> bool:
        return self.notify(STOPPING=1, STATUS=status)


def _one_line(value: object) -> str:
    return " ".join(str(value).split("\n"))


async def watchdog(notifier: Notifier, responsive: Callable[[], str | None]) -> None:
    """Ping the watchdog from the event loop: a loop that stops running stops the pings by itself.
    `responsive()` returns None while the supervisor makes progress, or why not; then no ping is sent and
    systemd kills and restarts the daemon when WatchdogSec= runs out."""
    interval = notifier.watchdog_interval_s
    if interval is None:
        return
    silent_since = None
    while True:
        why = responsive()
        if why is None:
            if silent_since is not None:
                log.warning("supervisor responsive again; watchdog pings resume")
                silent_since = None
            notifier.notify(WATCHDOG=1)
        elif silent_since is None:
            silent_since = time.monotonic()
            log.error("supervisor unresponsive (%s): no more watchdog pings; systemd will restart neurond", why)
        await asyncio.sleep(interval)


class StatusSource(Protocol):
    """What STATUS= reads of the supervisor besides the events: its incident count and the load's progress."""

    @property
    def incidents(self) -> int: ...

    @property
    def load_progress(self) -> Mapping[int, LoadProgress]:
        """Rank -> its latest progress report, of the pool being loaded."""
        ...


class _NoSource:
    incidents = 0
    load_progress: Mapping[int, LoadProgress] = {}


class LifecycleStatus(EventSink):
    """An event sink that keeps systemd's STATUS= current at every transition and knows how long the current
    state has lasted (for the watchdog's responsiveness check); it also refreshes STATUS= at each load_progress
    report, so a long load shows how far it got. (Transitions reach it as events, like every other observer:
    one subscription, the supervisor's `events`.)"""

    def __init__(self, notifier: Notifier, model: str, tp_size: int) -> None:
        self.notifier = notifier
        self.model = model
        self.tp_size = tp_size
        self.source: StatusSource = _NoSource()  # the supervisor, once it exists
        self.state = LifecycleState.LOADING
        self.since = time.monotonic()
        self.cause = ""

    def line(self) -> str:
        why = f" ({self.cause})" if self.cause and self.state != LifecycleState.HEALTHY else ""
        text = f"{self.state}{why}: {self.model}, tp_size={self.tp_size}, incidents={self.source.incidents}"
        progress = self.source.load_progress
        loading = self.state in (LifecycleState.LOADING, LifecycleState.RELOADING)
        if loading and progress and in_progress(progress, self.tp_size):
            text += "; " + summary(progress, self.tp_size)
        return text

    def observe(self, o: Observation) -> None:
        """A transition sets the state STATUS= shows and when it began; a load's progress refreshes it."""
        if o.event is Event.TRANSITION and o.state_to is not None:
            self.state, self.since = LifecycleState(o.state_to), time.monotonic()
            self.cause = (o.cause or "") + (f" on rank {o.rank}" if o.rank is not None else "")
        elif o.event is not Event.LOAD_PROGRESS:
            return
        self.notifier.status(self.line())
