"""Tensor parallelism of neurond's own: which weights a rank holds, and the all-reduce that joins their outputs.

Why not transformers' `tp_plan="auto"`: its layers hold DTensor parameters on the device mesh they were
loaded with and all-reduce on that mesh's group, so after a communicator is aborted and rebuilt every surviving
rank would have to be re-pointed at a new mesh, and a replacement rank's loading creates mesh sub-groups
(collective calls) that the survivors would have to mirror. Here every collective is
`dist.all_reduce(x)` on the *default* group: rebuilding the communicator is `init_process_group` again, and a
replaced rank loads its shard without any collective. It is also lighter per step (no DTensor dispatch):
measured in docs/benchmarks.md.

The model code knows nothing about this (as in gpt-fast's tp.py): the model's own `base_model_tp_plan` says
which linear layers are column-wise (q/k/v, gate/up: output features split) and row-wise (o, down: input
features split, outputs summed across ranks by a forward hook). Everything else is replicated. The loader
(`loader.py`) reads only this rank's part of each tensor (`shard_of`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import time

import torch
import torch.distributed as dist


class CollectiveGuard:
    """Marks when this rank is waiting on its peers; the control thread reports it in Pong, so the leader can
    tell a rank that is *waiting for its peers* from one that is wedged in its own work.

    Over NCCL a collective only enqueues a kernel: the host then waits for it at the step's next sync (a token
    read back, `.tolist()`), not inside `all_reduce`. So at TP>1 a whole prefill or decode step counts as
    waiting on peers (`region`), except code that is the rank's own business inside it (`own_work`: the
    fault-injection hook). A rank truly stuck in its own kernel inside a step is then found after the abort:
    the abort does not release it, and it is killed after a short grace.

    `local()` makes `all_reduce` a no-op: a rank warming up alone (compiling kernels after it was replaced)
    must not call into a collective its peers are not in. Its results are garbage and are thrown away."""

    def __init__(self) -> None:
        self.inside = False
        self.left_at = 0.0  # monotonic time the rank last stopped waiting on peers
        self._local = False

    def all_reduce(self, tensor) -> None:
        if self._local:
            return

        with self.region():
            dist.all_reduce(tensor)

    @contextlib.contextmanager
    def region(self, collective: bool = True):
        """Everything inside counts as waiting on peers (a collective, a graph replay that holds them, the
        host sync that waits for queued collectives)."""
        if not collective or self.inside:
            yield
            return
        self.inside = True
        try:
            yield
        finally:
            self.inside = False
            self.left_at = time.monotonic()

    @contextlib.contextmanager
    def own_work(self):
        """Inside a region: this part is the rank's own work, not waiting on peers."""
        was = self.inside
        self.inside = False
        self.left_at = time.monotonic()
        try:
            yield
        finally:
            self.inside = was

    @contextlib.contextmanager
    def local(self):
        self._local = True
        try:
            yield
        finally:
            self._local = False


def plan_of(model, config, world_size: int) -> dict[str, str]:
    """The model's sharding plan ({module name pattern: "colwise" | "rowwise"}), checked against `world_size`:
    every split must be exact (a remainder's rows would be silently dropped)."""
    prefix = model.base_model_prefix
    plan = {f"{prefix}.{k}": v for k, v in (getattr(config, "base_model_tp_plan", None) or {}).items()}
    if world_size == 1:
        return plan
    if not plan:
        raise ValueError(f"{type(model).__name__} has no base_model_tp_plan: cannot shard it over {world_size} ranks")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % world_size or kv_heads % world_size:
        raise ValueError(f"{heads} attention / {kv_heads} KV heads do not split over {world_size} ranks")
    inter = getattr(config, "intermediate_size", 0) or 0
    if inter % world_size:
        raise ValueError(f"intermediate_size {inter} does not split over {world_size} ranks")
    return plan


def style_of(plan: dict[str, str], module_name: str) -> str | None:
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(module_name, pattern):
            return style
    return None


def join_rowwise_outputs(model, plan: dict[str, str], guard: CollectiveGuard) -> None:
    """Every row-wise layer's output is summed across the ranks (each holds a part of its input features)."""
    for name, module in model.named_modules():
        if style_of(plan, name) == "rowwise":
            module.register_forward_hook(lambda mod, args, out: guard.all_reduce(out))


def shard_of(slice_, style: str | None, param_name: str, rank: int, world: int):
    """This rank's part of one checkpoint tensor."""
    shape = slice_.get_shape()
    if style == "colwise":  # output features split: weight rows and bias
        n = shape[0] // world
        return slice_[rank * n : (rank + 1) * n]
    if style == "rowwise":
        if param_name == "bias":  # added once, after the sum across ranks
            full = slice_[:]
            return full if rank == 0 else torch.zeros_like(full)
        n = shape[1] // world
        return slice_[:, rank * n : (rank + 1) * n]
    return slice_[:]
