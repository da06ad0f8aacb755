"""Mutants of the mechanisms behind neurond's promises, and the tests that must kill each one.

A test guards a promise only if breaking the mechanism makes it fail. Each mutant below breaks one mechanism in
one place (an exact piece of code, replaced), names the promise it attacks (DEVELOPERS.md: 1 no request waits
forever, 2 no human needed, 3 the journal tells the whole story, 4 the leader never touches CUDA, 5 bad input
gets a clear 4xx) and the tests that must then fail. `scripts/mutants` applies each to a copy of the tree and
runs only those tests; tests/test_mutants.py checks in CI that every mutant still applies (its code is there,
exactly once) and names tests that exist, so the catalogue cannot rot silently when the code moves.

Pure data and a pure function, no pytest: scripts/mutants imports it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Mutant:
    name: str
    promise: int  # 1..5, DEVELOPERS.md
    file: str  # relative to the repository root
    old: str  # exactly once in `file`
    new: str
    tests: tuple[str, ...]  # pytest node ids, at least one of which must fail
    why: str  # what the mutant breaks, in a sentence


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "deadline-stops-learning", 1, "neurond/engine/engine.py",
        "        self.deadline.observe_decode(took)\n",
        "        pass\n",
        ("tests/pool/test_fault_matrix.py::test_fault_fails_request_and_pool_recovers[wedge-0-decode]",),
        "decode steps no longer feed the adaptive deadline: a wedge is found at the ceiling (20 s), not at ~1-4 s",
    ),
    Mutant(
        "resume-wait-unbounded", 1, "neurond/engine/engine.py",
        "if gone or now - since >= self.resume_wait_s:",
        "if gone:",
        ("tests/engine/test_engine.py::test_interrupted_requests_wait_at_most_resume_wait",),
        "a request waiting for a repair waits as long as the repair takes, not resume_wait_s",
    ),
    Mutant(
        "aborted-call-succeeds", 1, "neurond/worker/main.py",
        "        if comm.aborted_since(mark) and isinstance(",
        "        if False and isinstance(",
        ("tests/worker/test_abort.py::test_a_call_aborted_under_it_is_comm_aborted_whether_it_returned_or_raised",),
        "a collective released by an abort returns garbage as a result (NCCL returns without an exception)",
    ),
    Mutant(
        "grace-never-rechecks", 2, "neurond/pool/ladder.py",
        "                await asyncio.sleep(RELEASE_POLL_S)\n"
        "                busy = await self._ping_busy(pool, victims)\n",
        "                await asyncio.sleep(RELEASE_POLL_S)\n",
        ("tests/pool/test_ladder_unit.py::test_a_rank_released_during_the_grace_is_kept",),
        "a rank released during the grace is killed anyway: replace_ranks where comm_rebuild fits",
    ),
    Mutant(
        "gloo-abort-closes-nothing", 2, "neurond/worker/comm.py",
        "                    self._gloo.shut_down()\n",
        "                    pass\n",
        ("tests/worker/test_gloo_abort.py",
         "tests/pool/test_fault_matrix.py::test_fault_fails_request_and_pool_recovers[raise-1-prefill]"),
        "gloo's abort leaves the group's connections open: a peer stuck in a collective is not released",
    ),
    Mutant(
        "ladder-step-unbounded", 2, "neurond/pool/ladder.py",
        "            return await asyncio.wait_for(step, deadline_s * calls + BACKSTOP_S)\n",
        "            return await step\n",
        ("tests/pool/test_ladder_unit.py::test_a_pool_that_ignores_a_deadline_is_bounded_by_the_ladder",),
        "a repair step that ignores its deadline holds the ladder for ever",
    ),
    Mutant(
        "breaker-never-opens", 2, "neurond/pool/supervisor.py",
        "        return len(self._failures) >= self.config.breaker_max_failures\n",
        "        return False\n",
        ("tests/pool/test_supervisor.py::test_failed_attempts_wait_longer_each_time_and_the_breaker_does_not_wait",),
        "a pool that never recovers is retried for ever instead of landing in `unloaded` with the reason",
    ),
    Mutant(
        "replay-forgets-history", 2, "neurond/engine/engine.py",
        "            history = tuple(req.generated) if last and req.sampling.needs_history else ()\n",
        "            history = ()\n",
        ("tests/engine/test_engine.py::test_a_replay_tells_the_ranks_what_each_sequence_generated_if_its_sampling_"
         "needs_it",
         "tests/api/test_completions.py::test_rank_fault_mid_completion_is_replayed_like_chat"),
        "a replayed request forgets what it generated: penalties and grammars restart, the answer changes",
    ),
    Mutant(
        "costly-rung-judged-clean", 3, "neurond/observe/incident.py",
        "    if rung_cost(rung) > rung_cost(need):\n",
        "    if False:\n",
        ("tests/observe/test_audit.py",),
        "the journal calls a recovery clean although it took a costlier rung than the fault needed",
    ),
    Mutant(
        "leader-imports-torch", 4, "neurond/served_model.py",
        "    tokenizer = ChatTokenizer(model_dir)\n",
        "    import torch  # noqa: F401\n    tokenizer = ChatTokenizer(model_dir)\n",
        ("tests/test_serving.py::test_leader_never_loads_torch",),
        "the leader loads libtorch (and with it, on a GPU box, CUDA)",
    ),
    Mutant(
        "prompt-over-window-accepted", 5, "neurond/api/app.py",
        "        if len(prompt_ids) >= ctx:\n",
        "        if False:\n",
        ("tests/api/test_validation.py::test_bad_request_gets_400[prompt alone over the context]",),
        "a prompt longer than the context window is not refused with its numbers",
    ),
)


def apply(mutant: Mutant, root: Path) -> str:
    """Write `mutant` into the tree at `root`; returns the file's original text (to restore it). ValueError if
    the mutant's code is not in the file exactly once."""
    path = root / mutant.file
    text = path.read_text()
    found = text.count(mutant.old)
    if found != 1:
        raise ValueError(f"mutant {mutant.name}: its code is in {mutant.file} {found} times, not once")
    path.write_text(text.replace(mutant.old, mutant.new))
    return text
