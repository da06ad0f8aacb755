"""The n choices of one API request: a ChoiceGroup, and how its members share their prompt.

The choices share their prompt but for its last token (from which each draws its own first token): one member
prefills it. With the static cache it is then copied into the others' slots (`ChoiceGroup.copy`, a rank command:
CopyPrefix). Paged, the others take the prefiller's whole blocks of it instead (`ChoiceGroup.shares`, no rank
work: their table rows change) and each prefills what is left, the partial block and the last token; their own
blocks for those positions go back to the pool. The scheduler (`scheduler.py`) does the block work and asks a
group what its members prefill (`ChoiceGroup.prefill_end`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neurond.engine.request import GenerationRequest


def group_choices(reqs: list[GenerationRequest]) -> None:
    """The requests of one API request: several with the same prompt (its n choices) form a ChoiceGroup, the
    `group` of each (a prompt of one token has nothing to share)."""
    shared = len(reqs[0].prompt_ids) - 1
    if len(reqs) > 1 and shared > 0 and all(r.prompt_ids == reqs[0].prompt_ids for r in reqs):
        group = ChoiceGroup(list(reqs), shared)
        for req in reqs:
            req.group = group


def groups(running: list[GenerationRequest]) -> list[ChoiceGroup]:
    """The groups of the running requests, each once."""
    return list({id(r.group): r.group for r in running if r.group is not None}.values())


@dataclass(eq=False, slots=True)
class ChoiceGroup:
    """The requests for the n choices of one API request. Their prompt, but for its last token, is prefilled
    once, by one member, and copied into the others' slots (static cache) or shared as blocks (paged)."""

    members: list[GenerationRequest]
    shared: int  # prompt tokens every member's cache starts with
    prefiller: GenerationRequest | None = None  # the member prefilling the shared part now

    def source(self) -> GenerationRequest | None:
        """A member whose slot holds the shared part now, if any."""
        return next((m for m in self.members if m.slot is not None and m.prefilled >= self.shared), None)

    def prefill_end(self, req: GenerationRequest, paged: bool) -> int | None:
        """Where the prefill of `req`, a member with less than the shared part prefilled, stops in this turn;
        None if it waits. With no source yet, one member prefills the shared part (it becomes the prefiller: the
        first to ask, or the next once the prefiller lost its slot) and the others wait for it; once a source
        holds it, the static cache's members wait for their copy (`copy`), and paged ones (that shared its whole
        blocks, or had none to share) prefill the rest of their context themselves."""
        if self.source() is not None:
            return len(req.context) if paged else None
        if self.prefiller not in (None, req) and self.prefiller.slot is not None:
            return None
        self.prefiller = req
        return self.shared

    def copy(self, running: list[GenerationRequest]) -> tuple[GenerationRequest, list[GenerationRequest]] | None:
        """The static cache: the member whose slot holds the shared part, and the running members with nothing
        prefilled yet to copy it to; None if there is no copy to make."""
        source = self.source()
        targets = [r for r in self.members if r in running and r.prefilled == 0 and r is not source]
        return (source, targets) if source is not None and targets else None

    def shares(self, running: list[GenerationRequest], block_size: int) -> list[tuple[GenerationRequest, list[int]]]:
        """Paged: (member, the blocks it takes) for each running member with nothing prefilled yet, once a
        source holds the shared part: the source's whole blocks of it, in place of as many of the member's own."""
        source = self.source()
        if source is None:
            return []
        whole = min(self.shared // block_size, len(source.blocks))
        if not whole:
            return []
        return [(req, source.blocks[:whole]) for req in self.members
                if req is not source and req in running and not req.prefilled and not req.decoding]
