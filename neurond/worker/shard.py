"""A rank's model shard: loading, forward steps, sampling.

The model code knows nothing about tensor parallelism. Loading goes through neurond's own sharding
(`worker/tp.py`, the default: collectives on the default group, so a communicator can be rebuilt and a rank
replaced without touching the survivors' weights) or, with `tp_impl = "transformers"`, through transformers'
`tp_plan="auto"` (kept for comparison; its ranks are bound to the group they loaded with). One code path for
1..N ranks.
"""

from __future__ import annotations

import os

from neurond.pool.protocol import SamplingParams


def pick_device(requested: str, rank: int):
    import torch

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


def _dtype(name: str, device):
    import torch

    if name == "auto":
        # CPU kernels for half types are slow and imprecise; a real checkpoint keeps its own dtype on GPU.
        return torch.float32 if device.type == "cpu" else "auto"
    return getattr(torch, name)


class Shard:
    """This rank's part of the model plus per-sequence KV caches and (rank 0) samplers."""

    def __init__(self, model_dir: str, dtype: str, device, rank: int, world_size: int, mid_forward=None,
                 tp_impl: str = "neurond", guard=None) -> None:
        self.tp_impl = tp_impl
        self.guard = guard
        self.model_dir = model_dir
        self.dtype = dtype
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.model = None
        self._caches: dict[int, object] = {}
        self._generators: dict[int, object] = {}
        self._sampling: dict[int, SamplingParams] = {}
        self._mid_forward = mid_forward  # called between two decoder layers (fault injection's "collective")

    # ------------------------------------------------------------------ load
    def load(self, progress=None) -> dict:
        """`progress(done_bytes, total_bytes, files_done, files_total)` as checkpoint files are read (neurond's
        own sharding only; transformers' loader reports nothing)."""
        import torch
        from transformers import AutoModelForCausalLM

        if self.tp_impl == "neurond":
            from neurond.worker.tp import load_shard

            model = load_shard(self.model_dir, self.device, _dtype(self.dtype, self.device), self.rank,
                               self.world_size, self.guard, progress)
        else:
            kwargs: dict = {"dtype": _dtype(self.dtype, self.device)}
            if self.world_size > 1:
                # transformers binds each rank to the device LOCAL_RANK names.
                os.environ["LOCAL_RANK"] = str(self.device.index or 0)
                kwargs.update(_tp_kwargs(self.world_size))
            else:
                kwargs["device_map"] = str(self.device)
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, **kwargs)
        model.eval()
        layers = getattr(getattr(model, "model", None), "layers", None)
        if self._mid_forward is not None and layers is not None and len(layers) > 1:
            layers[len(layers) // 2].register_forward_pre_hook(lambda module, args: self._mid_forward())
        self.model = model
        return self.memory_info()

    def memory_info(self) -> dict:
        """What the leader's pre-flight memory guard needs: free bytes and the cost of one more token."""
        import torch

        cfg = self.model.config
        elem = next(self.model.parameters()).element_size()
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        kv_local = max(1, kv_heads // self.world_size)
        info = {
            "dtype": str(next(self.model.parameters()).dtype),
            # K and V, every layer, this rank's heads
            "kv_bytes_per_token": 2 * cfg.num_hidden_layers * kv_local * head_dim * elem,
            # transient activations of one token in a prefill (hidden states, MLP intermediates), generous
            "act_bytes_per_token": (6 * cfg.hidden_size + 3 * cfg.intermediate_size // self.world_size) * elem,
        }
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            info.update(free_bytes=free, total_bytes=total, allocated_bytes=torch.cuda.memory_allocated(self.device))
        else:
            info["free_bytes"] = _mem_available()
        return info

    # ------------------------------------------------------------------ steps
    def prefill(self, seq_id: int, token_ids: tuple[int, ...], sampling: SamplingParams) -> int | None:
        import torch

        self.release(seq_id)
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        logits, cache = self._forward(ids, None)
        self._caches[seq_id] = cache
        if self.rank != 0:
            return None
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=self.device)
            if sampling.seed is not None:
                generator.manual_seed(sampling.seed)
            else:
                generator.seed()
        self._generators[seq_id] = generator
        self._sampling[seq_id] = sampling
        return self._sample(seq_id, logits)

    def decode(self, seq_id: int, token_id: int) -> int | None:
        import torch

        cache = self._caches.get(seq_id)
        if cache is None:
            raise KeyError(f"sequence {seq_id} has no KV cache on rank {self.rank}")
        ids = torch.tensor([[token_id]], dtype=torch.long, device=self.device)
        logits, cache = self._forward(ids, cache)
        self._caches[seq_id] = cache
        if self.rank != 0:
            return None
        return self._sample(seq_id, logits)

    def release(self, seq_id: int) -> None:
        self._caches.pop(seq_id, None)
        self._generators.pop(seq_id, None)
        self._sampling.pop(seq_id, None)

    def release_all(self) -> None:
        self._caches.clear()
        self._generators.clear()
        self._sampling.clear()

    def _forward(self, ids, cache):
        import torch

        with torch.inference_mode():
            # logits_to_keep=1: only the last position's logits (a full [prompt x vocab] tensor would dwarf
            # the KV cache for long prompts).
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits
        if hasattr(logits, "full_tensor"):  # a DTensor when the plan leaves logits sharded
            logits = logits.full_tensor()
        return logits[0, -1].float(), out.past_key_values

    def _sample(self, seq_id: int, logits) -> int:
        import torch

        sampling = self._sampling[seq_id]
        if sampling.temperature < MIN_TEMPERATURE:
            # Below this, logits / temperature overflows to inf (NaN probabilities); it is greedy in effect.
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = cumulative - sorted_probs >= sampling.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generators[seq_id]).item())


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# A request's temperature below this samples greedily (found by schemathesis: temperature=1e-300 made the
# softmax NaN and the step fail).
MIN_TEMPERATURE = 1e-4


def _tp_kwargs(world_size: int) -> dict:
    """transformers' own tensor parallelism, in the form the installed version takes."""
    try:
        from transformers.distributed import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=world_size)}
    except (ImportError, TypeError):
        return {"tp_plan": "auto"}
