"""Entry point of a rank worker process: a compute loop and a control thread.

The compute loop (main thread) runs step commands in order and answers each with Done or StepFailed: a
failed call is answered, the worker does not die for it. The control thread answers pings and aborts the
communicator; it never waits on the compute thread, so it keeps answering while compute is stuck inside a
collective.

The worker exits when the leader goes away: the pipes reach EOF, and PR_SET_PDEATHSIG makes the kernel send
SIGKILL if the leader dies without closing them.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from neurond import protocol as p

if TYPE_CHECKING:
    from neurond.worker.comm import Communicator
    from neurond.worker.runner import ModelRunner
    from neurond.worker.shard import Shard
    from neurond.worker.tp import CollectiveGuard

log = logging.getLogger("neurond.worker")

# An abort normally returns in ~0.5 s (NCCL, H100). One still running after this many seconds dumps every
# thread's Python stack to stderr (the journal), so a rank that never confirms shows where it is stuck.
ABORT_DUMP_AFTER_S = 2.0
# Past this the control thread stops waiting for the abort and says so (the leader's own deadline is shorter).
ABORT_JOIN_S = 30.0
# The most a load waits for the kernels' pre-warm thread (~3 s for an 8B rank on an H100); the load's own
# deadline (the leader's) bounds the whole call anyway.
PREWARM_JOIN_S = 120.0
# How often a load that waits on the pre-warm repeats its progress (well under any load stall deadline).
PROGRESS_EVERY_S = 1.0


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class Worker:
    def __init__(self, spec: p.WorkerSpec, step_conn, ctrl_conn) -> None:
        self.spec = spec
        self.step_conn = step_conn
        self.ctrl_conn = ctrl_conn
        self.rank = spec.rank
        self._send_lock = threading.Lock()  # both threads may answer on the control pipe
        self._busy_since = 0.0
        # Set by start(), before the control thread starts and before any command is served.
        self.device: Any = None  # a torch.device
        self.backend = ""
        self.comm: Communicator | None = None
        self.shard: Shard | None = None
        self.runner: ModelRunner | None = None  # once a shard is loaded
        self.guard: CollectiveGuard | None = None
        self._prewarm: threading.Thread | None = None

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        import torch  # noqa: F401 - imported here, after the environment is set

        from neurond.worker.comm import Communicator
        from neurond.worker.faults import FaultPlan
        from neurond.worker.shard import Shard, pick_backend, pick_device
        from neurond.worker.tp import CollectiveGuard

        self.device = pick_device(self.spec.device, self.rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            # Ranks share the CPU: without this each spins as many threads as there are cores, and the
            # all-reduce waits on oversubscribed spinners (3x slower per step at TP=2 on 2 cores).
            torch.set_num_threads(self.spec.cpu_threads or max(1, (os.cpu_count() or 1) // self.spec.world_size))
        self.backend = pick_backend(self.spec.backend, self.device)
        self.comm = Communicator(self.rank, self.spec.world_size, self.backend, self.device)
        self.faults = FaultPlan(self.device)
        for kind, phase, count in self.spec.faults:
            self.faults.arm(kind, phase, count)
        self.guard = CollectiveGuard()
        self.shard = Shard(self.spec.model_dir, self.spec.dtype, self.device, self.rank, self.spec.world_size,
                           guard=self.guard)
        threading.Thread(target=self._control_loop, name=f"rank{self.rank}-control", daemon=True).start()
        if self.spec.torch_compile and self.device.type == "cuda":
            self._prewarm = threading.Thread(target=self._prewarm_kernels, name=f"rank{self.rank}-prewarm",
                                             daemon=True)
            self._prewarm.start()
        self.step_conn.send(p.Started(self.rank, os.getpid(), str(self.device), self.backend))

    def _prewarm_kernels(self) -> None:
        """Side thread from the start: compile the decode kernels while the communicator forms and the shard
        loads (decoder.prewarm). A failure only costs the time: the runner's warm-up compiles them then."""
        try:
            from transformers import AutoConfig

            from neurond.worker import decoder
            from neurond.worker.loader import checkpoint_dtype
            from neurond.worker.shard import requested_dtype

            self._on_device()
            config = AutoConfig.from_pretrained(self.spec.model_dir)
            dtype = checkpoint_dtype(config, requested_dtype(self.spec.dtype, self.device))
            seconds = decoder.prewarm(config, self.spec.world_size, dtype, self.device)
            log.info("rank %d: compiled kernels pre-warmed in %.2f s", self.rank, seconds)
        except Exception as exc:  # an optimisation; the runner's warm-up is the fallback
            log.warning("rank %d: pre-warming the compiled kernels failed: %s", self.rank, exc)

    # ------------------------------------------------------------------ control thread
    def _control_loop(self) -> None:
        while True:
            try:
                cmd = self.ctrl_conn.recv()
            except (EOFError, OSError):
                log.warning("rank %d: control pipe closed, leader gone; exiting", self.rank)
                os._exit(70)
            if isinstance(cmd, p.Ping):
                assert self.guard is not None  # set before this thread starts
                now = time.monotonic()
                busy = now - self._busy_since if self._busy_since else 0.0
                # Outside any collective since the call began or the last collective returned: a rank released
                # from a collective a moment ago (and now writing its failure reply) is not wedged.
                outside = now - max(self._busy_since, self.guard.left_at) if busy else 0.0
                self._send_ctrl(p.Pong(cmd.call_id, self.rank, busy, self.guard.inside, outside))
            elif isinstance(cmd, p.InjectFault):
                if not self.spec.fault_injection:
                    self._send_ctrl(p.StepFailed(cmd.call_id, self.rank, p.FaultKind.EXCEPTION,
                                                 "fault injection is disabled"))
                    continue
                try:
                    self.faults.arm(cmd.kind, cmd.phase, cmd.count, after=cmd.after,
                                    acknowledge=lambda call_id=cmd.call_id: self._send_ctrl(p.Done(call_id, self.rank)))
                except ValueError as exc:
                    self._send_ctrl(p.StepFailed(cmd.call_id, self.rank, p.FaultKind.EXCEPTION, str(exc)))
            elif isinstance(cmd, p.AbortComm):
                self._send_ctrl(self._abort(cmd))
            else:
                log.error("rank %d: unknown control command %r", self.rank, cmd)

    def _abort(self, cmd: p.AbortComm) -> p.Aborted:
        """Control thread: abort the communicator under whatever the compute thread is doing.

        NCCL's abort does not return while a CUDA graph holding the communicator's collectives lives, and a graph
        whose replay is stuck on a peer can be neither destroyed nor (at times) even finish launching until the
        abort has released it. So: take the graphs out of use, start the abort on a thread of its own, destroy
        the graphs here meanwhile (graphs.py), then wait for the abort."""
        t0 = time.monotonic()
        faulthandler.dump_traceback_later(ABORT_DUMP_AFTER_S, repeat=False, file=sys.stderr)
        try:
            # CUDA's current device is per thread: without this, CUDA calls here would open a context on GPU 0.
            self._on_device()
            runner, comm = self.runner, self.comm
            assert comm is not None  # set before this thread starts
            graphs = runner.release_graphs() if runner is not None else []
            outcome: list[tuple[bool, str]] = []

            def abort() -> None:
                self._on_device()
                outcome.append(comm.abort())

            aborter = threading.Thread(target=abort, name=f"rank{self.rank}-abort", daemon=True)
            aborter.start()
            failed, taken = "", len(graphs)
            if graphs:
                assert runner is not None  # it gave the graphs
                try:
                    runner.destroy_graphs(graphs, ABORT_JOIN_S)
                except Exception as exc:  # reported to the leader, which kills this rank
                    failed = f"decode graphs not destroyed: {exc}"
                del graphs
            destroyed = time.monotonic()
            aborter.join(ABORT_JOIN_S)
            ok, message = outcome[0] if outcome else (False, f"abort still running after {ABORT_JOIN_S:.0f} s")
            if failed:
                ok, message = False, failed
            # Where the time went, for the operator and the benchmarks (the leader journals the total).
            log.info("rank %d: abort %s in %.0f ms (%d decode graphs destroyed after %.0f ms)", self.rank,
                     "confirmed" if ok else "failed", (time.monotonic() - t0) * 1000, taken, (destroyed - t0) * 1000)
        finally:
            faulthandler.cancel_dump_traceback_later()
        return p.Aborted(cmd.call_id, self.rank, ok, time.monotonic() - t0, message)

    def _on_device(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.set_device(self.device)

    def _send_ctrl(self, reply) -> None:
        with self._send_lock:
            try:
                self.ctrl_conn.send(reply)
            except (BrokenPipeError, OSError):
                os._exit(70)

    # ------------------------------------------------------------------ compute loop
    def serve(self) -> int:
        while True:
            try:
                cmd = self.step_conn.recv()
            except (EOFError, OSError):
                return 70
            if isinstance(cmd, p.Shutdown):
                self.step_conn.send(p.Done(cmd.call_id, self.rank))
                return 0
            self.step_conn.send(self._run(cmd))

    def _run(self, cmd) -> p.Done | p.StepFailed | p.StoreOpened:
        comm = self.comm
        assert comm is not None  # started
        mark = comm.abort_count()
        self._busy_since = time.monotonic()
        failed = None
        try:
            result = self._dispatch(cmd)
        except BaseException as exc:  # every failure becomes a reply, never a dead worker
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            failed = self._failure(cmd, exc)
        finally:
            duration = time.monotonic() - self._busy_since
            self._busy_since = 0.0
        if comm.aborted_since(mark) and isinstance(cmd, (p.Prefill, p.Decode, p.JoinComm, p.LoadShard)):
            # The communicator was aborted under this call: on NCCL the collective returns normally, so whatever
            # it computed is garbage; an error it raised (graphs released, a collective failed) is the abort's.
            if failed is not None and not failed.context_ok:
                return failed  # a ruined device context must still be reported: the rank has to be replaced
            return p.StepFailed(cmd.call_id, self.rank, p.FaultKind.COMM_ABORTED, "communicator aborted during call")
        if failed is not None:
            return failed
        if isinstance(result, p.StoreOpened):
            return result
        tokens, loaded = result
        if self.rank != 0:  # every rank draws the same tokens; rank 0 reports them
            return p.Done(cmd.call_id, self.rank, (), duration, loaded)
        logprobs: tuple[p.TokenLogprob | None, ...] = ()
        if isinstance(cmd, (p.Prefill, p.Decode)):
            assert self.runner is not None  # the step just ran on it
            if any(e is not None for e in self.runner.last_logprobs):
                logprobs = tuple(self.runner.last_logprobs)
        return p.Done(cmd.call_id, self.rank, tuple(tokens), duration, loaded, logprobs)

    def _dispatch(self, cmd):
        runner, comm = self.runner, self.comm
        assert comm is not None  # started
        if isinstance(cmd, p.Decode):
            assert runner is not None, "decode before a shard was loaded"
            # The rows first, even if this step then fails: every rank's table stays the leader's.
            runner.apply_tables(cmd.tables)
            self.faults.fire("decode")
            return runner.decode(cmd.slots, cmd.steps), None
        if isinstance(cmd, p.Prefill):
            assert runner is not None, "prefill before a shard was loaded"
            runner.apply_tables(cmd.tables)
            self.faults.fire("prefill")
            return runner.prefill(cmd.chunks), None
        if isinstance(cmd, p.CopyPrefix):
            assert runner is not None, "copy before a shard was loaded"
            runner.apply_tables(cmd.tables)
            runner.copy_prefix(cmd.src, cmd.dsts, cmd.length)
            return (), None
        if isinstance(cmd, p.OpenStore):
            return p.StoreOpened(cmd.call_id, self.rank, comm.open_store())
        if isinstance(cmd, p.JoinComm):
            if runner is not None:
                runner.reset()
            comm.join(cmd.comm_id, cmd.host, cmd.port, cmd.timeout_s)
            return (), None
        if isinstance(cmd, p.LoadShard):
            self.faults.fire("load")
            return (), self._load()
        raise TypeError(f"unknown step command {type(cmd).__name__}")

    def _load(self) -> p.LoadReport:
        from neurond.worker.runner import ModelRunner

        # Progress goes out on the step pipe from this (the compute) thread, the pipe's only writer. The leader
        # takes a long silence as a stalled load (load_stall_timeout_s), so the warm-up after the read repeats
        # the last counts as each of its steps (compiles, graph captures) completes.
        last: list[tuple[int, int, int, int]] = []

        def report(*counts) -> None:
            last[:] = [counts]
            self.step_conn.send(p.LoadProgress(self.rank, *counts))

        def still_warming_up() -> None:
            if last:
                report(*last[0])

        shard = self.shard
        assert shard is not None  # made by start()
        t0 = time.monotonic()
        memory = shard.load(progress=report)
        load_s = round(time.monotonic() - t0, 3)
        spec = self.spec
        self.runner = ModelRunner(
            # max_len: the runner's positions per slot, the context window and the trash position past it.
            shard.model, slots=spec.max_batch_size, max_len=spec.context_len + 1, device=self.device,
            guard=self.guard, world_size=spec.world_size, cuda_graphs=spec.cuda_graphs,
            kv_block_size=spec.kv_block_size, kv_cache_blocks=spec.kv_cache_blocks,
            gpu_memory_utilization=spec.gpu_memory_utilization, prefill_chunk_tokens=spec.prefill_chunk_tokens,
            # Not on CPU: 8.7 s of compile per start (built-in model).
            compile_kernels=spec.torch_compile and self.device.type == "cuda",
            mid_forward=lambda: self.faults.fire("collective"),
            # A step with a collective-phase fault armed runs eagerly: a graph replay would not reach the hook.
            eager_only=lambda: self.faults.armed("collective"))
        if self._prewarm is not None:  # its compiles are the runner's (shared wrappers): let it finish
            # Saying so as it goes: on a cold compile cache the pre-warm outlasted a short load stall deadline
            # (8.3 s of compiles, the leader's 8 s, on an H200 with forked ranks) and cost a full reload.
            end = time.monotonic() + PREWARM_JOIN_S
            while self._prewarm.is_alive() and time.monotonic() < end:
                self._prewarm.join(PROGRESS_EVERY_S)
                still_warming_up()
        graph_capture_s = round(self.runner.warm_up(capture_graphs=spec.capture_at_load,
                                                     progress=still_warming_up), 3)
        # Where a (re)load's time goes: the largest part of replacing a rank after its weights (session 4).
        log.info("rank %d: shard loaded in %.2f s, warm-up (compiled kernels %s, graphs %s) %.2f s", self.rank,
                 load_s, "on" if self.runner.compiled_kernels else "off",
                 "captured" if spec.capture_at_load else "on first use", graph_capture_s)
        return self.runner.load_report(memory, load_s, graph_capture_s)

    def _failure(self, cmd, exc: BaseException) -> p.StepFailed:
        kind, context_ok = classify(exc, self.device)
        log.error("rank %d: %s failed: %s", self.rank, type(cmd).__name__,
                  "".join(traceback.format_exception_only(exc)).strip())
        if context_ok:
            try:
                if self.runner is not None:
                    self.runner.reset()  # nothing of the failed step stays active; the leader replays what it needs
                if kind is p.FaultKind.OUT_OF_MEMORY and self.device.type == "cuda":
                    import torch

                    torch.cuda.empty_cache()  # give back what the failed step's allocations left cached
            except Exception as again:  # the reply below matters more
                log.error("rank %d: could not reset after the failure: %s", self.rank, again)
        return p.StepFailed(cmd.call_id, self.rank, kind, f"{type(exc).__name__}: {exc}"[:2000], context_ok)


def classify(exc: BaseException, device) -> tuple[p.FaultKind, bool]:
    """Map an exception to a fault kind, and say whether this process's device context still works."""
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return p.FaultKind.OUT_OF_MEMORY, True
    text = str(exc)
    accelerator_error = getattr(torch, "AcceleratorError", ())
    if isinstance(exc, accelerator_error) or "CUDA error" in text or "device-side assert" in text:
        return p.FaultKind.CUDA_ERROR, cuda_context_ok(device)
    return p.FaultKind.EXCEPTION, True


def cuda_context_ok(device) -> bool:
    """Sticky CUDA errors make every later CUDA call fail; probe with a tiny one."""
    import torch

    if device is None or device.type != "cuda":
        return True
    try:
        torch.ones(1, device=device).add_(1)
        torch.cuda.synchronize(device)
        return True
    except Exception:
        return False


def run_worker(spec: p.WorkerSpec, step_conn, ctrl_conn) -> None:
    """Target of the spawned process, once it has its spec (`__main__` has set up the process: death with
    the leader, SIGINT ignored; its environment, spec.env, was given when it was started)."""
    from neurond.observe.journal import setup_logging

    setup_logging(spec.log_level, rank=spec.rank)  # journald entries with NEUROND_RANK, or stderr lines
    worker = Worker(spec, step_conn, ctrl_conn)
    worker.start()
    code = worker.serve()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
