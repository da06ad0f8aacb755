"""The typed messages between the leader and its rank workers.

Two channels per rank, each a multiprocessing Pipe:
- the *step* channel carries commands the rank's compute thread runs in order (open a store, join a
  communicator, load the shard, prefill a chunk, decode a batch, shut down) and their replies;
- the *control* channel is served by a separate thread in the worker, so it keeps answering while the compute
  thread is stuck inside a collective: ping (heartbeat) and abort-your-communicator go down it.

Every command carries a `call_id`; every reply names the call it answers and the rank that sent it. The pool
generation is part of the call id's namespace on the leader, so a late reply from an older pool is dropped.
This module must not import torch: the leader imports it and never touches CUDA.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FaultKind(str, enum.Enum):
    """Why a rank could not finish a call. Carried in StepFailed and used for the request's error code."""

    EXCEPTION = "exception"  # any Python exception inside the step
    OUT_OF_MEMORY = "out_of_memory"  # torch.cuda.OutOfMemoryError, or MemoryError on CPU
    CUDA_ERROR = "cuda_error"  # a CUDA error; sticky ones ruin the process's context
    COMM_ABORTED = "comm_aborted"  # the communicator was aborted under the step (the step's result is void)


# The fault-injection vocabulary (worker/faults.py injects them; the supervisor's admin API arms them): what a
# fault does, and where in a rank's work it fires.
FAULT_KINDS = ("raise", "oom", "exit", "sigkill", "segfault", "wedge", "hang_kernel", "cuda_error")
FAULT_PHASES = ("load", "prefill", "decode", "collective")


# ---------------------------------------------------------------- step channel: commands


# A request's temperature below this samples greedily (found by schemathesis: temperature=1e-300 made the
# softmax NaN and the step fail).
MIN_TEMPERATURE = 1e-4


# The most alternatives per token a request may ask log-probabilities of (OpenAI's top_logprobs bound).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class Grammar:
    """What a constrained sequence may generate: an llguidance grammar (from a JSON schema, or Lark with JSON
    schemas inside), and the tokens that end the sequence once the grammar is complete. Every rank runs the same
    matcher over the same tokens, so every rank masks the same logits."""

    text: str
    end_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How a sequence's next tokens are drawn. Applied to the model's logits in this order: `logit_bias` is
    added, the penalties subtract `presence_penalty` once and `frequency_penalty` per occurrence for each token
    the sequence has generated so far, then the token is drawn (greedily, or with temperature and top_p).
    `logprobs`: -1 none; k >= 0 the drawn token's log-probability and the k likeliest alternatives', from the
    model's own distribution (before bias, penalties, temperature and top_p). `grammar`: only tokens it allows
    can be drawn (after the penalties: a disallowed token is never drawn, whatever its bias)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # the leader gives every sampled request one, so replays and ranks agree
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids sorted
    logprobs: int = -1
    grammar: Grammar | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        """Whether the tokens generated so far matter to the next draw."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def needs_history(self) -> bool:
        """Whether a replay must tell the rank what the sequence generated before (penalty counts, the grammar
        matcher's state)."""
        return self.penalized or self.grammar is not None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to apply or report: the argmax a decode graph computes is the answer."""
        return self.temperature < MIN_TEMPERATURE and not self.penalized and not self.logit_bias \
            and self.logprobs < 0 and self.grammar is None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A drawn token's log-probability and its likeliest alternatives (token id, log-probability), best first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class OpenStore:
    """Rank 0 only: open a fresh rendezvous store on an OS-chosen port and report it."""

    call_id: int


@dataclass(frozen=True, slots=True)
class JoinComm:
    """Form a new process group on the store at host:port (a fresh store for each communicator)."""

    call_id: int
    comm_id: int
    host: str
    port: int
    timeout_s: float


@dataclass(frozen=True, slots=True)
class LoadShard:
    call_id: int


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Tokens of one sequence to write into its KV cache slot at positions [start, start + len). On the
    sequence's last chunk the rank draws its next token (number `drawn`: a replayed sequence continues where it
    was) and the slot is ready to decode."""

    slot: int
    token_ids: tuple[int, ...]
    start: int
    last: bool
    sampling: SamplingParams
    drawn: int = 0
    #: On a last chunk of a sequence with penalties or a grammar: the tokens it generated before (a replay
    #: continues with the same counts and the same grammar state).
    history: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class BlockRow:
    """Where a slot's sequence lives in the rank's paged KV cache: position p is in block `blocks[p //
    block_size - start]` for columns start.. of the row. start=0 rewrites the whole row: columns past `blocks`
    then point nowhere (writes there land in the trash block, reads there are masked). The leader owns the
    blocks (engine/blocks.py), so every rank's table is the same."""

    slot: int
    start: int
    blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CopyPrefix:
    """Copy the first `length` cache positions of slot `src` into slots `dsts`: a prompt shared by a request's
    n choices is prefilled once (no collective: every rank copies its own shard)."""

    call_id: int
    src: int
    dsts: tuple[int, ...]
    length: int
    tables: tuple[BlockRow, ...] = ()  # applied before the copy


@dataclass(frozen=True, slots=True)
class Prefill:
    """Prefill chunks of one or more sequences in one forward pass. Rank 0 reports, in Done.tokens, one entry
    per chunk: the drawn token for a last chunk, -1 for the others."""

    call_id: int
    chunks: tuple[PrefillChunk, ...]
    tables: tuple[BlockRow, ...] = ()  # applied before the forward


@dataclass(frozen=True, slots=True)
class Decode:
    """`steps` decode steps for the sequences in `slots`, each fed its last drawn token (kept on the ranks);
    rank 0 reports the tokens step by step, each step's in the order of `slots` (steps x len(slots) in all)."""

    call_id: int
    slots: tuple[int, ...]
    steps: int = 1
    tables: tuple[BlockRow, ...] = ()  # applied before the first step


@dataclass(frozen=True, slots=True)
class Shutdown:
    call_id: int


StepCommand = OpenStore | JoinComm | LoadShard | Prefill | Decode | CopyPrefix | Shutdown

# ---------------------------------------------------------------- control channel: commands


@dataclass(frozen=True, slots=True)
class Ping:
    call_id: int


@dataclass(frozen=True, slots=True)
class AbortComm:
    """Abort the rank's communicator from the control thread, unblocking a compute thread stuck in it."""

    call_id: int


@dataclass(frozen=True, slots=True)
class InjectFault:
    """Arm a fault on this rank (fault injection must be enabled in the config). Answered with Done."""

    call_id: int
    kind: str
    phase: str
    count: int = 1
    after: int = 0  # let this many calls of the phase pass first (a fault deep into a request)


ControlCommand = Ping | AbortComm | InjectFault

# ---------------------------------------------------------------- replies (both channels)


@dataclass(frozen=True, slots=True)
class Imported:
    """Sent once, unprompted, on the control pipe when a worker process has done its imports, before it reads
    its spec: a spare that sent it can become a rank at once (pool/spares.py prefers those)."""

    pid: int


@dataclass(frozen=True, slots=True)
class Started:
    """Sent once, unprompted, when the worker has imported its libraries and is ready for commands."""

    rank: int
    pid: int
    device: str
    backend: str


@dataclass(frozen=True, slots=True)
class StoreOpened:
    call_id: int
    rank: int
    port: int


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a rank made of its LoadShard: the leader agrees on the KV cache's size from `kv_cache_blocks`; the
    rest is for the journal, the admin status and the benchmarks."""

    kv_cache_blocks: int  # blocks its paged KV cache holds (0: the static cache)
    kv_block_size: int
    kv_cache_bytes: int
    kv_layout: str  # "paged" | "slots"
    kv_reads: str  # "in_place" | "gathered" | "view"
    dtype: str  # of the weights, as torch names it
    cuda_graphs: bool  # decode graphs are used (captured at load or on first use)
    own_layers: bool  # neurond's decoder layers run (else transformers')
    compiled_kernels: bool
    load_s: float  # reading the shard
    graph_capture_s: float  # the warm-up after it
    free_bytes: int | None = None  # device memory (host memory on a CPU) free once loaded
    total_bytes: int | None = None
    allocated_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Done:
    """A call finished. `tokens`: the tokens drawn by a Prefill's last chunk or a Decode, on rank 0. `loaded`:
    a LoadShard's report."""

    call_id: int
    rank: int
    tokens: tuple[int, ...] = ()
    duration_s: float = 0.0
    loaded: LoadReport | None = None
    #: One entry per token in `tokens`: its TokenLogprob where the sequence asked for them, else None.
    logprobs: tuple[TokenLogprob | None, ...] = ()


@dataclass(frozen=True, slots=True)
class StepFailed:
    """A call failed inside the rank; the rank itself is still alive and answering.

    `context_ok` is False when the rank's device context is ruined (a sticky CUDA error): only replacing the
    process repairs it.
    """

    call_id: int
    rank: int
    kind: FaultKind
    message: str
    context_ok: bool = True


@dataclass(frozen=True, slots=True)
class Pong:
    call_id: int
    rank: int
    busy_s: float  # how long the compute thread has been inside its current call (0 when idle)
    in_collective: bool = False  # busy waiting for peers inside a collective (not wedged in its own work)
    outside_s: float = 0.0  # of busy_s, how long since the call began or its last collective returned


@dataclass(frozen=True, slots=True)
class Aborted:
    call_id: int
    rank: int
    ok: bool
    duration_s: float
    message: str = ""


@dataclass(frozen=True, slots=True)
class LoadProgress:
    """Sent unprompted on the step channel while LoadShard runs (as checkpoint files finish, rate-limited): how
    much of the checkpoint this rank has read. Bytes are of the files, not of the slices this rank keeps (every
    rank reads its slices of every file). Answers no call: the leader only shows it."""

    rank: int
    done_bytes: int
    total_bytes: int
    files_done: int
    files_total: int


Reply = Started | StoreOpened | Done | StepFailed | Pong | Aborted | LoadProgress


# ---------------------------------------------------------------- what the leader gives each worker at spawn

#: WorkerSpec.kv_cache_blocks that asks each rank to make as many blocks as fit its GPU.
KV_BLOCKS_FROM_MEMORY = -1


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a rank is told at spawn (pool/specs.py makes them). Settings keep their configuration's names,
    but `context_len`: the served context window, resolved from the model and max_model_len."""

    rank: int
    world_size: int
    model_dir: str
    dtype: str  # "auto" | "bfloat16" | "float16" | "float32"
    device: str  # "auto" | "cpu" | "cuda"
    backend: str  # "auto" | "nccl" | "gloo"
    #: Environment the worker process is started with (NCCL settings and the like; a spare is started with it
    #: before its spec exists, so every rank's is the same).
    env: tuple[tuple[str, str], ...] = ()
    log_level: str = "info"
    #: Faults armed before the process starts (kind, phase, count): how a load-phase fault is injected.
    faults: tuple[tuple[str, str, int], ...] = ()
    fault_injection: bool = False
    max_batch_size: int = 8  # KV cache slots: sequences decoded together at most
    context_len: int = 2048  # tokens per sequence at most (prompt + completion)
    kv_block_size: int = 16  # positions per block of the paged KV cache
    #: Blocks in the paged KV cache. 0: the static cache, every slot context_len positions of its own. -1: as many
    #: as fit in `gpu_memory_utilization` of the GPU (measured at load: worker/kv_budget.py; on a CPU the static
    #: cache's memory); its LoadReport says how many it made.
    kv_cache_blocks: int = 0
    gpu_memory_utilization: float = 0.9
    #: Tokens per prefill call at most (what kv_cache_blocks = -1 measures a step with).
    prefill_chunk_tokens: int = 512
    cuda_graphs: bool = True  # capture the decode step (CUDA devices only)
    #: Capture every decode graph at load (a first start), or each on its first use (a rank started by a repair:
    #: ready ~4 s sooner, the first step of each shape ~0.1 s slower).
    capture_at_load: bool = True
    torch_compile: bool = True  # compile the decoder's elementwise kernels (CUDA devices only)
    cpu_threads: int = 0  # threads a rank computes with on a CPU device; 0: the cores shared among the ranks
