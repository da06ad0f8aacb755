"""The communicator's abort on gloo releases a collective stuck waiting on a peer that never joins it, on both
sides, whoever holds a reference to the group (worker/comm.py: torch's own gloo abort closes nothing while one
is held). Two real processes, each a Communicator as a rank has one; the test holds the default group in each
process, as a stored Work or a traceback frame may in a rank."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
# Rank 1 waits in an all_reduce that rank 0 never joins. `who` aborts its communicator 1 s in: rank 0 (the
# raiser's side) or rank 1 itself (its control thread, as the ladder aborts every live rank). Rank 0 then stays
# alive for 20 s: only the abort can release rank 1 before that.
RANK = r"""
import sys, threading, time
import torch, torch.distributed as dist
from neurond.worker.comm import Communicator
rank, port, who = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
comm = Communicator(rank, 2, "gloo", torch.device("cpu"))
if rank == 0:
    print(comm.open_store(), flush=True)
comm.join(1, "127.0.0.1", port if rank else 0, 30.0)
held = dist.group.WORLD  # a reference torch's abort does not drop
if rank == 1:
    if who == "self":
        threading.Timer(1.0, comm.abort).start()
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(64))
        print("returned", flush=True)
    except RuntimeError as exc:
        print(f"released {time.monotonic() - t0:.2f} {exc}"[:200], flush=True)
else:
    time.sleep(1.0)
    if who == "peer":
        comm.abort()
    time.sleep(20)
"""


def _run(who: str) -> tuple[str, float]:
    rank0 = subprocess.Popen([sys.executable, "-c", RANK, "0", "0", who], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert rank0.stdout is not None
        port = rank0.stdout.readline().strip()
        assert port.isdigit(), port
        t0 = time.monotonic()
        rank1 = subprocess.run([sys.executable, "-c", RANK, "1", port, who], cwd=REPO, capture_output=True,
                               text=True, timeout=60)
        return rank1.stdout.strip(), time.monotonic() - t0
    finally:
        rank0.kill()
        rank0.wait()


@pytest.mark.parametrize("who", ["peer", "self"])
def test_abort_releases_a_collective_stuck_on_a_peer(who):
    out, took = _run(who)
    assert out.startswith("released"), out
    waited = float(out.split()[1])
    # The abort comes 1 s in; rank 0 lives for 20 s more. Released well before: by the abort, not by an exit.
    assert waited < 10.0, out
    assert "Connection closed" in out or "closed" in out.lower(), out
