"""The fault matrix at TP=2 over NCCL on two real GPUs (skipped without them; the CPU/gloo matrix is
tests/pool/test_fault_matrix.py, and a gloo pass proves nothing about NCCL).

Every fault kind x rank 0 and 1 x phase, on the built-in model with the daemon's defaults for what matters here
(CUDA graphs holding the all-reduces, compiled kernels, a spare worker, 5 s step deadline floor, 5 s abort
deadline). For each: the faulted request ends (a completed replay or a clean error), /ready is 200 again, the
next request succeeds, no process is left over, and
- a rank that raised or ran out of memory is repaired by a new communicator: every process kept, and every live
  rank confirmed the abort (its stuck collective released; with its decode graphs alive, NCCL's abort never
  returned: issue 15);
- a dead, wedged or sticky-CUDA-error rank is replaced alone: its peer keeps its process and weights.
Run on a 2-GPU device machine: `python3 -m pytest -m gpu tests/gpu/test_tp_faults.py`.
"""

from __future__ import annotations

import re
import time

import pytest

torch = pytest.importorskip("torch")

from tests.conftest import alive, chat_body, describe  # noqa: E402
from tests.faults import fault_daemon, wait_ready  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA GPUs")]

KEEPS_ALL = ("raise", "oom")  # the rank's own context is fine: nobody is killed
REPLACED = ("exit", "sigkill", "segfault", "wedge", "hang_kernel", "cuda_error")
REQUEST_BOUND_S = 60.0  # generous: a 5 s deadline + a replaced rank's load + the replay
READY_BOUND_S = 60.0


@pytest.fixture(scope="module")
def daemon(start_daemon, tmp_path_factory):
    env = {"NEUROND_SPARE_WORKERS": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    return fault_daemon(start_daemon, tmp_path_factory.mktemp("gpu-faults"), 2, env=env, extra=["--device", "cuda"],
                        step_deadline_floor_s=4.0, step_deadline_ceiling_s=60.0, abort_timeout_s=5.0,
                        load_timeout_s=120.0, resume_wait_s=60.0)


def _events_since(daemon, offset: int) -> str:
    return daemon.log()[offset:]


def test_the_first_load_needs_no_repair(daemon):
    """Runs first (file order). On a fresh machine the compile cache is cold: the kernels' pre-warm took 8.3 s
    without a progress report, the 8 s load stall deadline below fired, and the start took a full reload."""
    wait_ready(daemon, timeout=READY_BOUND_S)
    transitions = daemon.admin.status()["transitions"]
    assert [t[1:3] for t in transitions] == [["loading", "healthy"]], transitions
    assert "no progress" not in daemon.log()


@pytest.mark.parametrize("phase", ["prefill", "decode", "collective"])
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("kind", KEEPS_ALL + REPLACED)
def test_rank_fault_at_tp2_over_nccl(daemon, kind, rank, phase):
    wait_ready(daemon, timeout=READY_BOUND_S)
    before = daemon.admin.status()["pids"]
    seen = len(daemon.admin.status()["transitions"])
    offset = len(daemon.log())
    assert daemon.admin.inject(rank, kind, phase).status_code == 200

    t0 = time.monotonic()
    status, headers, body = daemon.chat(chat_body(f"{kind} {rank} {phase}", max_tokens=12, temperature=0),
                                        timeout=REQUEST_BOUND_S + 30)
    assert time.monotonic() - t0 < REQUEST_BOUND_S
    if status != 200:  # a clean OpenAI error, never a hang or a dropped connection
        assert isinstance(body, dict) and body["error"]["code"], body
    if kind in KEEPS_ALL:
        assert status in (500, 503), body

    wait_ready(daemon, timeout=READY_BOUND_S)
    assert daemon.chat(chat_body("next", max_tokens=8, temperature=0))[0] == 200

    log = _events_since(daemon, offset)
    transitions = daemon.admin.status()["transitions"][seen:]
    assert transitions[-1][:3] == ["recovered", "reloading", "healthy"], transitions
    assert "abort_failed" not in log, log[-4000:]
    assert re.search(r"abort_finished", log), log[-4000:]
    after = daemon.admin.status()["pids"]
    peer = str(1 - rank)
    if kind in KEEPS_ALL:
        assert transitions[-1][4] == "comm_rebuild", transitions
        assert after == before, "no process may be replaced"
    else:
        assert transitions[-1][4] == "replace_ranks", transitions
        assert after[peer] == before[peer], "the surviving rank must keep its process and weights"
        assert not alive(before[str(rank)])
    status_now = daemon.admin.status()
    live = set(after.values()) | set(status_now.get("spare_pids", []))
    extra = set(daemon.worker_pids()) - live
    assert not extra, f"a worker process was left over: {[describe(pid) for pid in extra]}"


def test_replacement_dies_while_loading(daemon):
    """A fault during the repair of another: rank 1 dies in a decode step, its replacement dies loading."""
    wait_ready(daemon, timeout=READY_BOUND_S)
    before = daemon.admin.status()["pids"]
    seen = len(daemon.admin.status()["transitions"])
    assert daemon.admin.inject(1, "exit", "load").status_code == 200
    assert daemon.admin.inject(1, "sigkill", "decode").status_code == 200
    status, _, body = daemon.chat(chat_body("repair fault", max_tokens=12, temperature=0), timeout=150)
    assert status == 200 or body["error"]["code"], body
    wait_ready(daemon, timeout=120)
    assert daemon.chat(chat_body("next", max_tokens=8, temperature=0))[0] == 200
    events = [t[0] for t in daemon.admin.status()["transitions"][seen:]]
    assert events[:3] == ["fault", "abort", "repair"] and "fault" in events[3:], events
    assert events[-1] == "recovered"
    assert "neurond recovery_backoff: waiting 1000 ms before attempt 2" in daemon.log()  # then a full reload
    assert daemon.admin.status()["pids"]["1"] != before["1"]
