"""`python -m neurond.worker STEP_FD CONTROL_FD`: started by the leader, never by hand.

The first message on the step pipe is the WorkerSpec. Before reading it the process imports what every rank
needs (torch, transformers' model classes, safetensors): most of a rank's start, done here so that a spare
(`pool/spares.py`), started ahead of need, has it behind it when a spec arrives. No device is touched before
the spec says which.
"""

import faulthandler
import os
import signal
import sys
from multiprocessing.connection import Connection


def preimport() -> None:
    import importlib

    import safetensors  # noqa: F401
    import torch  # noqa: F401

    import neurond.worker.runner

    # transformers' top-level names are lazy: `from transformers import AutoConfig` imports almost nothing, and
    # the model family's own modules (with torch.distributed.tensor behind them) were imported by the load
    # instead, 4 s of a CPU rank's 6.5 s replacement (tests/pool/test_fault_matrix.py). Every supported family's:
    # they share nearly all of it, and the spec that names the family comes later.
    for family in neurond.worker.runner.SUPPORTED:
        importlib.import_module(f"transformers.models.{family}.configuration_{family}")
        importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    if os.environ.get("NEUROND_PREIMPORT_COMPILER") == "1":
        # Ranks that compile kernels (CUDA, torch_compile): torch's compiler stack is seconds of imports that a
        # replaced rank would otherwise pay between loading its shard and serving (probe-compile-warmup).
        import torch._dynamo  # noqa: F401
        import torch._inductor.codecache  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401


def main() -> None:
    from neurond.worker.main import _die_with_parent

    _die_with_parent()  # a spare waits for a spec that may never come: it must not outlive the leader
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the leader, which stops us in order
    step_conn = Connection(int(sys.argv[1]))
    ctrl_conn = Connection(int(sys.argv[2]))
    preimport()
    serve(step_conn, ctrl_conn)


def serve(step_conn: Connection, ctrl_conn: Connection) -> None:
    """Say the imports are done, wait for the spec, run the rank; never returns. The part of a worker's start
    that a process forked from the zygote (worker/zygote.py) shares with one started from scratch; both callers
    have armed the death signal and ignore SIGINT already (a fork inherits the zygote's)."""
    # SIGUSR1 dumps every thread's Python stack to stderr (the journal): the leader sends it to a rank it is about
    # to kill for not answering, so the operator sees where it was stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # The rank leads a process group of its own, so that what it starts (torch's compile workers: a fresh Python
    # and 32 forks of it, seconds of imports before they notice their parent is gone) dies with it: the leader
    # kills the group when it finds the rank dead (pool/ranks.py).
    os.setpgid(0, 0)
    from neurond.protocol import Imported

    try:
        ctrl_conn.send(Imported(os.getpid()))
        spec = step_conn.recv()
    except (EOFError, OSError):  # the leader went away (or closed an unused spare)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    from neurond.worker.main import run_worker

    run_worker(spec, step_conn, ctrl_conn)


if __name__ == "__main__":
    main()
