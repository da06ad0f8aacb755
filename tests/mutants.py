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
        "        return len(self._at) >= self.max_failures\n",
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
        "costly-rung-judged-clean", 3, "neurond/judgement.py",
        "    if rung_cost(rung) > rung_cost(need):\n",
        "    if False:\n",
        ("tests/observe/test_audit.py",),
        "the journal calls a recovery clean although it took a costlier rung than the fault needed",
    ),
    Mutant(
        "leader-imports-torch", 4, "neurond/served_model.py",
        '    path = model_dir / "tokenizer.json"\n',
        '    import torch  # noqa: F401\n    path = model_dir / "tokenizer.json"\n',
        ("tests/test_serving.py::test_leader_never_loads_torch",),
        "the leader loads libtorch (and with it, on a GPU box, CUDA)",
    ),
    Mutant(
        "weights-unchecked-at-start", 2, "neurond/served_model.py",
        "    for file in files:\n        check_safetensors(file)\n",
        "    pass\n",
        ("tests/test_startup_errors.py::test_truncated_weights",),
        "a checkpoint the ranks cannot read goes through rank faults and the breaker (55 s, exit 4) instead of "
        "exit 2 with the file named",
    ),
    Mutant(
        "model-error-not-journaled", 3, "neurond/server.py",
        "            return startup_failed(exc.cause, exc.problem, exc.path, c)\n",
        "            raise\n",
        ("tests/test_startup_errors.py::test_missing_tokenizer",),
        "a start-up refused for the model exits without its startup_failed entry (and with 1: systemd restarts it)",
    ),
    Mutant(
        "no-per-peer-limit", 5, "neurond/api/connections.py",
        "if shared < self.max_connections - self.connection_reserve and held < self.max_connections_per_peer:",
        "if shared < self.max_connections - self.connection_reserve:",
        ("tests/api/test_connections.py::test_one_peer_holds_at_most_max_connections_per_peer",
         "tests/api/test_connections.py::test_a_flood_from_one_address_never_locks_out_another"),
        "one client address may take every connection place: its flood locks out everyone else",
    ),
    Mutant(
        "no-local-reserve", 5, "neurond/api/connections.py",
        "        if self.reserved < self.connection_reserve and (loopback or _same_host(peer, local())):\n",
        "        if False:\n",
        ("tests/api/test_connections.py::test_the_reserve_is_for_this_hosts_own_peers_only",),
        "with every place taken, this host's own health probe and scrape are refused too",
    ),
    Mutant(
        "world-readable-token-accepted", 5, "neurond/server.py",
        "    if perm & 0o004:\n",
        "    if False:\n",
        ("tests/api/test_security.py::test_token_files_others_could_read_or_change_are_refused",),
        "a token file every user can read is accepted silently",
    ),
    Mutant(
        "public-bind-without-token", 5, "neurond/config.py",
        "        if not self.api_token_file and not self.allow_unauthenticated and not is_loopback(self.host):\n",
        "        if False:\n",
        ("tests/test_config.py::test_a_public_host_needs_a_token_or_an_explicit_setting",),
        "a daemon listens on a public address with no token, and nobody said so",
    ),
    Mutant(
        "ready-leaks-detail", 5, "neurond/api/app.py",
        '''        return _json({"status": "unavailable", "state": state, "cause": name, "reason": name},\n''',
        '''        return _json({"status": "unavailable", "state": state, "cause": name, "reason": name,\n'''
        '''                      "detail": cause.detail if cause else None},\n''',
        ("tests/api/test_security.py::test_ready_says_the_state_and_cause_never_the_detail",),
        "the unauthenticated /ready publishes a rank's exception text",
    ),
    Mutant(
        "http2-served", 5, "neurond/api/http11.py",
        "    tcp_server.ProtocolWrapper = _HTTP11Only  # type: ignore[misc]",
        "    pass  # type: ignore[misc]",
        ("tests/api/test_connections.py::test_http2_with_prior_knowledge_gets_505_and_a_closed_connection",),
        "HTTP/2 is served, past the connection and header limits built for HTTP/1.1",
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
