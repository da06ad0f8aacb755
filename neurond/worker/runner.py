"""The rank's forward steps over its slot KV cache: prefill chunks and batched decode steps.

The model code is transformers' (decoder layers, attention projections, rotary embeddings); the runner owns
what a server needs around it: the KV cache (`kv_cache.py`; which one and how large: `kv_plan.py`), the
attention over it (`attention.py`), positions per row, each slot's sampling state and the draws that use it
(`slot_sampling.py`, over `sampler.py`), and CUDA graphs of the decode step (`graphs.py`). One code path for
1..N ranks: at TP>1 the row-wise layers all-reduce through their hooks (`tp.py`). No broadcast of the drawn
tokens is needed: an all-reduce leaves the same bits on every rank, the LM head is replicated, and the sampler
is a pure function of (logits, seed, token index), so every rank draws the same token and feeds it next.

Device-side state per slot: `next_tok` (the last sampled token, the next decode input) and `seq_len` (tokens in
the cache = the next write position). Decode steps take them from there, so the leader sends only slot numbers.
Rows of a decode batch that are not active write to the trash column and their results are ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from neurond.protocol import BlockRow, LoadReport, SamplingParams, TokenLogprob
from neurond.worker import attention, decoder
from neurond.worker.grammar import Constraints
from neurond.worker.graphs import DecodeGraphs, batch_bucket, kv_bucket
from neurond.worker.kv_plan import KVCachePlan
from neurond.worker.slot_sampling import SlotSampling

log = logging.getLogger("neurond.worker")

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


# At TP>1 at most this many decode steps of one call are queued on the GPU ahead of the host. After an abort
# every queued NCCL kernel still runs, spinning ~1M times (NCCL_SPINS_BEFORE_CHECK_ABORT) before it sees the
# abort flag, and the abort returns only once they have: with 8 steps of an 8B model queued (512 all-reduces)
# it took 1.96 s on 2xH100. Two keep the GPU busy (the next step is queued while one runs).
QUEUED_STEPS_AT_TP = 2


class ModelRunner:
    # Settings keep their configuration's names (cuda_graphs, kv_block_size, kv_cache_blocks,
    # gpu_memory_utilization, prefill_chunk_tokens), but two, deliberately: `slots` is max_batch_size as the cache
    # sees it (rows), and `max_len` is a slot's positions, the context window (WorkerSpec.context_len) + 1 for the
    # trash position that idle rows of a batch write to.
    def __init__(self, model, *, slots: int, max_len: int, device, guard, world_size: int,
                 cuda_graphs: bool = False, compile_kernels: bool = False, own_layers: bool = True,
                 mid_forward: Callable[[], None] | None = None,
                 eager_only: Callable[[], bool] = lambda: False, constraints: Constraints | None = None,
                 kv_block_size: int = 16, kv_cache_blocks: int = 0, paged_in_place: bool | None = None,
                 gpu_memory_utilization: float = 0.9, prefill_chunk_tokens: int = 512) -> None:
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise ValueError(f"model type {cfg.model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")
        self.model = model
        self.device = device
        self.guard = guard
        self.world_size = world_size
        self.slots = slots
        base = getattr(model, model.base_model_prefix)
        self.embed = base.embed_tokens
        self.layers = list(base.layers)
        self.norm = base.norm
        self.rotary = base.rotary_emb
        self.lm_head = model.get_output_embeddings()
        # The fit check (allocates nothing):
        plan = KVCachePlan(cfg, layers=len(self.layers), dtype=next(model.parameters()).dtype, world_size=world_size,
                           slots=slots, max_len=max_len, device=device, block_size=kv_block_size,
                           blocks=kv_cache_blocks, in_place=paged_in_place, utilization=gpu_memory_utilization)
        self.cache = plan.first()  # sized from memory once everything else is built (below)
        attention.register(model)
        attention.use_fused_norms(model)
        # Device-side per-slot state, and static inputs of the decode step.
        self.next_tok = torch.zeros(slots, dtype=torch.long, device=device)
        self.seq_len = torch.zeros(slots, dtype=torch.long, device=device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self.row_idx = torch.arange(slots, device=device).view(slots, 1)
        self._active_host = torch.zeros(slots, dtype=torch.bool, pin_memory=device.type == "cuda")
        self.key_idx = torch.arange(self.cache.max_len, device=device)
        self.lengths = [0] * slots  # host copy of seq_len (picks the decode step's kv_len bucket)
        self.slot_sampling = SlotSampling(slots, device, self.next_tok, constraints if constraints is not None else
                                          Constraints(getattr(cfg, "_name_or_path", ""), self.lm_head.out_features))
        #: The last prefill's or decode's log-probabilities, one entry per token it returned (None where the
        #: sequence asked for none).
        self.last_logprobs: list[TokenLogprob | None] = []
        self._mid_forward = mid_forward
        self._mid_layer = len(self.layers) // 2 if mid_forward is not None and len(self.layers) > 1 else -1
        self._eager_only = eager_only
        self.hooks_enabled = True
        # neurond's own layer forward (decoder.py) where the model allows it; transformers' layers otherwise.
        why_not = decoder.supported(model) if own_layers else "own_layers=False"
        self.compiled_kernels = compile_kernels and not why_not
        kernels = decoder.kernels(compiled=self.compiled_kernels), decoder.kernels(compiled=False)
        self.own = None if why_not else [decoder.DecoderLayer(layer, plan.head_dim, *kernels) for layer in self.layers]
        if why_not and own_layers:
            log.info("using transformers' decoder layers: %s", why_not)
        # One event per queued step, recorded after it: the host waits for the step QUEUED_STEPS_AT_TP back.
        self._pace = [torch.cuda.Event() for _ in range(QUEUED_STEPS_AT_TP)] \
            if device.type == "cuda" and world_size > 1 else None
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and device.type == "cuda":
            self.graphs = DecodeGraphs(self)
        if plan.from_memory:
            self.cache = plan.measured(self, prefill_chunk_tokens)

    # The slots' sampling state (slot_sampling.py), under the names it had here.
    @property
    def sampling(self) -> list[SamplingParams]:
        return self.slot_sampling.params

    @property
    def drawn(self) -> list[int]:
        return self.slot_sampling.drawn

    @property
    def constraints(self) -> Constraints:
        return self.slot_sampling.constraints

    # ------------------------------------------------------------------ forward
    def forward(self, ids, positions, mask, last_index=None):
        """ids/positions [B, T], mask [B, 1, T, L] (None where the cache reads in place: the kernel has its own
        limits) -> float32 logits [B, V] of each row's last position (or of position last_index[b] of row b)."""
        h = self.embed(ids)
        cos, sin = self.rotary(h, positions)
        if self.own is not None:
            batch, tokens = ids.shape
            cos, sin = cos.view(-1, 1, cos.shape[-1]), decoder.signed_sin(sin).view(-1, 1, sin.shape[-1])
            bias = None if mask is None else decoder.additive_mask(mask, h.dtype)
            h, delta = h.view(batch * tokens, -1), None
            for i, layer in enumerate(self.own):
                if i == self._mid_layer and self.hooks_enabled:
                    with self.guard.own_work():
                        self._mid_forward()  # fault injection inside the forward (between collectives at TP>1)
                h, delta = layer(h, delta, self.cache, i, cos, sin, bias, batch, tokens)
            h = (h + delta).view(batch, tokens, -1)
        else:
            for i, layer in enumerate(self.layers):
                if i == self._mid_layer and self.hooks_enabled:
                    with self.guard.own_work():
                        self._mid_forward()
                out = layer(h, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                            use_cache=True, position_embeddings=(cos, sin))
                h = out[0] if isinstance(out, tuple) else out
        if last_index is None:
            h = h[:, -1]
        else:
            h = h[torch.arange(h.shape[0], device=h.device), last_index]
        logits = self.lm_head(self.norm(h))
        if hasattr(logits, "full_tensor"):  # a DTensor when transformers' plan leaves logits sharded
            logits = logits.full_tensor()
        return logits.float()

    def decode_forward(self, batch: int, kv_len: int):
        """The decode step on rows [0, batch), attending to positions [0, kv_len), from the device-side state
        only (what a CUDA graph captures). Inactive rows write to the trash column, outside what is read.
        Active rows also advance here: their greedy token becomes the next input and their length grows (the
        host then has nothing to do for a greedy batch but read the tokens). Returns (logits, greedy tokens)."""
        active = self.active[:batch]
        pos = torch.where(active, self.seq_len[:batch], self.cache.trash).view(batch, 1)
        mask = (self.key_idx[:kv_len].view(1, 1, 1, kv_len) <= pos.view(batch, 1, 1, 1))
        self.cache.bind(slice(0, batch), self.row_idx[:batch], pos, kv_len)
        logits = self.forward(self.next_tok[:batch].view(batch, 1), pos, mask)
        greedy = torch.argmax(logits, dim=-1)
        self.next_tok[:batch].copy_(torch.where(active, greedy, self.next_tok[:batch]))
        # Past the cache a row stays on the trash column (a pipelined step may outrun the leader).
        self.seq_len[:batch].copy_(torch.clamp(self.seq_len[:batch] + active.long(), max=self.cache.trash))
        return logits, greedy

    # ------------------------------------------------------------------ steps
    def prefill(self, chunks) -> list[int]:
        """Write each chunk (PrefillChunk: slot, token_ids, start, last, sampling, drawn) into its slot in one
        forward pass, rows padded to the longest chunk. For each last chunk, draw the sequence's next token and
        make the slot ready to decode. Returns one entry per chunk: the token, or -1 for a chunk that is not
        its sequence's last."""
        rows = len(chunks)
        ids, positions = chunk_inputs(chunks, self.slots, self.cache.trash)
        width = ids.shape[1]
        kv_len = self.cache.round_up(max(c.start + len(c.token_ids) for c in chunks))
        slots = torch.tensor([c.slot for c in chunks], device=self.device)
        # At TP>1 the whole step waits on peers: its collectives are queued, and the token read-back waits for them.
        with torch.inference_mode(), self.guard.region(self.world_size > 1):
            self.active[slots] = False
            ids, positions = ids.to(self.device), positions.to(self.device)
            # A paged cache read in place (paged_attention.paged_prefill) needs no mask: none is built, rows x width
            # x kv_len of it, twice (bool and additive), per chunk.
            mask = None if self.cache.in_place else \
                (self.key_idx[:kv_len].view(1, 1, 1, kv_len) <= positions.view(rows, 1, width, 1))
            rows_index = slots if rows > 1 else slice(chunks[0].slot, chunks[0].slot + 1)
            self.cache.bind(rows_index, slots.view(rows, 1), positions, kv_len)
            last_index = torch.tensor([len(c.token_ids) - 1 for c in chunks], device=self.device)
            logits = self.forward(ids, positions, mask, last_index)
            done = [r for r, c in enumerate(chunks) if c.last]
            out = [-1] * rows
            self.last_logprobs = [None] * rows
            if done:
                finished = [chunks[r] for r in done]
                for c in finished:
                    self.slot_sampling.start(c, logits.shape[-1])
                index = torch.tensor([c.slot for c in finished], device=self.device)
                picked = logits.index_select(0, torch.tensor(done, device=self.device))
                slots_done = [c.slot for c in finished]
                drawn, lp = self.slot_sampling.sample(picked, slots_done, index)
                tokens = drawn.tolist()  # the step's one host sync
                for r, entry in zip(done, self.slot_sampling.drew(slots_done, tokens, lp), strict=True):
                    self.last_logprobs[r] = entry
                ends = torch.tensor([c.start + len(c.token_ids) for c in finished], device=self.device)
                self.seq_len.index_copy_(0, index, ends)
                self.active[index] = True
                for r, c, t in zip(done, finished, tokens, strict=True):
                    self.lengths[c.slot] = c.start + len(c.token_ids)
                    out[r] = t
            return out

    def decode(self, slots: tuple[int, ...], steps: int = 1, eager: bool = False) -> list[int]:
        """`steps` steps for the sequences in `slots` (each feeds its last token). Returns their next tokens,
        step by step ([step 0's for each slot, step 1's, ...]). `eager`: no CUDA graph, even where there are.

        The steps are queued back to back and read with one host sync at the end: the device advances each
        row's input and length itself, so the host has nothing to wait for in between (a sync per step left the
        GPU idle while Python bookkept and launched the next graph)."""
        if not slots:
            return []
        batch = batch_bucket(max(slots) + 1, self.slots)
        # Rows with anything to apply or report are drawn outside the graph, from its logits.
        sampled = [s for s in slots if not self.sampling[s].plain_greedy]
        # Rows with a grammar need each step's token on the host before the next step's mask: it is copied out
        # as soon as it is drawn and waited for only after the next forward is queued (the mask is computed
        # while the GPU runs it).
        constrained = [s for s in sampled if s in self.constraints]
        graphs = None if eager or self._eager_only() else self.graphs
        # At TP>1 the whole call waits on peers: replays and collectives are queued, and `tolist` waits for them.
        with torch.inference_mode(), self.guard.region(self.world_size > 1):
            self._active_host.zero_()
            self._active_host[list(slots)] = True
            self.active.copy_(self._active_host, non_blocking=True)
            index = torch.tensor(sampled, device=self.device) if sampled else None
            out = torch.empty(steps, batch, dtype=torch.long, device=self.device)
            step_logprobs = []  # per step: what logprobs_of returned for the sampled rows, or None
            picked = torch.tensor([sampled.index(s) for s in constrained], device=self.device) if constrained else None
            last_drawn = None  # the constrained rows' tokens of the step before, on their way to the host
            pace = self._pace
            for step in range(steps):
                if pace is not None and step >= len(pace):
                    pace[step % len(pace)].synchronize()  # bound what an abort must drain (QUEUED_STEPS_AT_TP)
                kv_len = kv_bucket(max(self.lengths[s] for s in slots) + 1, self.cache.max_len)
                if graphs is not None:
                    logits, tokens = graphs.run(batch, kv_len)
                else:
                    logits, tokens = self.decode_forward(batch, kv_len)
                out[step].copy_(tokens)  # a graph's outputs are overwritten by its next replay
                if sampled:
                    if last_drawn is not None:
                        self.slot_sampling.advance(constrained, *last_drawn)
                    drawn, lp = self.slot_sampling.sample(logits.index_select(0, index), sampled, index)
                    out[step].index_copy_(0, index, drawn)
                    step_logprobs.append(lp)
                    if picked is not None:
                        last_drawn = self.slot_sampling.to_host(drawn.index_select(0, picked))
                if pace is not None:
                    pace[step % len(pace)].record()
                for s in slots:
                    self.drawn[s] += 1
                    self.lengths[s] = min(self.lengths[s] + 1, self.cache.trash)
            every = out.tolist()  # the call's one host sync
            for s in constrained:
                self.constraints.advance(s, every[-1][s])
            entries = self.slot_sampling.logprob_entries
            per_step = [dict(zip(sampled, entries(sampled, lp), strict=True)) for lp in step_logprobs] \
                if any(lp is not None for lp in step_logprobs) else []
        self.last_logprobs = [per_step[step].get(s) if per_step else None for step in range(steps) for s in slots]
        return [row[s] for row in every for s in slots]

    def copy_prefix(self, src: int, dsts: tuple[int, ...], length: int) -> None:
        """Slots `dsts` get the first `length` cached positions of slot `src` (its prompt, prefilled once for
        several choices); each then prefills the rest of its own context from there."""
        if not 0 <= src < self.slots or not all(0 <= d < self.slots and d != src for d in dsts) \
                or not 0 < length < self.cache.trash:
            raise ValueError(f"cannot copy {length} positions of slot {src} to {dsts} ({self.slots} slots)")
        with torch.inference_mode():
            self.cache.copy(src, dsts, length)
            self.active[list(dsts)] = False

    def apply_tables(self, rows: tuple[BlockRow, ...]) -> None:
        """The leader's block table rows for the next step (protocol.BlockRow)."""
        if rows:
            with torch.inference_mode():
                self.cache.apply(rows)

    def reset(self) -> None:
        """After the communicator changed (its graphs hold the old one) or a failed step: nothing in flight."""
        self.active.zero_()
        if self.graphs is not None and self.world_size > 1:
            self.graphs.clear()

    def release_graphs(self) -> list:
        """Control thread, before the communicator is aborted: take the decode graphs out of use and return them
        (graphs.py says why and in which order they go)."""
        if self.graphs is not None and self.world_size > 1:
            return self.graphs.release()
        return []

    def destroy_graphs(self, graphs: list, timeout_s: float) -> None:
        """Control thread, once the abort is under way: destroy what `release_graphs` took (called only when
        it took some)."""
        assert self.graphs is not None  # they gave the graphs
        self.graphs.destroy(graphs, timeout_s)

    def warm_up(self, capture_graphs: bool = True, progress: Callable[[], None] = lambda: None) -> float:
        """Compile and capture now (at load), so the first requests do not pay for it: decode steps of one row
        and of two compile the kernels (the two shapes they are compiled for), then the decode graphs (unless
        `capture_graphs` is false: each is then captured on its first use). `progress()` after each step."""
        from neurond.protocol import PrefillChunk

        t0 = time.monotonic()
        if self.compiled_kernels:
            # Alone: no collective (a rank replaced alone warms up while its peers wait for the next command),
            # and eagerly: a graph captured here would lack its all-reduces.
            rows = tuple(range(min(2, self.slots)))
            with self.guard.local():
                self.prefill([PrefillChunk(s, (0,), 0, True, SamplingParams(temperature=0.0), 0) for s in rows])
                self.decode((0,), eager=True)
                self.decode(rows, eager=True)
            self.active.zero_()
            log.info("compiled kernels warmed up in %.2f s", time.monotonic() - t0)
            progress()
        if self.graphs is not None and capture_graphs:
            self.graphs.capture_all(progress)
        return time.monotonic() - t0

    def info(self) -> dict:
        return {"slots": self.slots, "max_len": self.cache.trash, "kv_cache_bytes": self.cache.nbytes,
                "kv_blocks": self.cache.blocks, "kv_block_size": self.cache.block_size,
                "kv_layout": "paged" if self.cache.paged else "slots",
                "kv_reads": "in_place" if self.cache.in_place else "gathered" if self.cache.paged else "view",
                "cuda_graphs": self.graphs is not None, "own_layers": self.own is not None,
                "compiled_kernels": self.compiled_kernels}

    def load_report(self, memory: dict, load_s: float, graph_capture_s: float) -> LoadReport:
        """The LoadShard reply's report: this runner's cache and kernels, with the shard's `memory` figures."""
        return report_of(self.info(), memory, load_s, graph_capture_s)


def report_of(info: dict, memory: dict, load_s: float, graph_capture_s: float) -> LoadReport:
    """A runner's `info()` and its shard's `memory` figures as the LoadShard reply's report."""
    return LoadReport(
        kv_cache_blocks=info["kv_blocks"], kv_block_size=info["kv_block_size"],
        kv_cache_bytes=info["kv_cache_bytes"], kv_layout=info["kv_layout"], kv_reads=info["kv_reads"],
        dtype=str(memory.get("dtype", "")), cuda_graphs=info["cuda_graphs"], own_layers=info["own_layers"],
        compiled_kernels=info["compiled_kernels"], load_s=load_s, graph_capture_s=graph_capture_s,
        free_bytes=memory.get("free_bytes"), total_bytes=memory.get("total_bytes"),
        allocated_bytes=memory.get("allocated_bytes"))


def chunk_inputs(chunks, slots: int, trash: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill step's token ids and positions, [chunks, longest chunk] on the host: one row per chunk, padded
    with token 0 at the trash position. ValueError for a chunk that does not fit its slot (of `slots`, before
    the `trash` position), and for two chunks of one slot."""
    rows = len(chunks)
    width = max(len(c.token_ids) for c in chunks)
    ids = torch.zeros(rows, width, dtype=torch.long)
    positions = torch.full((rows, width), trash, dtype=torch.long)  # padding writes to the trash column
    for r, c in enumerate(chunks):
        n = len(c.token_ids)
        if not 0 <= c.slot < slots or n == 0 or c.start + n > trash:
            raise ValueError(f"prefill of {n} tokens at {c.start} does not fit slot {c.slot} of {slots} x "
                             f"{trash} positions")
        ids[r, :n] = torch.tensor(c.token_ids)
        positions[r, :n] = torch.arange(c.start, c.start + n)
    if len({c.slot for c in chunks}) != rows:
        raise ValueError("one prefill step may hold one chunk per slot")
    return ids, positions
