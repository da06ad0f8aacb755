"""What every neurond event is called in the journal: its fixed MESSAGE_ID, its priority, the stable prefix of
its MESSAGE, and the operator text that `journalctl -x` shows (the message catalog).

The MESSAGE_IDs were made once with `journalctl --new-id128` and never change: saved queries, the audit and
the operators' own alerts match on them. This module is the single source of `systemd/neurond.catalog`
(`python -m neurond.observe.catalog > systemd/neurond.catalog`; a test fails when the two disagree).
"""

from __future__ import annotations

from dataclasses import dataclass

from neurond.lifecycle import LifecycleState
from neurond.observe.events import Event, Observation

# syslog priorities (what PRIORITY= carries)
CRIT, ERR, WARNING, NOTICE, INFO, DEBUG = 2, 3, 4, 5, 6, 7


@dataclass(frozen=True)
class Message:
    event: Event
    message_id: str
    priority: int
    subject: str  # catalog Subject:, @FIELD@ substituted by journalctl -x
    text: str  # catalog body: what happened, what it means, what to do

    @property
    def prefix(self) -> str:
        """Every MESSAGE of this event starts with this: `journalctl -g '^neurond fault_detected:'`."""
        return f"neurond {self.event.value}:"


MESSAGES: dict[Event, Message] = {m.event: m for m in (
    Message(Event.TRANSITION, "15cc44d225bb459aae88a9247eeaf6d2", INFO,
            "neurond model lifecycle: @NEUROND_STATE_FROM@ -> @NEUROND_STATE_TO@",
            """The model lifecycle of neurond moved from @NEUROND_STATE_FROM@ to @NEUROND_STATE_TO@ on the event
@NEUROND_LIFECYCLE_EVENT@ (cause: @NEUROND_CAUSE@). Transitions of one fault episode share NEUROND_INCIDENT.

healthy serves requests; poisoned, aborting and reloading are steps of a repair; loading starts the pool;
unloaded serves 503 (after a give-up the daemon exits with code 4 once unloaded_exit_s has passed);
stopped ends the process.

Nothing to do for a single transition. To see the whole episode:
    journalctl -u neurond NEUROND_INCIDENT=@NEUROND_INCIDENT@"""),
    Message(Event.FAULT_DETECTED, "18a07326dabb4639935b64abb8614104", ERR,
            "neurond detected a rank fault: @NEUROND_CAUSE@ on rank @NEUROND_RANK@",
            """A rank of the tensor-parallel pool failed: @NEUROND_CAUSE@ on rank @NEUROND_RANK@
(incident @NEUROND_INCIDENT@). rank_failed: the rank raised inside a step; out_of_memory: it ran out of
memory; cuda_error: a CUDA error (sticky ones ruin the process); rank_died: the process exited;
rank_timeout: a step missed its deadline (a wedged rank or a hung kernel). NEUROND_DETAIL says more.

The model stops admitting requests and the supervisor repairs the pool by itself; the entries of this
incident follow (abort, repair rung, recovery or give-up).

What to do: nothing while recoveries are rare and clean (neurond audit). Repeated faults on one rank
point at that GPU: check `nvidia-smi -q -i <gpu>` for Xid errors and ECC counts, and the kernel log."""),
    Message(Event.ABORT_STARTED, "59517f778fad44559c93b0dcb542ff67", NOTICE,
            "neurond is aborting the communicator (incident @NEUROND_INCIDENT@)",
            """First rung of a repair: neurond asks every live rank's control thread to abort the collective
communicator, so that no rank stays blocked inside a collective that can never finish. Then each rank is
pinged; a rank that is dead, still stuck, or whose device context is ruined is replaced.

Nothing to do; an abort_finished or abort_failed entry follows."""),
    Message(Event.ABORT_FINISHED, "40498e9f2cee42a0bca24bba12f57b9d", INFO,
            "neurond aborted the communicator in @NEUROND_DURATION_MS@ ms",
            """Every live rank confirmed the communicator abort within abort_timeout_s. The repair goes on with
the cheapest rung that fits (NEUROND_RUNG on the next transitions).

Nothing to do."""),
    Message(Event.ABORT_FAILED, "eb777724fa2f4a8db8f6236ac94fd434", WARNING,
            "neurond could not abort the communicator: @NEUROND_DETAIL@",
            """At least one rank did not confirm the communicator abort within abort_timeout_s, or failed it
(NEUROND_DETAIL says which). neurond does not wait on it: those ranks are killed and the pool is reloaded,
which costs a model load instead of a communicator rebuild. `neurond audit` counts such a recovery as
degraded.

What to do: once, nothing. Repeatedly: the collective library cannot unblock that GPU (a hung kernel or a
wedged NVLink/PCIe peer); check the kernel log for NVIDIA Xid errors and consider draining the host for a
GPU reset (`nvidia-smi -r`) or a reboot."""),
    Message(Event.RANK_KILLED, "7cad189088d94458a4b474919848f4a3", WARNING,
            "neurond killed rank @NEUROND_RANK@",
            """neurond sent SIGKILL to rank @NEUROND_RANK@ because it could not go on: it was dead already,
stuck inside the failed call after the abort, or its device context was ruined. It is replaced by a new
process (replace_ranks: the other ranks keep theirs) or the whole pool is reloaded (full_reload).

Nothing to do; see the fault_detected entry of incident @NEUROND_INCIDENT@ for the cause."""),
    Message(Event.RANK_SPAWNED, "74928738349e493aad3b34365b12562d", INFO,
            "neurond started rank @NEUROND_RANK@ (pid @NEUROND_PID@)",
            """A rank worker process was started: at daemon start, after a load or reload, or as a replacement
during a repair (then it carries NEUROND_INCIDENT). The worker's own entries carry NEUROND_RANK too.

Nothing to do."""),
    Message(Event.COMM_REBUILT, "afb4597ded464d9db795c5382b9a27ee", INFO,
            "neurond rebuilt the communicator in @NEUROND_DURATION_MS@ ms (weights kept)",
            """A fresh communicator among the rank processes, on a fresh rendezvous. On its own it is the
cheapest rung (comm_rebuild: no rank had to be replaced, weights kept); within replace_ranks it joins the
replacement ranks with the survivors, which keep their weights.

Nothing to do."""),
    Message(Event.RECOVERY_BACKOFF, "c609200d577d432f9d51e529d07cd4d7", NOTICE,
            "neurond waits @NEUROND_DURATION_MS@ ms before recovery attempt @NEUROND_ATTEMPT@",
            """A recovery attempt of incident @NEUROND_INCIDENT@ failed (the fault on the entry before this one:
@NEUROND_CAUSE@), and neurond waits @NEUROND_DURATION_MS@ ms before attempt @NEUROND_ATTEMPT@, a full reload.
The wait is recovery_backoff_s after the first failed attempt and doubles after each further one, up to
recovery_backoff_max_s, so that a cause that outlives one attempt (memory still held by a dying process, a
checkpoint's filesystem coming back) can pass. The model serves 503 with Retry-After meanwhile. Failed
attempts count towards the crash-loop breaker (breaker_max_failures within breaker_window_s).

What to do: nothing for one wait. Several in one incident mean every reload fails the same way: read the
incident's fault_detected entries and the ranks' own log lines, which say why."""),
    Message(Event.RECOVERY_FINISHED, "3e00fbab0cd245b9a899a1fffc06fcab", NOTICE,
            "neurond recovered in @NEUROND_DURATION_MS@ ms via @NEUROND_RUNG@ (@NEUROND_OUTCOME@)",
            """The pool is healthy again and serving, @NEUROND_DURATION_MS@ ms after the fault was detected, by
the rung @NEUROND_RUNG@ on attempt @NEUROND_ATTEMPT@ (incident @NEUROND_INCIDENT@).

NEUROND_OUTCOME is clean when the cheapest rung that fits the fault worked on the first attempt with a
confirmed abort, within 900 s of the fault, and degraded otherwise (NEUROND_OUTCOME_WHY says why).

What to do: nothing for clean recoveries. Degraded ones cost more downtime than needed: look at the
abort_failed and fault entries of the incident, and at the GPU named by NEUROND_RANK."""),
    Message(Event.GAVE_UP, "e437481ce2984cbebf269dd878e7f32d", CRIT,
            "neurond gave up recovering and unloaded the model: @NEUROND_DETAIL@",
            """The crash-loop breaker opened: too many recoveries within breaker_window_s
(@NEUROND_DETAIL@). neurond stopped every rank and serves 503 model_unavailable; after
unloaded_exit_s it exits with code 4 so that systemd starts a fresh daemon, and the unit's start limit
ends a crash loop in the failed state.

What to do: this host needs an operator. Read the incident
    journalctl -u neurond NEUROND_INCIDENT=@NEUROND_INCIDENT@
check the GPUs (nvidia-smi, kernel log for Xid errors), the checkpoint and free memory, fix the cause, then
`systemctl reset-failed neurond && systemctl restart neurond` (or POST /admin/load on the admin socket)."""),
    Message(Event.REQUEST_FAILED, "e9a6c5d53c724cb7be80f40cce586eee", WARNING,
            "neurond request @NEUROND_REQUEST_ID@ failed by a rank fault: @NEUROND_CAUSE@",
            """Request @NEUROND_REQUEST_ID@ was in flight when a rank failed and got HTTP @NEUROND_STATUS@ with the
error code @NEUROND_CAUSE@ and Retry-After (incident @NEUROND_INCIDENT@). Clients may retry it.

Nothing to do beyond the incident itself; many such entries per incident mean clients were not told to
back off (check that they honour Retry-After)."""),
    Message(Event.LOAD_PROGRESS, "ea493c1d73014a738199268f50e1bd0d", INFO,
            "neurond rank @NEUROND_RANK@ loaded @NEUROND_FILES_DONE@ of @NEUROND_FILES_TOTAL@ checkpoint files",
            """Rank @NEUROND_RANK@ is loading its shard of the model: @NEUROND_DONE_BYTES@ of @NEUROND_TOTAL_BYTES@ bytes
of the checkpoint files read, @NEUROND_FILES_DONE@ of @NEUROND_FILES_TOTAL@ files (every rank reads its slices
of every file). The journal gets the first and the last report of each rank's load and one every 10 s in
between; `systemctl status neurond` (STATUS=) and `neurond status` show the latest one.

Nothing to do. A load that stops making progress ends after load_timeout_s with a rank_timeout fault. A
slow one points at the disk or the filesystem the checkpoint is on (a cold page cache, a network mount):
compare the time between the first and the last entry of a rank with the checkpoint's size."""),  # noqa: E501 - the catalog entry's own wrapping
    Message(Event.STARTUP_FAILED, "598b58ceff134ed396bdcbf73ffd1d21", CRIT,
            "neurond cannot start: @NEUROND_PATH@: @NEUROND_DETAIL@",
            """neurond did not start: its configuration or its model cannot be served (@NEUROND_CAUSE@).
@NEUROND_PATH@: @NEUROND_DETAIL@

It exits with code 2 at once, before any rank starts, and the unit's RestartPreventExitStatus=2 keeps
systemd from restarting it: a restart cannot fix a file. NEUROND_CAUSE says what is wrong:
config: the TOML file or a setting; token_file: api_token_file or admin_token_file; fd_limit: the hard
open-file limit is below what max_connections needs; model_dir: the model directory is missing or is not
a checkpoint; model_config: its config.json or generation_config.json; weights: a *.safetensors file or
the index that names them; tokenizer: tokenizer.json, tokenizer_config.json or the chat template;
builtin_model: the built-in model could not be written to cache_dir.

What to do: fix the file NEUROND_PATH names (or the setting), make sure the neurond user can read it, then
`systemctl reset-failed neurond && systemctl start neurond`."""),
)}

BY_ID: dict[str, Message] = {m.message_id: m for m in MESSAGES.values()}


def priority_of(o: Observation) -> int:
    """Severity of one entry: a few events are worse in some states than in others."""
    if o.event is Event.TRANSITION:
        if o.state_to == LifecycleState.POISONED:
            return WARNING
        if o.state_to == LifecycleState.UNLOADED and o.cause == "breaker_open":
            return ERR
        return NOTICE if o.state_to in (LifecycleState.UNLOADED, LifecycleState.STOPPED) else INFO
    if o.event is Event.RECOVERY_FINISHED and o.outcome == "degraded":
        return WARNING
    return MESSAGES[o.event].priority


def render_catalog() -> str:
    """The catalog file for /usr/lib/systemd/catalog/ (format: systemd's journal-catalog)."""
    out = ["# neurond message catalog: generated by `python -m neurond.observe.catalog`; do not edit by hand.\n"
           "# Install to /usr/local/lib/systemd/catalog/ and run `journalctl --update-catalog`.\n"]
    for m in MESSAGES.values():
        out.append(f"\n-- {m.message_id}\nSubject: {m.subject}\nDefined-By: neurond\n\n{m.text}\n")
    return "".join(out)


if __name__ == "__main__":
    print(render_catalog(), end="")
