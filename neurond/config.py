"""neurond's configuration: one dataclass, read in one place.

Precedence, lowest first: the dataclass defaults, the TOML file (default /etc/neurond/neurond.toml, or
`--config`), NEUROND_* environment variables (NEUROND_TP_SIZE=2 sets `tp_size`), then command-line flags.
Nothing else in neurond reads the environment for settings.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/neurond/neurond.toml")
ENV_PREFIX = "NEUROND_"


class ConfigError(ValueError):
    """A setting is unknown or has a value of the wrong type or range."""


@dataclass(slots=True)
class Config:
    # --- model ---
    #: Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer). Empty: the built-in model.
    model: str = ""
    #: The name clients pass as `model`; empty: the checkpoint directory's name.
    served_model_name: str = ""
    #: Where the built-in model is written on first use.
    cache_dir: str = "/var/cache/neurond"
    #: Weight dtype on the ranks: "auto" (checkpoint's own; float32 on CPU), "bfloat16", "float16", "float32".
    dtype: str = "auto"
    # --- ranks ---
    #: Number of rank worker processes (one per GPU).
    tp_size: int = 1
    #: "auto": NCCL when the ranks have GPUs, gloo otherwise; or "nccl" / "gloo" to force one.
    backend: str = "auto"
    #: "auto": CUDA if available in the worker, else CPU; or "cpu" / "cuda".
    device: str = "auto"
    #: Threads each rank computes with on a CPU device. 0: the machine's cores shared among the ranks. A box
    #: that runs other work beside the daemon wants fewer: a rank's threads wait for each other at every
    #: operation, so one thread descheduled by another process stalls them all (the test suite sets 1).
    cpu_threads: int = 0
    #: Seconds a rank may take to start and load its shard before it counts as failed.
    load_timeout_s: float = 600.0
    #: Seconds a loading rank may go without reporting progress (it reports as it reads its shard and as it
    #: warms up) before it counts as wedged: a stuck load is found this soon, whatever load_timeout_s allows.
    load_stall_timeout_s: float = 60.0
    # --- batching and the KV cache (allocated once per rank, at load) ---
    #: Sequences decoded together at most (KV cache slots); more requests wait in the queue.
    max_batch_size: int = 32
    #: Tokens per sequence at most, prompt + completion. 0: the model's own context window (its config's
    #: max_position_embeddings); a number above the window is capped by it.
    max_model_len: int = 0
    #: Positions per block of the paged KV cache (a power of two up to 256): the leader hands out the cache in
    #: blocks of this many.
    kv_block_size: int = 16
    #: Blocks in each rank's paged KV cache. -1 (the default): as many blocks as fit in
    #: gpu_memory_utilization of each GPU, measured at the first load (the least any rank fits; kept for the
    #: daemon's life); on a CPU, the static cache's memory. N: a pool of N blocks. Paged, max_batch_size slots
    #: share the pool, each sequence holding only the blocks its tokens fill; when the pool runs out, the
    #: requests admitted last are preempted and replayed later. On CUDA, attention reads the blocks in place
    #: (Triton kernels; decode within 4 % of the static cache at batch 32, faster at small batches; a fresh
    #: 12k prompt's prefill 3x faster than gathered; docs/benchmarks.md); on a CPU it reads them gathered. Full
    #: blocks are shared by requests whose context starts with the same tokens, and kept cached after their
    #: request ends until the blocks are needed (prefix caching: a repeated prompt prefills only what is new).
    #: 0: no paging, the static cache where every slot holds a whole sequence (max_batch_size x max_model_len
    #: positions, so set max_model_len: a 131,072-token window does not fit 32 slots; nothing is ever
    #: preempted, no prefix caching).
    kv_cache_blocks: int = -1
    #: With kv_cache_blocks = -1: the fraction of each GPU's memory a rank may fill (weights, the KV cache and
    #: what a step needs on top, measured by a prefill of prefill_chunk_tokens at the end of the context
    #: window), like vLLM's setting of the same name.
    gpu_memory_utilization: float = 0.9
    #: Long prompts are prefilled in chunks of this many tokens, between decode steps of running requests.
    prefill_chunk_tokens: int = 512
    #: Decode steps per call to the ranks while no request waits to be prefilled: the leader's round trip is
    #: paid once per this many tokens (tokens then stream in bursts of this many; a new request waits at most
    #: one call for its prefill). 1: a call per token. 8 measured 189 tok/s at batch 1 on an H200, 4: 182.
    decode_steps_per_call: int = 8
    #: Capture the decode step as CUDA graphs (GPU only; removes Python and kernel-launch overhead).
    cuda_graphs: bool = True
    #: Compile the decoder's elementwise pieces (residual add + RMSNorm, rotary, SiLU x up) into one Triton
    #: kernel each with torch.compile (CUDA devices only): ~1.25x batch-1 decode. Costs ~6 s at the first load
    #: on a machine; later loads (restarts, recoveries) reuse the compiled kernels from cache_dir.
    torch_compile: bool = True
    #: Worker processes kept started ahead of need (torch and transformers imported, no device held), so a rank
    #: replaced in a repair skips its imports (13-15 s of a full reload on an H200). 0: none. Two: a second
    #: fault within ~15 s of the first (its spare's replacement still importing) finds one ready too; with one,
    #: the second replacement took 15.5 s instead of 7.5 s (8B, 2xH100, benchmarks.md).
    spare_workers: int = 2
    #: Fork rank processes from one process that imported torch and transformers once (the worker zygote)
    #: instead of starting each from scratch: a replaced rank or a spare is ready in milliseconds, not seconds
    #: of imports. "all": CUDA ranks too (the GPU fault matrix at TP=1 and 2 passed with it on H200s,
    #: benchmarks.md, session 12; a zygote whose forks could not use CUDA is noticed and not used). "cpu": CPU
    #: ranks only (device cpu, or auto on a machine without an NVIDIA driver). "off": never.
    worker_zygote: str = "all"
    #: Times a request may be in a step that faulted before it is quarantined (failed, not replayed again).
    max_request_faults: int = 2
    # --- HTTP ---
    #: Address the HTTP API listens on.
    host: str = "127.0.0.1"
    #: Port the HTTP API listens on.
    port: int = 8000
    #: Largest request body accepted, in bytes (413 beyond).
    max_body_bytes: int = 1_048_576
    #: File holding the API bearer token; empty: no authentication. (A file, never a flag: flags show in ps.)
    #: Refused at start when others may read it or anyone but its owner may write it: mode 0600 (0640 with
    #: owner root, for the service's group), owned by root or by the user neurond runs as.
    api_token_file: str = ""
    #: Serve the API on a host other than a loopback address without api_token_file: anyone who reaches the
    #: port may then generate. Off: such a configuration is refused at start (exit code 2); on: a warning at
    #: every start. (For a port kept private by other means: a firewall, a proxy that authenticates.)
    allow_unauthenticated: bool = False
    #: Concurrent /v1 requests at most; beyond this, 429 with Retry-After.
    max_concurrent_requests: int = 512
    #: Open connections to the API port at most, idle keep-alive and half-sent ones included; one more gets 503
    #: and is closed. More than max_concurrent_requests (probes and scrapes still get in); the leader raises its
    #: open-file limit to fit, or refuses to start.
    max_connections: int = 1024
    #: Of max_connections, the places one client address may hold (an IPv6 client: its /64), so that one
    #: client can never lock the others out (api/connections.py). Half of max_connections, as many as
    #: max_concurrent_requests: a load balancer or proxy in front, whose few addresses carry every request,
    #: can still use every request slot. Raise it for a proxy that keeps more connections open than that.
    max_connections_per_peer: int = 512
    #: Of max_connections, the places kept for this host's own peers (loopback addresses, or the machine's own
    #: address): once the others are taken, a health probe, a metrics scrape or `curl localhost` from the host
    #: still gets in. Not limited per peer. 32: probes and scrapes hold a connection for a moment each.
    connection_reserve: int = 32
    #: Seconds a client gets to send its whole request body (408 beyond).
    body_timeout_s: float = 30.0
    #: Largest request head (request line + headers), in bytes.
    max_header_bytes: int = 16384
    #: max_tokens for a request that gives none (capped by what is left of the context window).
    default_max_tokens: int = 512
    #: Seconds a request interrupted or queued when a fault hits waits for the repair before it gets a 503.
    #: Above the slowest repair (a full reload of an 8B rank on an H200: 24-31 s, benchmarks.md), so an
    #: interrupted stream continues rather than fails.
    resume_wait_s: float = 60.0
    #: Requests waiting for the engine at once; beyond this, 503 with Retry-After.
    max_queued_requests: int = 256
    # --- step deadlines (a step that does not finish in time counts as a wedged rank) ---
    #: Never declare a step wedged sooner than this. 4 s: a wedged rank is then found within 5 s of its fault
    #: (the ping and the abort follow the deadline), while a healthy 8B decode call takes ~50 ms.
    step_deadline_floor_s: float = 4.0
    #: Never wait longer than this for one step, whatever the observed step times.
    step_deadline_ceiling_s: float = 60.0
    #: Deadline = max(floor, factor x the expected time of the step), capped by the ceiling (engine/deadline.py).
    step_deadline_factor: float = 20.0
    #: Seconds the control threads get to abort their communicators before the ranks are killed.
    abort_timeout_s: float = 5.0
    #: Seconds forming a communicator may take (rendezvous, NCCL init and its first collective; ~0.2-0.6 s at
    #: TP=2 on NVLink) before the ranks that did not join count as failed.
    comm_timeout_s: float = 30.0
    # --- crash-loop breaker: give up (state `unloaded`) after this many recoveries within the window ---
    #: Failed recovery attempts within the window that make the daemon give up (state `unloaded`).
    breaker_max_failures: int = 5
    #: The breaker's window, in seconds.
    breaker_window_s: float = 600.0
    #: Seconds to wait after a failed recovery attempt before the next one, doubled after every further
    #: failure up to recovery_backoff_max_s. A cause that outlives one attempt (GPU memory still held by a
    #: dying process, a checkpoint's filesystem coming back) gets time to pass, and a rank that dies at every
    #: start does not spin through the breaker's attempts in seconds. 0: no wait.
    recovery_backoff_s: float = 1.0
    #: The longest wait between two recovery attempts, in seconds.
    recovery_backoff_max_s: float = 30.0
    #: In `unloaded` after the breaker gave up: serve 503 with the reason for this many seconds, then exit with
    #: code 4 so systemd's Restart= starts a fresh daemon (its StartLimit ends a crash loop). 0: never exit.
    unloaded_exit_s: float = 30.0
    # --- admin API (reload/unload/fault injection): off unless admin_socket is set ---
    #: Unix socket path for the admin API; empty: no admin API. Never a TCP address.
    admin_socket: str = ""
    #: File holding the admin bearer token (required when admin_socket is set).
    admin_token_file: str = ""
    #: Allow fault injection through the admin API (for tests and recovery rehearsals).
    fault_injection: bool = False
    # --- shutdown ---
    #: Seconds a rank gets after SIGTERM before SIGKILL.
    kill_grace_s: float = 5.0
    # --- logging ---
    #: debug, info, warning or error.
    log_level: str = "info"

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if self.model else "neurond-builtin"

    def validate(self) -> Config:
        if self.tp_size < 1:
            raise ConfigError(f"tp_size must be >= 1, got {self.tp_size}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"backend must be auto, nccl or gloo, got {self.backend!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.worker_zygote not in ("cpu", "all", "off"):
            raise ConfigError(f"worker_zygote must be cpu, all or off, got {self.worker_zygote!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ConfigError(f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1..65535, got {self.port}")
        if self.admin_socket and not os.path.isabs(self.admin_socket):
            raise ConfigError(f"admin_socket must be the absolute path of a unix socket (the admin API never "
                              f"listens on TCP), got {self.admin_socket!r}")
        if self.admin_socket and not self.admin_token_file:
            raise ConfigError("admin_socket needs admin_token_file (the admin API always requires a token)")
        if self.fault_injection and not self.admin_socket:
            raise ConfigError("fault_injection needs admin_socket: faults are injected only through the admin API")
        if not 0 <= self.recovery_backoff_s <= self.recovery_backoff_max_s:
            raise ConfigError("need 0 <= recovery_backoff_s <= recovery_backoff_max_s")
        if self.max_batch_size < 1 or self.max_model_len == 1 or self.max_model_len < 0 \
                or self.prefill_chunk_tokens < 1:
            raise ConfigError("need max_batch_size >= 1, max_model_len >= 2 (or 0: the model's window) and "
                              "prefill_chunk_tokens >= 1")
        if not 1 <= self.kv_block_size <= 256 or self.kv_block_size & (self.kv_block_size - 1) \
                or self.kv_cache_blocks < -1:
            raise ConfigError("need kv_block_size a power of two up to 256 and kv_cache_blocks >= -1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        if self.decode_steps_per_call < 1:
            raise ConfigError("decode_steps_per_call must be >= 1")
        if self.max_request_faults < 1:
            raise ConfigError("max_request_faults must be >= 1")
        if self.load_stall_timeout_s <= 0:
            raise ConfigError("load_stall_timeout_s must be > 0")
        if self.cpu_threads < 0:
            raise ConfigError("cpu_threads must be >= 0")
        if self.spare_workers < 0:
            raise ConfigError("spare_workers must be >= 0")
        if self.max_concurrent_requests < 1:
            raise ConfigError("max_concurrent_requests must be >= 1")
        if self.max_connections <= self.max_concurrent_requests:
            raise ConfigError(f"max_connections ({self.max_connections}) must exceed max_concurrent_requests "
                              f"({self.max_concurrent_requests}): with every request slot taken, health probes and "
                              f"metrics scrapes still need a connection")
        if self.max_connections_per_peer < 1:
            raise ConfigError("max_connections_per_peer must be >= 1")
        if not 0 <= self.connection_reserve < self.max_connections:
            raise ConfigError(f"connection_reserve ({self.connection_reserve}) must be >= 0 and below "
                              f"max_connections ({self.max_connections}): clients from other hosts need places too")
        if not self.api_token_file and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ConfigError(f"host = {self.host!r} serves the API beyond this machine, and no api_token_file is set: "
                              f"anyone who reaches port {self.port} could use the model. Set api_token_file (a file "
                              f"holding the bearer token, mode 0600), or allow_unauthenticated = true if the port is "
                              f"kept private by other means (a firewall, an authenticating proxy)")
        if not 0 < self.step_deadline_floor_s <= self.step_deadline_ceiling_s:
            raise ConfigError("need 0 < step_deadline_floor_s <= step_deadline_ceiling_s")
        return self


def is_loopback(host: str) -> bool:
    """The API's `host` is reachable from this machine only: a loopback address, or `localhost`. Anything else
    (0.0.0.0, ::, an interface's address, a name that may resolve to one) counts as reachable from outside."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a TOML/env/flag value into the field's type, with an error that names the source."""
    kind = type(getattr(Config(), name))
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int and isinstance(value, float):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be a {kind.__name__}, got {value!r}") from None


#: Settings that no longer exist: (the one value still accepted, as a no-op; why the others are gone).
RETIRED = {
    "tp_impl": ("neurond", "tensor parallelism is neurond's own (worker/tp.py); transformers' tp_plan=\"auto\" "
                           "bound every rank to the group it loaded with, so any fault at TP>1 took a full reload"),
}


def load_config(
    path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the one Config: defaults < TOML file < NEUROND_* env < overrides (the command-line flags).

    `path=None` reads DEFAULT_CONFIG_PATH if it exists; an explicit path must exist.
    """
    env = os.environ if env is None else env
    known = _fields()
    values: dict[str, Any] = {}

    file_path = Path(path) if path is not None else env.get(ENV_PREFIX + "CONFIG") or None
    if file_path is not None and not Path(file_path).exists():
        raise ConfigError(f"config file {file_path} does not exist")
    file_path = Path(file_path) if file_path else (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
    if file_path is not None:
        try:
            data = tomllib.loads(file_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file_path}: {exc}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name in RETIRED:
                if value != RETIRED[name][0]:
                    raise ConfigError(f"{file_path}: {key} = {value!r} is no longer supported: {RETIRED[name][1]}")
                continue  # its one remaining value is what neurond does anyway
            if name not in known:
                raise ConfigError(f"{file_path}: unknown setting {key!r}")
            values[name] = _coerce(name, value, str(file_path))

    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name in known:
            values[name] = _coerce(name, value, key)

    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in known:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = _coerce(name, value, "--" + name.replace("_", "-"))

    return Config(**values).validate()


@dataclass(frozen=True, slots=True)
class Setting:
    """One field of Config as documented in this file: the `#:` comment above it and its `# --- section ---`."""

    name: str
    default: Any
    section: str
    comment: str


def settings() -> list[Setting]:
    """Every setting, in the order of Config, with the comments written above it in this file: the one source
    of `--help`, the default /etc/neurond/neurond.toml and the option table of docs/operator-guide.md."""
    import inspect
    import re

    comments: dict[str, tuple[str, str]] = {}
    section = ""
    pending: list[str] = []  # the comment lines above the next field
    for line in inspect.getsource(Config).splitlines():
        stripped = line.strip()
        heading = re.fullmatch(r"# --- (.+?) ---", stripped)
        if heading:
            section, pending = heading.group(1), []
        elif stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
        elif re.match(r"[a-z_]+: ", stripped):
            comments[stripped.split(":", 1)[0]] = (section, " ".join(pending))
            pending = []
        else:
            pending = []
    return [Setting(f.name, f.default, *comments.get(f.name, ("", "")))
            for f in dataclasses.fields(Config)]


def describe_settings() -> str:
    """One line per setting for `--help`: name, default and the comment above it in this file."""
    return "\n".join(f"  {s.name} = {s.default!r}  {s.comment}".rstrip() for s in settings())


__all__ = ["Config", "ConfigError", "Setting", "load_config", "settings", "describe_settings", "DEFAULT_CONFIG_PATH"]
