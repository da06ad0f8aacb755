"""Arms volleys of faults through the admin API, one after another, and waits for each to be repaired.

Only one volley is armed at a time and the next is armed only once the incidents of the last one have all
begun and the pool is healthy again, so every incident of the run can be laid against the volley that caused
it. The wait before the next volley is drawn too, and is sometimes zero: a fault on the very first steps after
a repair is a case of its own.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass, field

import httpx

from tests.chaos import probes
from tests.chaos.volleys import Volley, schedule


class AsyncAdmin:
    """The admin API on its unix socket."""

    def __init__(self, socket_path: str, token: str) -> None:
        self.client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=socket_path),
                                        base_url="http://admin", headers={"Authorization": f"Bearer {token}"},
                                        timeout=30)

    async def status(self) -> dict:
        r = await self.client.get("/admin/status")
        r.raise_for_status()
        return r.json()

    async def inject(self, rank: int, kind: str, phase: str, count: int) -> httpx.Response:
        fault = {"rank": rank, "kind": kind, "phase": phase, "count": count}
        return await self.client.post("/admin/faults", json=fault)

    async def aclose(self) -> None:
        await self.client.aclose()


# A volley that may cause one incident more (same_step, when its faults fire in two steps) is watched this much
# longer once the pool is healthy: the second fault fires on the first matching step, and requests never stop.
SETTLE_S = 2.0


@dataclass
class VolleyRecord:
    volley: Volley
    armed_at: float  # time.monotonic()
    incidents_before: int
    repaired_at: float | None = None  # all its incidents begun and the pool healthy again
    incidents_seen: int = 0  # incidents it caused (the admin status counts incidents)
    quiet_s: float = 0.0  # the pause before it was armed
    problem: str = ""  # why it was not repaired (arming refused, no incident, no recovery in time)


@dataclass
class Sample:
    """The leader after a repair: the fd and RSS trend across many recoveries."""

    at: float
    volleys: int
    fds: int
    rss: int


@dataclass
class InjectorSettings:
    mix: dict[str, float]
    load_kinds: tuple[str, ...]
    max_spacing_s: float = 1.5  # the quiet time between two volleys is drawn from 0..this
    back_to_back_share: float = 0.25  # ... and is exactly 0 this often
    fire_timeout_s: float = 30.0  # a volley's faults fire on the next matching step: the clients never stop
    repair_timeout_s: float = 90.0  # per incident: a full reload after a load-phase wedge takes ~30 s


@dataclass
class Injector:
    admin: AsyncAdmin
    rng: random.Random
    settings: InjectorSettings
    leader_pid: int
    tracker: probes.WorkerTracker
    records: list[VolleyRecord] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    async def run(self, until: float) -> None:
        """Volleys until `until` (monotonic) and at least the coverage deck; the last one is always seen
        through to its repair. Stops early when one is not repaired in time: the incidents after it could not
        be told apart any more."""
        s = self.settings
        volleys = schedule(self.rng, s.mix, s.load_kinds)
        while True:
            volley, in_deck = next(volleys)
            if not in_deck and time.monotonic() >= until:
                return
            quiet = 0.0 if self.rng.random() < s.back_to_back_share else self.rng.uniform(0.0, s.max_spacing_s)
            await asyncio.sleep(quiet)
            record = await self._fire(volley)
            record.quiet_s = quiet
            if record.problem:
                return

    async def _fire(self, volley: Volley) -> VolleyRecord:
        status = await self.admin.status()
        self.tracker.note([*status["pids"].values(), *status.get("spare_pids", [])])
        record = VolleyRecord(volley, time.monotonic(), status["incidents"])
        self.records.append(record)
        armed = [f for f in volley.faults if f.phase == "load"]  # first: the death that needs them comes after
        armed += [f for f in volley.faults if f.phase not in ("load", "external")]
        for batch in ([armed[0]], armed[1:]) if armed and armed[0].phase == "load" else (armed,):
            # Faults of one phase are armed at once: two admin calls in a row leave a whole step between them.
            replies = await asyncio.gather(*(self.admin.inject(f.rank, f.kind, f.phase, f.count) for f in batch))
            refused = [(f, r) for f, r in zip(batch, replies, strict=True) if r.status_code != 200]
            if refused:
                f, r = refused[0]
                record.problem = f"arming {f} refused: {r.status_code} {r.text[:200]}"
                return record
        for fault in volley.faults:
            if fault.phase == "external":
                # Sometimes mid-step, sometimes between steps: the kill lands at a random moment.
                await asyncio.sleep(self.rng.uniform(0.0, 0.3))
                os.kill(int(status["pids"][str(fault.rank)]), signal.SIGKILL)
        await self._await_repair(record)
        return record

    async def _await_repair(self, record: VolleyRecord) -> None:
        """Until the volley's fewest incidents have begun and the pool is healthy; for a volley that may cause
        more, on while requests flow for SETTLE_S more, and through the repair of any further one it causes."""
        s, v = self.settings, record.volley
        deadline = record.armed_at + s.fire_timeout_s + v.max_incidents * s.repair_timeout_s
        settle_until = None
        while True:
            status = await self.admin.status()
            self.tracker.note([*status["pids"].values(), *status.get("spare_pids", [])])
            seen = status["incidents"] - record.incidents_before
            now = time.monotonic()
            if seen >= v.min_incidents and status["state"] == "healthy":
                settle_until = settle_until or now + (SETTLE_S if seen < v.max_incidents else 0.0)
                if seen >= v.max_incidents or now >= settle_until:
                    record.incidents_seen, record.repaired_at = seen, now
                    self.samples.append(Sample(now, len(self.records), probes.fd_count(self.leader_pid),
                                               probes.rss_bytes(self.leader_pid)))
                    return
            elif seen > 0:
                settle_until = None  # another incident of this volley began: see it through first
            if seen == 0 and now > record.armed_at + s.fire_timeout_s:
                record.problem = f"no incident within {s.fire_timeout_s:.0f}s of arming"
                return
            if now > deadline:
                record.problem = f"not repaired in time: {seen} incidents begun, state {status['state']}"
                return
            await asyncio.sleep(0.1)
