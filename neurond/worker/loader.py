"""The checkpoint loader: this rank's shard of a Hugging Face safetensors checkpoint, as a transformers model.

The model is made on the meta device from its config, then each parameter is read from the memory-mapped
files, only this rank's part of it (`tp.shard_of` with the model's plan), straight to the device. Progress is
reported as bytes arrive: the leader takes a loading rank's silence as a stalled load (`load_stall_timeout_s`).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import torch

from neurond.worker.tp import CollectiveGuard, join_rowwise_outputs, plan_of, shard_of, style_of

# A slow load reports at most this often (the leader turns reports into STATUS= and journal entries).
PROGRESS_INTERVAL_S = 1.0
# Bytes per element of safetensors' dtype names (progress counting only).
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


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
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    dtype = checkpoint_dtype(config, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plan = plan_of(model, config, world_size)

    wanted = {name for name, _ in model.named_parameters()}
    loaded = _load_parameters(model, model_dir, wanted, plan, device, dtype, rank, world_size, progress)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        loaded.update(name for name, p in model.named_parameters() if not p.is_meta)
    missing = sorted(wanted - loaded - {n for n, p in model.named_parameters() if not p.is_meta})
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
    _rebuild_buffers(model, config, device)

    if world_size > 1:
        join_rowwise_outputs(model, plan, guard)
    model.eval()
    return model


def _load_parameters(model, model_dir: str, wanted: set[str], plan, device, dtype, rank: int, world_size: int,
                     progress) -> set[str]:
    """Read this rank's part of every `wanted` parameter from the checkpoint's files into `model` (on the meta
    device until then), reporting progress as `load_shard` says. Returns the names of the parameters read."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
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
                    style = style_of(plan, module_name) if world_size > 1 else None
                    tensor = shard_of(slice_, style, param_name, rank, world_size)
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
    return loaded


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
