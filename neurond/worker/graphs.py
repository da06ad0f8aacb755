"""CUDA graphs of the decode step, one per (batch bucket, kv_len bucket): batch 1, 2, 4, ... slots; kv_len
256, 512, ... max_len.

A decode step of an 8B model is hundreds of kernel launches; replaying them as one graph removes the Python
and launch overhead that otherwise caps batch-1 decode far below the memory-bandwidth bound. The graph reads
only the runner's static device buffers (next_tok, seq_len, active), advances them, and writes its logits and
greedy tokens to static outputs.

Abortability: at TP>1 the graph holds NCCL all-reduces on the communicator it was captured with. They stay
ordinary NCCL kernels, so aborting the communicator unblocks them like any other. But NCCL's abort also waits
until every graph holding the communicator's collectives is destroyed (NCCL >= 2.26, `commDestroySync` polls
its graph references), and destroying a graph whose replay is in flight waits for that replay to end (seen on
an H100: the control thread stuck in the destructor while the replay waited on a peer). So the abort goes in
this order (worker/main.py): `release` takes every graph out of use (none is replayed or captured again until
the compute thread has a new communicator: `clear`), the abort starts on a thread of its own (its first act
releases the stuck kernels), and the control thread waits for a launch under way to end (a launch itself can
block on a stuck GPU), then resets the taken graphs (`CUDAGraph.reset` drops the GIL while it waits), which
lets the abort return. The graphs are captured again on first use.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("neurond.worker")


class GraphsReleased(RuntimeError):
    """A decode graph was asked for after `release`: the communicator is being aborted."""


def batch_bucket(n: int, max_batch: int) -> int:
    """Decode batches are padded to a power of two (the shapes CUDA graphs are captured for)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max_batch)


# Decode attention reads only the first `kv_len` positions of each row: the smallest power of two (at least
# this) that covers the longest sequence in the batch. Reading all of max_len instead doubles the step time of
# a full batch on a GPU (the whole cache is as large as the weights) and is 10x slower on a CPU.
MIN_KV_BUCKET = 256


def kv_bucket(longest: int, max_len: int) -> int:
    b = MIN_KV_BUCKET
    while b < longest:
        b *= 2
    return min(b, max_len)


class DecodeGraphs:
    def __init__(self, runner) -> None:
        self.runner = runner
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}  # -> (graph, outputs)
        self._pool = torch.cuda.graph_pool_handle()
        self._released = False
        # True while the compute thread launches a replay. A launch can block while the GPU is stuck on a peer
        # (seen on an H100 with an 8B model), so no lock is held across it; `destroy` waits for it to end instead.
        self._launching = False

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, kv_len) a decode step can ask for: the values of the runner's bucket functions."""
        slots, top = self.runner.slots, self.runner.cache.max_len
        batches = sorted({batch_bucket(n, slots) for n in range(1, slots + 1)})
        lengths = sorted({kv_bucket(n, top) for n in range(1, top + 1)})
        return [(b, n) for b in batches for n in lengths]

    def clear(self) -> None:
        """Compute thread: drop every graph; new ones may be captured (for a new communicator)."""
        self._graphs = {}
        self._pool = torch.cuda.graph_pool_handle()  # a fresh pool: the old one's graphs may still be in flight
        self._released = False

    def release(self) -> list:
        """Control thread: take every graph out of use (none is captured or replayed until `clear`) and return
        them, for `destroy` once the abort is under way. The caller's references keep the compute thread from
        destroying one, in flight, while it holds the GIL."""
        self._released = True
        graphs, self._graphs = self._graphs, {}
        return [graph for graph, _outputs in graphs.values()]

    def destroy(self, graphs: list, timeout_s: float) -> None:
        """Control thread, after `release` and once the abort has started: wait for a launch under way to end
        (the abort ends it), then reset each graph (the GIL is dropped while a reset waits for its replay)."""
        deadline = time.monotonic() + timeout_s
        while self._launching and time.monotonic() < deadline:
            time.sleep(0.001)
        if self._launching:
            raise TimeoutError(f"a decode graph launch still running after {timeout_s:.0f} s")
        for graph in graphs:
            graph.reset()

    def capture_all(self, progress=lambda: None) -> None:
        for shape in sorted(self.shapes(), reverse=True):  # largest first: the pool fits the rest
            self._capture(*shape)
            progress()

    def run(self, batch: int, kv_len: int):
        if self._released:
            raise GraphsReleased("decode graphs released: the communicator is being aborted")
        entry = self._graphs.get((batch, kv_len))
        if entry is None:
            entry = self._capture(batch, kv_len)
        graph, outputs = entry
        self._launching = True  # set before the check: `release` sets its flag before it looks at this one
        try:
            if self._released:
                raise GraphsReleased("decode graphs released: the communicator is being aborted")
            graph.replay()
        finally:
            self._launching = False
        return outputs

    def _capture(self, batch: int, kv_len: int):
        runner = self.runner
        t0 = time.monotonic()
        saved = runner.active.clone()
        runner.active.zero_()  # capture-time runs write only to the trash column
        runner.hooks_enabled = False  # fault-injection hooks must not fire (or be baked in) at capture
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):
                    runner.decode_forward(batch, kv_len)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
                outputs = runner.decode_forward(batch, kv_len)
        finally:
            runner.hooks_enabled = True
            runner.active.copy_(saved)
        if self._released:  # released while capturing: this graph holds the aborted communicator too
            del graph, outputs
            raise GraphsReleased("decode graphs released during capture: the communicator is being aborted")
        self._graphs[(batch, kv_len)] = (graph, outputs)
        log.debug("captured the decode graph for batch %d, kv_len %d in %.0f ms", batch, kv_len,
                  (time.monotonic() - t0) * 1000)
        return graph, outputs
