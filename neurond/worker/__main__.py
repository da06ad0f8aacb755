"""`python -m neurond.worker STEP_FD CONTROL_FD`: started by the leader, never by hand.

The first message on the step pipe is the WorkerSpec.
"""

import sys
from multiprocessing.connection import Connection

from neurond.worker.main import run_worker


def main() -> None:
    step_conn = Connection(int(sys.argv[1]))
    ctrl_conn = Connection(int(sys.argv[2]))
    spec = step_conn.recv()
    run_worker(spec, step_conn, ctrl_conn)


if __name__ == "__main__":
    main()
