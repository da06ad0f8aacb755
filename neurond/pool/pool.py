"""The rank pool: one generation of worker processes that together hold the model.

The pool starts its ranks, forms their communicator on a fresh store, loads the shards, and runs calls on all
ranks at once with a deadline. It reports, never repairs: a failure reply, a death or a missed deadline
becomes a PoolFault raised to the caller (and, for a death outside any call, told to its `PoolListener`). The
supervisor, its listener, decides what to do about it. Nothing here waits without a deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from neurond import protocol as p
from neurond.pool.faults import PoolFault, RankDied, RankFailed, StepTimeout
from neurond.pool.launcher import Launcher
from neurond.pool.ranks import RankProcess
from neurond.pool.specs import RankSpecs

if TYPE_CHECKING:
    from neurond.pool.spares import SpareWorkers

log = logging.getLogger("neurond.pool")


# When one rank fails, its peers often fail a moment later *because of it* (gloo: "Connection closed by peer"
# once the first rank's process is gone). The first report is not always the root cause, so a failure waits
# this long for a death or a more specific failure before the call is failed. A death is final at once.
ROOT_CAUSE_GRACE_S = 0.1
_SECONDARY = ("connection closed by peer", "connection reset by peer", "read error", "broken pipe",
              "remote process exited", "communicator was aborted", "socket closed")


# How long a rank gets to write its stacks (SIGUSR1) before it is killed.
STACK_DUMP_S = 0.1
# How often a call watched for progress (a load) checks whether a rank stalled.
STALL_POLL_S = 0.25


def _is_secondary(failure: RankFailed) -> bool:
    text = failure.message.lower()
    return any(marker in text for marker in _SECONDARY)


@dataclass(slots=True)
class _Call:
    what: str
    ranks: set[int]
    future: asyncio.Future
    replies: dict[int, object] = field(default_factory=dict)
    failures: dict[int, RankFailed] = field(default_factory=dict)
    settle: asyncio.TimerHandle | None = None
    # When the call is watched for progress (a load): each rank's last LoadProgress (monotonic seconds).
    progress_at: dict[int, float] | None = None


# A call's command, made once its id is known (every rank gets the same one).
MakeCommand = Callable[[int], p.StepCommand | p.ControlCommand]


class PoolListener(Protocol):
    """What a pool tells its owner (the supervisor) as it happens, and the one thing it asks of it."""

    def spawning(self, spec: p.WorkerSpec) -> p.WorkerSpec:
        """The last word on a rank's spec as it is spawned (armed load faults, how it captures its graphs)."""
        ...

    def spawned(self, rank: int, pid: int | None) -> None: ...

    def progress(self, progress: p.LoadProgress) -> None:
        """A loading rank's progress, as it arrives."""
        ...

    def died(self, fault: RankDied) -> None:
        """A rank died outside any call (inside one, the call raises it)."""
        ...


class Unheard:
    """A listener that takes every spec as it is and hears nothing (tools and tests that run a pool alone)."""

    def spawning(self, spec: p.WorkerSpec) -> p.WorkerSpec:
        return spec

    def spawned(self, rank: int, pid: int | None) -> None:
        pass

    def progress(self, progress: p.LoadProgress) -> None:
        pass

    def died(self, fault: RankDied) -> None:
        pass


class RankPool:
    def __init__(
        self,
        specs: RankSpecs,
        listener: PoolListener | None = None,
        *,
        load_timeout_s: float = 600.0,
        load_stall_timeout_s: float = 60.0,
        comm_timeout_s: float = 30.0,
        spares: SpareWorkers | None = None,
        launcher: Launcher | None = None,
    ) -> None:
        self.launcher = launcher or Launcher()  # starts worker processes: forked by a zygote, or from scratch
        self.spares = spares  # SpareWorkers: processes with their imports done, taken before starting fresh ones
        self.listener: PoolListener = listener if listener is not None else Unheard()
        self.specs = specs  # shared with the pools before and after this one: they agree on the KV cache's size
        self.world_size = specs.world_size
        self.ranks: dict[int, RankProcess] = {}
        self.load_timeout_s = load_timeout_s
        self.load_stall_timeout_s = load_stall_timeout_s
        self.comm_timeout_s = comm_timeout_s
        self._ids = itertools.count(1)
        self._comm_ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._started: dict[int, asyncio.Future] = {}
        self.info: dict[int, p.Started] = {}
        self.reports: dict[int, p.LoadReport] = {}  # rank -> what its last load made
        self.loaded = False  # start() finished: every rank has its shard (until then, no weights to keep)
        self._closing = False

    # ------------------------------------------------------------------ lifecycle of the processes
    def spawn(self, rank: int) -> RankProcess:
        loop = asyncio.get_running_loop()
        spec = self.listener.spawning(self.specs.for_rank(rank))
        proc = self.spares.take(spec.env) if self.spares is not None else None
        if proc is not None:
            proc.assign(spec)
            try:
                proc.start(loop, self._on_reply, self._on_exit)
            except OSError:  # the spare died after it was taken: start a fresh process
                log.warning("rank %d: spare pid %s was gone; starting a fresh process", rank, proc.pid)
                proc.close()
                proc = None
        if proc is None:
            proc = RankProcess(spec, self.launcher)
            proc.start(loop, self._on_reply, self._on_exit)
        self._started[rank] = loop.create_future()
        self.ranks[rank] = proc
        log.info("rank %d: spawned pid %s", rank, proc.pid)
        self.listener.spawned(rank, proc.pid)
        return proc

    async def start(self) -> None:
        """Spawn every rank, form the communicator and load the shards. Raises PoolFault on any failure."""
        # The zygote's imports are what each rank would do itself: wait for them, then fork every rank at once.
        await self.launcher.wait_ready(self.load_timeout_s)
        for rank in range(self.world_size):
            self.spawn(rank)
        await self.wait_started(range(self.world_size))
        await self.form_comm()
        await self.load(range(self.world_size))
        self.loaded = True

    async def wait_started(self, ranks: Iterable[int], timeout_s: float | None = None) -> None:
        """Wait for the ranks' Started; `timeout_s` (default: the load deadline) bounds the wait."""
        timeout_s = self.load_timeout_s if timeout_s is None else timeout_s
        ranks = list(ranks)
        futures = [self._started[r] for r in ranks]
        done, pending = await asyncio.wait(futures, timeout=timeout_s)
        if pending:
            missing = [r for r in ranks if not self._started[r].done()]
            raise StepTimeout(missing, timeout_s, "worker start")
        for fut in done:
            fut.result()  # raises RankDied

    async def form_comm(self, timeout_s: float | None = None) -> int:
        """A new communicator among the current processes, on a fresh store opened by rank 0, its first
        collective included. Each of the two calls has the communicator deadline (`timeout_s`, default the
        pool's)."""
        timeout_s = self.comm_timeout_s if timeout_s is None else timeout_s
        opened = await self.call([0], lambda cid: p.OpenStore(cid), timeout_s, "open store")
        store = opened[0]
        assert isinstance(store, p.StoreOpened)  # an OpenStore's answer
        port = store.port
        comm_id = next(self._comm_ids)
        await self.call_all(lambda cid: p.JoinComm(cid, comm_id, "127.0.0.1", port, timeout_s), timeout_s,
                            "join communicator")
        return comm_id

    async def load(self, ranks: Iterable[int], timeout_s: float | None = None) -> None:
        """Load the ranks' shards (and warm them up). Two deadlines: `timeout_s` (default the load deadline) for
        the whole call, and `load_stall_timeout_s` between a rank's progress reports (it reports as it reads
        and as it warms up), so a rank wedged in its load is found in a minute, not after a cold-disk bound."""
        timeout_s = self.load_timeout_s if timeout_s is None else timeout_s
        replies = await self._call(list(ranks), lambda cid: p.LoadShard(cid), timeout_s, "load shard",
                                   control=False, stall_s=self.load_stall_timeout_s)
        loaded = {}
        for rank, reply in replies.items():
            assert isinstance(reply, p.Done) and reply.loaded is not None  # a LoadShard's answer
            loaded[rank] = self.reports[rank] = reply.loaded
        # Sized from memory: each rank made as many blocks as fit its GPU; the leader hands out only those every
        # rank has, and a rank started later (replace_ranks, a new pool) makes exactly that many.
        self.specs.agree(loaded)

    # ------------------------------------------------------------------ calls
    async def call_all(self, make: MakeCommand, deadline_s: float, what: str) -> dict[int, object]:
        return await self.call(list(range(self.world_size)), make, deadline_s, what)

    async def call(self, ranks: list[int], make: MakeCommand, deadline_s: float, what: str) -> dict[int, object]:
        """Send `make(call_id)` to each rank's step channel; wait for all replies or the first failure."""
        return await self._call(ranks, make, deadline_s, what, control=False)

    async def control(self, ranks: list[int], make: Callable[[int], p.ControlCommand], deadline_s: float,
                      what: str) -> dict[int, object]:
        """Like call(), on the control channel (answered even while a rank's compute thread is stuck)."""
        return await self._call(ranks, make, deadline_s, what, control=True)

    async def _call(self, ranks: list[int], make: MakeCommand, deadline_s: float, what: str, *, control: bool,
                    stall_s: float | None = None) -> dict[int, object]:
        if not ranks:
            return {}  # nothing to wait for (e.g. aborting the survivors of a TP=1 pool whose rank died)
        loop = asyncio.get_running_loop()
        call_id = next(self._ids)
        call = _Call(what, set(ranks), loop.create_future())
        if stall_s is not None:
            call.progress_at = {rank: time.monotonic() for rank in ranks}
        self._calls[call_id] = call
        cmd = make(call_id)
        try:
            for rank in ranks:
                proc = self.ranks.get(rank)
                if proc is None or not proc.alive:
                    raise RankDied(rank, proc.exitcode if proc else None)
                try:
                    if control:
                        await proc.send_control(cmd)
                    else:
                        await proc.send_step(cmd)
                except (BrokenPipeError, OSError):
                    raise RankDied(rank, proc.exitcode) from None
            return await self._wait(call, deadline_s, stall_s)
        finally:
            self._calls.pop(call_id, None)
            if not call.future.done():
                call.future.cancel()

    @staticmethod
    async def _wait(call: _Call, deadline_s: float, stall_s: float | None) -> dict[int, object]:
        """Wait for `call` within `deadline_s`; with `stall_s`, also fail it as soon as a rank that has not
        answered went that long without a progress report (call.progress_at)."""
        end = time.monotonic() + deadline_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise StepTimeout(sorted(call.ranks - call.replies.keys()), deadline_s, call.what)
            try:
                return await asyncio.wait_for(asyncio.shield(call.future),
                                              left if stall_s is None else min(left, STALL_POLL_S))
            except TimeoutError:
                if stall_s is None:
                    continue  # the deadline has passed: raised above
                progress_at = call.progress_at
                assert progress_at is not None  # _call sets it when it watches for progress
                now = time.monotonic()
                stalled = sorted(r for r in call.ranks - call.replies.keys() - call.failures.keys()
                                 if now - progress_at[r] > stall_s)
                if stalled:
                    raise StepTimeout(stalled, stall_s, f"{call.what} (no progress)") from None

    # ------------------------------------------------------------------ events from the processes
    def _on_reply(self, rank: int, reply: object) -> None:
        if isinstance(reply, p.Started):
            self.info[rank] = reply
            fut = self._started.get(rank)
            if fut is not None and not fut.done():
                fut.set_result(reply)
            return
        if isinstance(reply, p.Imported):  # a fresh process's imports are done: its Started follows
            return
        if isinstance(reply, p.LoadProgress):  # answers no call
            for watched in self._calls.values():
                if watched.progress_at is not None and reply.rank in watched.progress_at:
                    watched.progress_at[reply.rank] = time.monotonic()
            self.listener.progress(reply)
            return
        call = self._calls.get(getattr(reply, "call_id", -1))
        if call is None or call.future.done():
            return  # late reply to a call that already ended (failed, timed out): drop it
        if isinstance(reply, p.StepFailed):
            call.failures[rank] = RankFailed(rank, reply.kind, reply.message, context_ok=reply.context_ok)
            if call.ranks <= call.replies.keys() | call.failures.keys():
                self._settle(call)
            elif call.settle is None:
                call.settle = asyncio.get_running_loop().call_later(ROOT_CAUSE_GRACE_S, self._settle, call)
            return
        call.replies[rank] = reply
        if call.ranks <= call.replies.keys():
            call.future.set_result(dict(call.replies))
        elif call.failures and call.ranks <= call.replies.keys() | call.failures.keys():
            self._settle(call)

    @staticmethod
    def _settle(call: _Call) -> None:
        """Fail the call with its root cause: the first failure that is not a consequence of a peer's."""
        if call.settle is not None:
            call.settle.cancel()
        if call.future.done() or not call.failures:
            return
        failures = list(call.failures.values())
        primary = next((f for f in failures if not _is_secondary(f)), failures[0])
        call.future.set_exception(primary)

    def _on_exit(self, rank: int, exitcode: int | None) -> None:
        log.log(logging.INFO if self._closing else logging.ERROR, "rank %d: process exited with code %s", rank,
                exitcode)
        fault = RankDied(rank, exitcode)
        fut = self._started.get(rank)
        if fut is not None and not fut.done():
            fut.set_exception(fault)
            fut.exception()  # retrieved here; wait_started re-raises it from result()
        involved = False
        for call in self._calls.values():
            if rank in call.ranks and rank not in call.replies and not call.future.done():
                if call.settle is not None:
                    call.settle.cancel()
                call.future.set_exception(fault)  # a death is the root cause: final at once
                involved = True
        if not involved and not self._closing:
            self.listener.died(fault)

    # ------------------------------------------------------------------ inspection
    def pids(self) -> dict[int, int | None]:
        return {rank: proc.pid for rank, proc in self.ranks.items()}

    def alive_ranks(self) -> list[int]:
        return [rank for rank, proc in self.ranks.items() if proc.alive]

    # ------------------------------------------------------------------ stopping
    async def kill_ranks(self, ranks: Iterable[int], timeout_s: float = 10.0, dump_stacks: bool = False) -> None:
        """SIGKILL the ranks and wait until each is reaped. `dump_stacks`: first SIGUSR1, on which a worker
        writes every thread's Python stack to stderr (the journal), and a moment for it to do so."""
        if dump_stacks:
            alive = [self.ranks[r] for r in ranks if self.ranks.get(r) is not None and self.ranks[r].alive]
            for each in alive:
                each.signal(signal.SIGUSR1)
            if alive:
                await asyncio.sleep(STACK_DUMP_S)
        for rank in ranks:
            proc = self.ranks.get(rank)
            if proc is not None:
                proc.kill()
        for rank in ranks:
            proc = self.ranks.get(rank)
            if proc is not None:
                await proc.wait_exit(timeout_s)
                proc.close()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop every rank: ask politely, then SIGTERM, then SIGKILL. Returns once all are reaped."""
        self._closing = True
        alive = [r for r, proc in self.ranks.items() if proc.alive]
        if alive:
            try:
                await self.call(alive, lambda cid: p.Shutdown(cid), grace_s / 2, "shutdown")
            except PoolFault:
                pass
        t0 = time.monotonic()
        for proc in self.ranks.values():
            if not await proc.wait_exit(max(0.1, grace_s / 2 - (time.monotonic() - t0))):
                proc.signal(signal.SIGTERM)
        for proc in self.ranks.values():
            if not await proc.wait_exit(grace_s / 2):
                proc.kill()
                await proc.wait_exit(10.0)
            proc.close()
