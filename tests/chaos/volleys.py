"""Which faults the soak arms together (a volley), and which incidents each volley must cause.

Each kind of volley is a case a daemon meets in production:
  single         one fault, one rank, one phase: one incident, its cause the one the fault kind stands for
  repeat         raise or oom with count=2: the rank keeps its process, so the fault fires again on the first
                 matching step after the repair (back-to-back faults): two incidents
  same_step      both ranks armed for the same phase (two admin calls at once): when both fire in one step, one
                 incident whose root cause is one of theirs (the daemon picks the root cause). A step starting
                 between the two arming calls fires only the first: then each fires in its own step (two
                 incidents), or the second is lost with a rank the first one's repair replaced (one incident).
  during_repair  a load-phase fault on a rank, then that rank dies: the repair respawns it, its load faults, and
                 the next attempt (a full reload) repairs: one incident with two `fault` transitions
  external_kill  SIGKILL to a worker from outside (the OOM killer, an operator) at a random moment, inside a
                 step or between two: one incident, rank_died
The first volleys are a shuffled deck that holds every volley type and fires every fault kind in a step, so even
a short soak covers them all; after the deck, volleys are drawn from the mix.
Faults fire on the next matching step once requests flow (the soak's clients never stop while a volley is
armed), so each volley lists the root-cause sequences it may play out as (`stories`), and the soak demands one
of them exactly: no incident more, none fewer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

STEP_KINDS = ("raise", "oom", "exit", "sigkill", "segfault", "wedge")  # every kind that works on CPU
STEP_PHASES = ("prefill", "decode", "collective")
DEATHS = ("exit", "sigkill", "segfault")

# The root cause (fault_detected's cause, and the failed request's error code) each kind must produce.
CAUSE_OF_KIND = {"raise": "rank_failed", "oom": "out_of_memory", "exit": "rank_died", "sigkill": "rank_died",
                 "segfault": "rank_died", "wedge": "rank_timeout"}


@dataclass(frozen=True, slots=True)
class Fault:
    rank: int
    kind: str
    phase: str  # a step phase, "load", or "external" (the soak kills the worker itself)
    count: int = 1


@dataclass(frozen=True, slots=True)
class Volley:
    name: str
    faults: tuple[Fault, ...]
    # The ways it may play out: each a sequence of incidents, given as the root causes allowed for each.
    stories: tuple[tuple[frozenset[str], ...], ...]
    faults_per_incident: int = 1  # `fault` transitions each of its incidents must hold (at least)

    @property
    def min_incidents(self) -> int:
        return min(len(s) for s in self.stories)

    @property
    def max_incidents(self) -> int:
        return max(len(s) for s in self.stories)

    def story(self, incidents: int) -> tuple[frozenset[str], ...] | None:
        return next((s for s in self.stories if len(s) == incidents), None)

    def label(self) -> str:
        return f"{self.name}: " + " + ".join(
            f"{f.kind}@{f.phase} r{f.rank}" + (f" x{f.count}" if f.count > 1 else "") for f in self.faults)


# How often each volley is drawn. Load faults cost a full reload each, so they are rare.
DEFAULT_MIX = {"single": 0.6, "repeat": 0.1, "same_step": 0.1, "during_repair": 0.08, "external_kill": 0.12}


def schedule(rng: random.Random, mix: dict[str, float], load_kinds: tuple[str, ...]):
    """(volley, in_deck) for ever: the coverage deck first, then draws from `mix`.

    The deck holds one volley of each type other than `single`, plus a single for each step fault kind those
    did not already fire in a step, shuffled: a short soak covers every kind and every volley type."""
    deck = [draw(rng, name, load_kinds) for name in mix if name != "single"]
    covered = {f.kind for v in deck for f in v.faults if f.phase in STEP_PHASES}
    deck += [draw(rng, "single", load_kinds, kind) for kind in STEP_KINDS if kind not in covered]
    rng.shuffle(deck)
    for volley in deck:
        yield volley, True
    while True:
        yield draw(rng, rng.choices(list(mix), weights=list(mix.values()))[0], load_kinds), False


def draw(rng: random.Random, name: str, load_kinds: tuple[str, ...], kind: str | None = None) -> Volley:
    rank = rng.randrange(2)
    if name == "single":
        kind = kind or rng.choice(STEP_KINDS)
        return Volley(name, (Fault(rank, kind, rng.choice(STEP_PHASES)),), ((frozenset({CAUSE_OF_KIND[kind]}),),))
    if name == "repeat":
        kind = rng.choice(("raise", "oom"))
        cause = frozenset({CAUSE_OF_KIND[kind]})
        return Volley(name, (Fault(rank, kind, rng.choice(STEP_PHASES), count=2),), ((cause, cause),))
    if name == "same_step":
        phase = rng.choice(STEP_PHASES)
        kinds = (rng.choice(STEP_KINDS), rng.choice(STEP_KINDS))
        either = frozenset(CAUSE_OF_KIND[k] for k in kinds)
        return Volley(name, (Fault(0, kinds[0], phase), Fault(1, kinds[1], phase)), ((either,), (either, either)))
    if name == "during_repair":
        # The load fault is armed first, so the death cannot be repaired before it is in place.
        faults = (Fault(rank, rng.choice(load_kinds), "load"),
                  Fault(rank, rng.choice(DEATHS), rng.choice(("prefill", "decode"))))
        return Volley(name, faults, ((frozenset({"rank_died"}),),), faults_per_incident=2)
    if name == "external_kill":
        return Volley(name, (Fault(rank, "sigkill", "external"),), ((frozenset({"rank_died"}),),))
    raise ValueError(f"unknown volley {name!r}")

