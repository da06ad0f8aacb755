"""A rank bootstrap: what a rank worker (neurond/worker/main.py) does before its first step, for code that drives
a rank's own loop by hand, with no leader.

    dev = bind_device("cuda", rank)                       # GPU rank % count, made current; or the CPU
    join_group(rank, world_size, dev, port)               # NCCL on a GPU, gloo on a CPU (world_size > 1)
    shard = load_shard(model_dir, dev, "auto", rank, world_size)   # or, alone: tp1_shard(model_dir, "cuda")
    step = runner(shard, slots=4, max_len=512, cuda_graphs=True)

The choices are the worker's own (shard.pick_device, pick_backend, one CollectiveGuard a rank shares between its
shard's all-reduce hooks and its runner); what the worker adds around them (pipes, the control thread, the
communicator's abort) is left out: nothing here supervises. `run_ranks` starts one spawned process per rank
and collects what they report. Imports torch.
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from neurond.worker.runner import ModelRunner
from neurond.worker.shard import Shard, pick_backend, pick_device
from neurond.worker.tp import CollectiveGuard


def builtin_or(model: str | None) -> str:
    """`model`, or the built-in model (written once to the temporary directory's neurond-bench-cache)."""
    if model:
        return model
    from neurond.models.builtin import ensure_builtin_model

    return str(ensure_builtin_model(Path(tempfile.gettempdir()) / "neurond-bench-cache"))


def shared_cores(world_size: int) -> int:
    """The worker's CPU threads per rank when ranks share the machine (cpu_threads = 0)."""
    return max(1, (os.cpu_count() or 1) // world_size)


def bind_device(name: str = "cpu", rank: int = 0, threads: int | None = None) -> torch.device:
    """The rank's device for `name` (cpu, cuda, auto), as the worker picks it; a GPU is made the current device.
    On a CPU, `threads` (when given) is the intra-op thread count (torch's default otherwise)."""
    dev = pick_device(name, rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    elif threads:
        torch.set_num_threads(threads)
    return dev


def join_group(rank: int, world_size: int, dev: torch.device, port: int, *, store_opened: bool = False,
               timeout_s: float | None = None) -> None:
    """Form the default process group: NCCL with the device bound (its communicator made now) on a GPU, gloo on a
    CPU, meeting on a TCPStore at 127.0.0.1:`port` that rank 0 opens, or that the caller's process opened
    already (`store_opened`). `timeout_s`: the store's and the group's (torch's defaults otherwise)."""
    import torch.distributed as dist

    timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    opens = rank == 0 and not store_opened
    store = dist.TCPStore("127.0.0.1", port, None if store_opened else world_size, opens, **timeout)
    dist.init_process_group(pick_backend("auto", dev), store=store, rank=rank, world_size=world_size, **timeout,
                            **({"device_id": dev} if dev.type == "cuda" else {}))


def new_shard(model_dir: str | Path, dev: torch.device, dtype: str = "auto", rank: int = 0, world_size: int = 1,
              **options) -> Shard:
    """This rank's shard of the checkpoint, not loaded yet (its load() returns what the rank reports; options:
    Shard's, e.g. tp_impl)."""
    return Shard(str(model_dir), dtype, dev, rank, world_size, guard=CollectiveGuard(), **options)


def load_shard(model_dir: str | Path, dev: torch.device, dtype: str = "auto", rank: int = 0, world_size: int = 1,
               **options) -> Shard:
    """This rank's shard of the checkpoint, loaded."""
    shard = new_shard(model_dir, dev, dtype, rank, world_size, **options)
    shard.load()
    return shard


def tp1_shard(model: str | Path | None, device: str = "cpu", dtype: str = "auto") -> Shard:
    """The whole model (`model`, or the built-in one) loaded as the one rank of TP=1 on `device`."""
    return load_shard(builtin_or(str(model) if model else None), bind_device(device), dtype)


def runner(shard: Shard, *, slots: int, max_len: int, **options) -> ModelRunner:
    """A runner on the shard's model, device, guard and world size (options: ModelRunner's)."""
    return ModelRunner(shard.model, slots=slots, max_len=max_len, device=shard.device, guard=shard.guard,
                       world_size=shard.world_size, **options)


class RanksFailed(RuntimeError):
    pass


@dataclass
class RankRun:
    results: list  # what the ranks put on their queue, in the order it came
    exitcodes: list[int | None]  # each rank's, after it was joined (None: still running, then killed)


def run_ranks(target, world_size: int, *args, expect: int | None = None, timeout_s: float = 1200.0) -> RankRun:
    """Run `target(rank, *args, results)` in a spawned process per rank (each then binds its device and joins
    the group itself) and collect what they put on `results` until `expect` items (default: one per rank) have
    come; then join the ranks (60 s each). Raises RanksFailed, the ranks killed, when one exits with an error
    first or when `timeout_s` passes."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, *args, results)) for r in range(world_size)]
    for proc in procs:
        proc.start()
    got: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < (world_size if expect is None else expect):
            try:
                got.append(results.get(timeout=1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                    raise RanksFailed(f"a rank failed (exit codes {[p.exitcode for p in procs]}) or the run "
                                      "timed out") from None
        for proc in procs:
            proc.join(60)
        return RankRun(got, [p.exitcode for p in procs])
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
