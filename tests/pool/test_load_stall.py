"""A load is watched for progress (RankPool._wait): a rank that stops reporting fails the call after
the stall deadline, long before the load deadline; one that keeps reporting, or has answered, does not."""

from __future__ import annotations

import asyncio
import time

import pytest

from neurond.pool.faults import StepTimeout
from neurond.pool.pool import RankPool, _Call


def _call(ranks) -> _Call:
    call = _Call("load shard", set(ranks), asyncio.get_running_loop().create_future())
    call.progress_at = {rank: time.monotonic() for rank in ranks}
    return call


async def _report(call: _Call, rank: int, every: float = 0.05) -> None:
    while True:
        await asyncio.sleep(every)
        call.progress_at[rank] = time.monotonic()


def test_a_rank_that_stops_reporting_is_named_after_the_stall_deadline():
    async def scenario():
        call = _call([0, 1])
        reporter = asyncio.ensure_future(_report(call, 0))
        t0 = time.monotonic()
        with pytest.raises(StepTimeout) as err:
            await RankPool._wait(call, deadline_s=30.0, stall_s=0.6)
        reporter.cancel()
        return time.monotonic() - t0, err.value

    took, err = asyncio.run(scenario())
    assert err.ranks == [1] and "no progress" in str(err)
    assert 0.6 <= took < 5.0  # the stall deadline, not the 30 s load deadline


def test_reports_keep_a_slow_load_alive_and_an_answered_rank_is_not_watched():
    async def scenario():
        call = _call([0, 1])
        reporter = asyncio.ensure_future(_report(call, 0))
        call.replies[1] = "done"  # rank 1 finished early; it reports nothing more

        async def finish():
            await asyncio.sleep(1.5)  # longer than the stall deadline, with rank 0 reporting all along
            call.future.set_result({0: "done", 1: "done"})

        asyncio.ensure_future(finish())
        result = await RankPool._wait(call, deadline_s=30.0, stall_s=0.5)
        reporter.cancel()
        return result

    assert asyncio.run(scenario()) == {0: "done", 1: "done"}


def test_the_load_deadline_still_bounds_a_load_that_reports():
    async def scenario():
        call = _call([0])
        reporter = asyncio.ensure_future(_report(call, 0))
        with pytest.raises(StepTimeout) as err:
            await RankPool._wait(call, deadline_s=0.8, stall_s=10.0)
        reporter.cancel()
        return err.value

    err = asyncio.run(scenario())
    assert err.ranks == [0] and "no progress" not in str(err)
