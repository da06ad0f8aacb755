"""Tensor parallelism of neurond's own: load this rank's shard and all-reduce through the default group.

Why not transformers' `tp_plan="auto"`: its layers hold DTensor parameters on the device mesh they were
loaded with and all-reduce on that mesh's group, so after a communicator is aborted and rebuilt every surviving
rank would have to be re-pointed at a new mesh, and a replacement rank's loading creates mesh sub-groups
(collective calls) that the survivors would have to mirror. Here every collective is
`dist.all_reduce(x)` on the *default* group: rebuilding the communicator is `init_process_group` again, and a
replaced rank loads its shard without any collective. It is also lighter per step (no DTensor dispatch):
measured in docs/benchmarks.md.

The model code knows nothing about this (as in gpt-fast's tp.py): the model's own `base_model_tp_plan` says
which linear layers are column-wise (q/k/v, gate/up: output features split) and row-wise (o, down: input
features split, outputs summed across ranks by a forward hook). Everything else is replicated.
Only the shard's bytes are read from the safetensors files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("neurond.worker")

# A slow load reports at most this often (the leader turns reports into STATUS= and journal entries).
PROGRESS_INTERVAL_S = 1.0
# Bytes per element of safetensors' dtype names (progress counting only).
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


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


def _style(plan: dict[str, str], module_name: str) -> str | None:
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(module_name, pattern):
            return style
    return None


def checkpoint_dtype(config, dtype):
    """`dtype`, or for "auto" the checkpoint's own (bf16 when its config names none)."""
    if dtype != "auto":
        return dtype
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_shard(model_dir: str, device, dtype, rank: int, world_size: int, guard: CollectiveGuard, progress=None):
    """This rank's shard of the checkpoint as a model. `progress(done_bytes, total_bytes, files_done, files_total)`,
    when given, is called on this thread at the start, while bytes arrive (at most every PROGRESS_INTERVAL_S)
    and at the end."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    dtype = checkpoint_dtype(config, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefix = model.base_model_prefix
    plan = {f"{prefix}.{k}": v for k, v in (getattr(config, "base_model_tp_plan", None) or {}).items()}
    if world_size > 1 and not plan:
        raise ValueError(f"{type(model).__name__} has no base_model_tp_plan: cannot shard it over {world_size} ranks")
    if world_size > 1:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads % world_size or kv_heads % world_size:
            raise ValueError(f"{heads} attention / {kv_heads} KV heads do not split over {world_size} ranks")
        inter = getattr(config, "intermediate_size", 0) or 0
        if inter % world_size:  # a column split would silently drop the remainder's rows
            raise ValueError(f"intermediate_size {inter} does not split over {world_size} ranks")

    modules = dict(model.named_modules())
    wanted = {name for name, _ in model.named_parameters()}
    loaded: set[str] = set()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    read = [0]  # checkpoint bytes covered so far: whole tensors, so every rank counts toward the file sizes
    read_lock = threading.Lock()

    def load_file(file: Path) -> list[tuple[str, object]]:
        out = []
        with safe_open(str(file), framework="pt", device="cpu") as f:  # memory-mapped: slicing reads only it
            for key in f.keys():
                slice_ = f.get_slice(key)
                if key in wanted:
                    module_name, _, param_name = key.rpartition(".")
                    style = _style(plan, module_name) if world_size > 1 else None
                    tensor = _read(slice_, style, param_name, rank, world_size)
                    out.append((key, tensor.to(device=device, dtype=dtype)))
                with read_lock:
                    read[0] += math.prod(slice_.get_shape()) * _DTYPE_BYTES.get(slice_.get_dtype(), 2)
        return out

    sizes = [file.stat().st_size for file in files]
    total, files_done = sum(sizes), 0
    reported = (0, 0)  # the first report's: a wake-up before any byte arrived must not repeat it
    if progress is not None:
        progress(0, total, 0, len(files))
    # One thread per file: page-cache reads and host-to-device copies release the GIL and overlap. (One
    # synchronous copy at a time from a device-side safe_open took 10.6 s for an 8B checkpoint on an H200,
    # from a CPU-side one 7.4 s, where transformers' own loader takes 2.5-2.8 s.) This thread reports every
    # PROGRESS_INTERVAL_S while bytes arrive, and only then: the leader takes silence as a stalled load.
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        pending = {pool.submit(load_file, file) for file in files}
        while pending:
            done, pending = wait(pending, timeout=PROGRESS_INTERVAL_S, return_when=FIRST_COMPLETED)
            for future in done:
                files_done += 1
                for key, tensor in future.result():
                    module_name, _, param_name = key.rpartition(".")
                    modules[module_name]._parameters[param_name] = torch.nn.Parameter(tensor, requires_grad=False)
                    loaded.add(key)
            now = (total if not pending else min(read[0], total), files_done)
            if progress is not None and now != reported:
                reported = now
                progress(now[0], total, files_done, len(files))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        loaded.update(name for name, p in model.named_parameters() if not p.is_meta)
    missing = sorted(wanted - loaded - {n for n, p in model.named_parameters() if not p.is_meta})
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
    _rebuild_buffers(model, config, device)

    if world_size > 1:
        for name, module in modules.items():
            if _style(plan, name) == "rowwise":
                module.register_forward_hook(lambda mod, args, out: guard.all_reduce(out))
    model.eval()
    return model


def _read(slice_, style: str | None, param_name: str, rank: int, world: int):
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


def _rebuild_buffers(model, config, device) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in checkpoints: make them on the device."""
    for name, module in model.named_modules():
        meta_buffers = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
        if not meta_buffers:
            continue
        if name.endswith("rotary_emb"):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model

            with torch.device(device):  # the constructor's own buffers land on the device
                setattr(parent, attr, type(module)(config=config))
        else:
            raise ValueError(f"buffer(s) {meta_buffers} of {name} are in no checkpoint and cannot be rebuilt")
