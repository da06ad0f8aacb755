"""The pre-flight memory guard: refuse a request whose KV cache and activations cannot fit, before prefill.

The common out-of-memory never reaches a rank: each rank reports, after loading, its free device memory and
what one token costs it (KV cache; transient prefill activations). A request needs, on every rank,
    (prompt + max_tokens) x kv_bytes_per_token + prompt x act_bytes_per_token
and must leave `headroom` of the free memory untouched (allocator fragmentation, CUDA workspaces).
Requests are served one at a time today, so the free memory measured after loading is what each request has.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class MemoryVerdict:
    fits: bool
    needed_bytes: int
    free_bytes: int
    rank: int | None

    def message(self, prompt_tokens: int, max_tokens: int) -> str:
        return (
            f"request needs about {self.needed_bytes / 2**20:.0f} MiB of device memory on rank {self.rank} "
            f"for {prompt_tokens} prompt + {max_tokens} completion tokens, but only {self.free_bytes / 2**20:.0f} "
            f"MiB is usable; lower max_tokens or shorten the prompt"
        )


def check(load_info: dict[int, dict], prompt_tokens: int, max_tokens: int, headroom: float = 0.1) -> MemoryVerdict:
    worst = MemoryVerdict(True, 0, 0, None)
    for rank, info in sorted(load_info.items()):
        if "free_bytes" not in info or "kv_bytes_per_token" not in info:
            continue
        needed = (prompt_tokens + max_tokens) * info["kv_bytes_per_token"] + prompt_tokens * info["act_bytes_per_token"]
        usable = int(info["free_bytes"] * (1 - headroom))
        if needed > usable:
            return MemoryVerdict(False, needed, usable, rank)
        if worst.rank is None or needed - usable > worst.needed_bytes - worst.free_bytes:
            worst = MemoryVerdict(True, needed, usable, rank)
    return worst
