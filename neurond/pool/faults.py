"""What can go wrong with a rank, as the leader sees it. Raised by the pool, handled by the supervisor."""

from __future__ import annotations

from neurond.protocol import FaultKind


class PoolFault(Exception):
    """A call to the rank pool did not complete. `cause` names it: in the lifecycle's Cause, the journal's
    NEUROND_CAUSE and the OpenAI error code of the request it ended."""

    cause = "rank_failed"

    def __init__(self, rank: int | None, message: str, *, context_ok: bool = True) -> None:
        super().__init__(message)
        self.rank = rank
        self.message = message
        self.context_ok = context_ok


class RankFailed(PoolFault):
    """The rank answered the call with StepFailed."""

    def __init__(self, rank: int, kind: FaultKind, message: str, *, context_ok: bool = True) -> None:
        super().__init__(rank, message, context_ok=context_ok)
        self.kind = kind

    @property
    def cause(self) -> str:  # type: ignore[override]
        return {
            FaultKind.OUT_OF_MEMORY: "out_of_memory",
            FaultKind.CUDA_ERROR: "cuda_error",
            FaultKind.COMM_ABORTED: "rank_failed",
        }.get(self.kind, "rank_failed")


class RankDied(PoolFault):
    cause = "rank_died"

    def __init__(self, rank: int, exitcode: int | None) -> None:
        super().__init__(rank, f"rank {rank} process exited with code {exitcode}", context_ok=False)
        self.exitcode = exitcode


class StepTimeout(PoolFault):
    """No reply within the step deadline: a rank is wedged (or its peers wait on one that is)."""

    cause = "rank_timeout"

    def __init__(self, ranks: list[int], deadline_s: float, what: str) -> None:
        super().__init__(
            ranks[0] if ranks else None,
            f"{what} did not finish within {deadline_s:.2f}s; ranks {ranks} did not answer",
        )
        self.ranks = ranks
        self.deadline_s = deadline_s


class PoolUnavailable(PoolFault):
    """The pool is not serving (loading, recovering, unloaded)."""

    cause = "model_unavailable"
