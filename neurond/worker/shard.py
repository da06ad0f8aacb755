"""A rank's model shard: loading it, and what the leader needs to know about it.

The model code knows nothing about tensor parallelism. The daemon loads through neurond's own sharding
(`worker/loader.py` with `worker/tp.py`'s plan: collectives on the default group, so a communicator can be
rebuilt and a rank replaced without touching the survivors' weights). `tp_impl="transformers"` loads through
transformers' `tp_plan="auto"` instead, for scripts/bench-tp's comparison only (its ranks stay bound to the
group they loaded with, which is why the daemon does not use it). One code path for 1..N ranks.
"""

from __future__ import annotations

import os

import torch


def pick_device(requested: str, rank: int):
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 0:
        raise RuntimeError("device=cuda was configured but this worker sees no CUDA device")
    return torch.device("cuda", rank % count)


def pick_backend(requested: str, device) -> str:
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def requested_dtype(name: str, device):
    if name == "auto":
        # CPU kernels for half types are slow and imprecise; a real checkpoint keeps its own dtype on GPU.
        return torch.float32 if device.type == "cpu" else "auto"
    return getattr(torch, name)


class Shard:
    """This rank's part of the model (the KV cache and the steps are the runner's: `worker/runner.py`)."""

    def __init__(self, model_dir: str, dtype: str, device, rank: int, world_size: int,
                 tp_impl: str = "neurond", guard=None) -> None:
        self.tp_impl = tp_impl
        self.guard = guard
        self.model_dir = model_dir
        self.dtype = dtype
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.model: torch.nn.Module | None = None

    # ------------------------------------------------------------------ load
    def load(self, progress=None) -> dict:
        """`progress(done_bytes, total_bytes, files_done, files_total)` as checkpoint files are read (neurond's
        own sharding only; transformers' loader reports nothing)."""
        from transformers import AutoModelForCausalLM

        if self.tp_impl == "neurond":
            from neurond.worker.loader import load_shard

            model = load_shard(self.model_dir, self.device, requested_dtype(self.dtype, self.device), self.rank,
                               self.world_size, self.guard, progress)
        else:
            kwargs: dict = {"dtype": requested_dtype(self.dtype, self.device)}
            if self.world_size > 1:
                # transformers binds each rank to the device LOCAL_RANK names.
                os.environ["LOCAL_RANK"] = str(self.device.index or 0)
                kwargs.update(_tp_kwargs(self.world_size))
            else:
                kwargs["device_map"] = str(self.device)
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, **kwargs)
        model.eval()
        self.model = model
        return self.memory_info()

    def memory_info(self) -> dict:
        """What a rank reports after loading: dtype and device memory (the KV cache's size is the runner's)."""
        assert self.model is not None  # called once loaded
        info: dict[str, str | int] = {"dtype": str(next(self.model.parameters()).dtype)}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            info.update(free_bytes=free, total_bytes=total, allocated_bytes=torch.cuda.memory_allocated(self.device))
        else:
            info["free_bytes"] = _mem_available()
        return info


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _tp_kwargs(world_size: int) -> dict:
    """transformers' own tensor parallelism, in the form the installed version takes."""
    try:
        from transformers.distributed import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=world_size)}
    except (ImportError, TypeError):
        return {"tp_plan": "auto"}
