"""Model load progress as a person reads it, from each rank's latest LoadProgress report.

Used by STATUS= (`systemctl status neurond`), the journal's load_progress entries and `neurond status`, so all
three say the same thing in the same words. Bytes are those of the checkpoint files a rank has read, not the
slices it keeps: every rank reads its part of every file, so each rank's total is the checkpoint's size.
"""

from __future__ import annotations

from collections.abc import Mapping

from neurond.protocol import LoadProgress

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def percent(done: int | None, total: int | None) -> int | None:
    if done is None or not total:
        return None
    return min(100, int(100 * done / total))


def rank_text(done_bytes: int | None, total_bytes: int | None, files_done: int | None, files_total: int | None) -> str:
    """'1.2 GiB of 16.1 GiB (7%), 1/4 files' (fields it lacks show as '?')."""
    pct = percent(done_bytes, total_bytes)
    shown = "?" if pct is None else f"{pct}%"
    files = f"{'?' if files_done is None else files_done}/{'?' if files_total is None else files_total}"
    return f"{human_bytes(done_bytes)} of {human_bytes(total_bytes)} ({shown}), {files} files"


def summary(progress: Mapping[int, LoadProgress], world_size: int) -> str:
    """One line for the whole pool: 'loaded 3.2 GiB of 32.2 GiB (10%): rank 0 12%, rank 1 8%, rank 2 starting'.
    Empty before any rank has reported."""
    if not progress:
        return ""
    done = sum(p.done_bytes for p in progress.values())
    total = sum(p.total_bytes for p in progress.values())
    ranks = []
    for rank in range(max(world_size, max(progress) + 1)):
        report = progress.get(rank)
        state = "starting" if report is None else f"{percent(report.done_bytes, report.total_bytes)}%"
        ranks.append(f"rank {rank} {state}")
    return f"loaded {human_bytes(done)} of {human_bytes(total)} ({percent(done, total)}%): " + ", ".join(ranks)


def in_progress(progress: Mapping[int, LoadProgress], world_size: int) -> bool:
    """Some rank has not reported yet or has files left (a pool whose every rank is loaded shows no progress)."""
    return len(progress) < world_size or any(p.files_done < p.files_total for p in progress.values())


def from_json(data: Mapping[str, Mapping]) -> dict[int, LoadProgress]:
    """The `load_progress` object of /admin/status (rank as a string key) back into reports."""
    return {int(rank): LoadProgress(**fields) for rank, fields in data.items()}
