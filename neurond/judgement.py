"""How good a recovery was: the rules that make NEUROND_OUTCOME clean or degraded.

Beside the lifecycle's vocabulary (neurond/lifecycle.py: Rung) because both sides use them: the supervisor
judges each incident once, as it ends, and journals the verdict (NEUROND_OUTCOME, NEUROND_OUTCOME_WHY on
recovery_finished); `neurond audit` judges an incident rebuilt from any daemon's journal with the same function
(neurond/observe/incident.py), so the saved queries and the audit agree. Pure functions of the facts.
"""

from __future__ import annotations

from neurond.lifecycle import Rung

RUNGS = tuple(Rung)  # cheapest first (docs/recovery.md)
# Faults after which the rank's process and device context are intact: a fresh communicator among the same
# processes repairs them. Any other fault costs the rank its process: replace it (or, alone, reload).
PROCESS_INTACT = ("rank_failed", "out_of_memory")
# A recovery slower than this is degraded, whatever rung did it. Fixed, not a setting: NEUROND_OUTCOME=clean
# must mean the same in every journal. It is also the audit's default stuck bound: one repair attempt with the
# default settings may take ~620 s (load_timeout_s 600).
CLEAN_WITHIN_S = 900.0


def needed_rung(cause: str | None, tp_size: int | None, tp_impl: str | None = None) -> str:
    """The cheapest rung that can repair `cause`. Lenient where the journal cannot tell (a cuda_error may or
    may not have ruined the context): a cheaper rung than this is never held against a recovery."""
    tp = tp_size or 1
    if tp > 1 and tp_impl == "transformers":
        # Journals of daemons before tp_impl was retired: their TP layers stayed bound to the process group
        # they were loaded with, so a full reload was the cheapest repair at TP>1.
        return "full_reload"
    if cause in PROCESS_INTACT:
        return "comm_rebuild"
    return "replace_ranks" if tp > 1 else "full_reload"


def rung_cost(rung: str | None) -> int:
    return RUNGS.index(rung) if rung in RUNGS else len(RUNGS)


def judge_recovery(cause: str | None, tp_size: int | None, rung: str | None, attempt: int | None,
                   abort_failed: bool, tp_impl: str | None = None,
                   duration_ms: int | None = None) -> tuple[str, str]:
    """("clean" | "degraded", why) for a finished recovery that took `duration_ms` from the fault."""
    why = []
    need = needed_rung(cause, tp_size, tp_impl)
    if rung_cost(rung) > rung_cost(need):
        why.append(f"{rung} where {need} fits {cause}")
    if (attempt or 1) > 1:
        why.append(f"{attempt} attempts")
    if abort_failed:
        why.append("abort failed")
    if duration_ms is not None and duration_ms > CLEAN_WITHIN_S * 1000:
        why.append(f"recovered only after {duration_ms / 1000:.0f} s")
    return ("degraded", "; ".join(why)) if why else ("clean", "")
