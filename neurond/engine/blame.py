"""Fault blame: when a step fails, which of the requests in it fail, and with what error (policy in
docs/recovery.md). Everyone else who held a slot is replayed after the repair (scheduler.interrupt).

- A rank *reported an error* (exception, out of memory, CUDA error) for a step that held exactly one request:
  that request is the cause; it fails at once with the error.
- Otherwise (a death, a timeout, an error in a batch) every request in the step gets a strike; one that reaches
  `max_request_faults` strikes is quarantined (fails, never retried; the journal entry names it).
- A step that never ran (the pool was not serving) implicates nobody.
"""

from __future__ import annotations

from neurond import protocol as p
from neurond.engine.request import RETRY_AFTER_S, Failed, GenerationRequest
from neurond.pool.faults import PoolFault, PoolUnavailable, RankFailed

# Faults a rank reports about the step itself (as opposed to deaths and timeouts, which say nothing about
# which request caused them).
RAISED = (p.FaultKind.EXCEPTION, p.FaultKind.OUT_OF_MEMORY, p.FaultKind.CUDA_ERROR)

# The status a request gets when a rank fault ended it. All are retriable server errors: the pool repairs itself.
FAULT_STATUS = {
    "rank_failed": 500,
    "cuda_error": 500,
    "out_of_memory": 503,
    "rank_died": 503,
    "rank_timeout": 504,
    "model_unavailable": 503,
}


def fault_failure(fault: PoolFault) -> Failed:
    """The error a request that caused `fault` gets."""
    return Failed(FAULT_STATUS.get(fault.cause, 500), fault.cause, fault.message, RETRY_AFTER_S)


def blame(fault: PoolFault, members: list[GenerationRequest],
          max_request_faults: int) -> list[tuple[GenerationRequest, Failed, bool]]:
    """The requests of the failed step (`members`) that fail for `fault`: (request, its error, quarantined).
    Strikes are counted on the requests themselves (`faults`)."""
    if isinstance(fault, PoolUnavailable):
        return []
    if isinstance(fault, RankFailed) and fault.kind in RAISED and len(members) == 1:
        return [(members[0], fault_failure(fault), False)]
    out = []
    for req in members:
        req.faults += 1
        if req.faults >= max_request_faults:
            out.append((req, Failed(500, "request_quarantined",
                                    f"this request was in {req.faults} steps that failed ({fault.cause}); it is not "
                                    f"retried again"), True))
    return out
