"""Built-in fault injection, for tests and for operators rehearsing recovery. Off unless configured.

A fault is kind x phase x count, armed on one rank. The compute loop calls `fire(phase)` at each phase point;
an armed fault of that phase fires there, `count` times. Phases:
  load        while loading the shard (armed through the WorkerSpec, before the process starts)
  prefill     at the start of a prefill step, before any collective of that step
  decode      at the start of a decode step, before any collective of that step
  collective  in the middle of a decode step's forward pass, between two layers: the peers are already past
              earlier collectives and block in the next one (the case that hung the original daemon)
Kinds:
  raise       a Python exception                 oom        MemoryError on CPU; a real CUDA OOM on GPU
  exit        os._exit(3) (a clean-looking exit) sigkill    SIGKILL to itself
  segfault    a real segmentation fault          wedge      sleep forever: alive, answering pings, never done
  hang_kernel GPU: a never-ending CUDA kernel    cuda_error GPU: a device-side assert (sticky: context ruined)
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from dataclasses import dataclass

from neurond.protocol import FAULT_KINDS as KINDS, FAULT_PHASES as PHASES


class InjectedFault(RuntimeError):
    pass


@dataclass(slots=True)
class ArmedFault:
    kind: str
    phase: str
    count: int = 1
    after: int = 0  # calls of the phase that pass before it fires


class FaultPlan:
    def __init__(self, device=None) -> None:
        self.device = device
        self._armed: list[ArmedFault] = []
        self._lock = threading.Lock()  # armed from the control thread, fired on the compute thread

    def arm(self, kind: str, phase: str, count: int = 1, acknowledge=None, after: int = 0) -> None:
        """`acknowledge()` runs before the fault can fire. A fault that ends the process (exit, sigkill,
        segfault) could otherwise fire on a step that starts that very moment and kill the rank before it said
        it armed it: the leader would report the arming as failed (rank died) for a fault that did fire."""
        if kind not in KINDS or phase not in PHASES or count < 1 or after < 0:
            raise ValueError(f"bad fault {kind}/{phase}/{count} after {after}")
        with self._lock:  # fire() waits for it
            self._armed.append(ArmedFault(kind, phase, count, after))
            if acknowledge is not None:
                acknowledge()

    def armed(self, phase: str) -> bool:
        return any(f.phase == phase for f in self._armed)

    def fire(self, phase: str) -> None:
        with self._lock:
            fault = next((f for f in self._armed if f.phase == phase), None)
            if fault is None:
                return
            if fault.after > 0:
                fault.after -= 1
                return
            fault.count -= 1
            if fault.count <= 0:
                self._armed.remove(fault)
        _inject(fault.kind, phase, self.device)


def _inject(kind: str, phase: str, device) -> None:
    cuda = device is not None and device.type == "cuda"
    if kind == "raise":
        raise InjectedFault(f"injected exception in {phase}")
    if kind == "oom":
        if cuda:
            import torch

            torch.empty(1 << 50, dtype=torch.uint8, device=device)  # 1 PiB: a real CUDA OOM
        raise MemoryError(f"injected out-of-memory in {phase}")
    if kind == "exit":
        os._exit(3)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "segfault":
        ctypes.string_at(0)
    if kind == "wedge":
        while True:
            time.sleep(3600)
    if kind == "hang_kernel":
        if not cuda:
            raise InjectedFault("hang_kernel needs a CUDA device")
        import torch

        torch.cuda._sleep(1 << 62)  # a kernel that spins for ages
        torch.cuda.synchronize(device)
    if kind == "cuda_error":
        if not cuda:
            raise InjectedFault("cuda_error needs a CUDA device")
        import torch

        index = torch.tensor([1 << 40], device=device)
        torch.zeros(1, device=device)[index].item()  # device-side assert: sticky
    raise InjectedFault(f"unknown fault kind {kind}")
