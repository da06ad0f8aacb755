"""`neurond audit`: recovery across a fleet, from the journal alone.

It reads neurond's event entries (by their MESSAGE_IDs) with journalctl from the local journal, a directory
of journals gathered by systemd-journal-remote (`--directory`), or journal files (`--file`), rebuilds every
incident per daemon instance (neurond/observe/incident.py), each entry counted once however many copies the
journals hold (neurond/observe/entries.py), and answers the questions of journal-queries/: clean
recoveries, hangs, failed aborts and reloads, give-ups, failed requests, incidents per host, MTTR.

Exit code, for cron and monitoring (the Nagios convention): 0 nothing needs an operator; 1 a degraded
recovery; 2 an incident stuck or given up; 3 the journal could not be read.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict

from neurond.judgement import CLEAN_WITHIN_S
from neurond.observe.catalog import BY_ID
from neurond.observe.entries import unique
from neurond.observe.incident import CLASSES, NEEDS_ACTION, Incident, rebuild

EXIT_UNREADABLE = 3
DEFAULT_STUCK_AFTER_S = CLEAN_WITHIN_S


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--directory", "-D", help="journal directory, e.g. what systemd-journal-remote wrote")
    where.add_argument("--file", action="append", help="journal file or quoted glob (repeatable)")
    parser.add_argument("--since", help="only entries since (journalctl --since syntax, e.g. -7d)")
    parser.add_argument("--until", help="only entries until")
    parser.add_argument("--stuck-after", dest="stuck_after", type=float, default=DEFAULT_STUCK_AFTER_S,
                        help="seconds after which an unrecovered incident is stuck "
                             f"(default {DEFAULT_STUCK_AFTER_S:.0f}; a recovery is clean only within "
                             f"{CLEAN_WITHIN_S:.0f} s whatever this says)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def source_args(args: argparse.Namespace) -> list[str]:
    if args.directory:
        return [f"--directory={args.directory}"]
    if args.file:
        return [f"--file={f}" for f in args.file]
    return []


def read_entries(source: list[str], since: str | None = None, until: str | None = None) -> list[dict]:
    """neurond's event entries, one dict per entry (values as journalctl -o json gives them)."""
    journalctl = shutil.which("journalctl")
    if journalctl is None:
        raise RuntimeError("journalctl not found")
    cmd = [journalctl, "--no-pager", "-q", "-o", "json", *source]
    cmd += [f"--since={since}"] if since else []
    cmd += [f"--until={until}"] if until else []
    cmd += [f"MESSAGE_ID={mid}" for mid in BY_ID]  # one field repeated = OR
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    entries = []
    for line in proc.stdout.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def percentiles(values: list[int]) -> dict:
    """Nearest-rank p50/p95/max, in ms."""
    if not values:
        return {"count": 0, "p50": None, "p95": None, "max": None}
    v = sorted(values)
    rank = lambda q: v[max(0, math.ceil(q * len(v)) - 1)]  # noqa: E731
    return {"count": len(v), "p50": rank(0.50), "p95": rank(0.95), "max": v[-1]}


def report(raw_entries: list[dict], source: list[str], stuck_after_s: float, now_us: int | None = None) -> dict:
    now_us = now_us if now_us is not None else int(time.time() * 1e6)
    entries = unique(raw_entries)  # a copy resent by journal-upload is no second incident, request or sample
    incidents = rebuild(entries, now_us, stuck_after_s)
    hosts: dict[str, dict] = {e.host: {} for e in entries}
    by_host: dict[str, list[Incident]] = defaultdict(list)
    for inc in incidents:
        by_host[inc.host].append(inc)
    requests_failed = Counter(e.host for e in entries if e.event == "request_failed")
    for host in hosts:
        mine = by_host.get(host, [])
        counts = Counter(i.cls for i in mine)
        hosts[host] = {"incidents": len(mine), **{c: counts.get(c, 0) for c in CLASSES},
                       "requests_failed": requests_failed.get(host, 0),
                       "mttr_ms": percentiles([i.mttr_ms for i in mine if i.mttr_ms is not None])}
    by_cause: dict[str, Counter] = defaultdict(Counter)
    for inc in incidents:
        by_cause[inc.cause or "?"][inc.rung or "-"] += 1
    needs = [i for i in incidents if i.cls in NEEDS_ACTION]
    return {
        "source": shlex.join(source) or "local journal",
        "stuck_after_s": stuck_after_s,
        "hosts": dict(sorted(hosts.items())),
        "by_cause": {c: dict(r) for c, r in sorted(by_cause.items())},
        "mttr_ms": percentiles([i.mttr_ms for i in incidents if i.mttr_ms is not None]),
        "incidents": [i.summary() for i in incidents],
        "needs_action": [dict(i.summary(), command=_incident_command(source, i)) for i in needs],
        "exit_code": max((NEEDS_ACTION[i.cls] for i in needs), default=0),
    }


def _incident_command(source: list[str], inc: Incident) -> str:
    where = source or ["-u", "neurond"]
    host = [f"_HOSTNAME={inc.host}"] if source else []
    return shlex.join(["journalctl", *where, *host, f"NEUROND_INCIDENT={inc.incident}"])


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v / 1000:.2f}s"


def render(r: dict) -> str:
    hosts, total = r["hosts"], sum(h["incidents"] for h in r["hosts"].values())
    out = [f"neurond audit of {r['source']}: {len(hosts)} host(s), {total} incident(s) "
           f"(stuck after {r['stuck_after_s']:.0f} s)", ""]
    cols = ["incidents", "clean", "degraded", "stuck", "gave_up", "interrupted", "open", "requests_failed"]
    width = max([4] + [len(h) for h in hosts])
    head = f"{'HOST':<{width}} " + " ".join(f"{c.upper():>{max(len(c), 5)}}" for c in cols)
    out.append(head + "  MTTR_P50 MTTR_P95 MTTR_MAX")
    for name, h in hosts.items():
        out.append(f"{name:<{width}} " + " ".join(f"{h[c]:>{max(len(c), 5)}}" for c in cols)
                   + f"  {_ms(h['mttr_ms']['p50']):>8} {_ms(h['mttr_ms']['p95']):>8} {_ms(h['mttr_ms']['max']):>8}")
    if r["by_cause"]:
        rungs = sorted({t for row in r["by_cause"].values() for t in row})
        out += ["", "Incidents by cause and rung:",
                f"{'CAUSE':<16}" + "".join(f"{t:>14}" for t in rungs)]
        out += [f"{c:<16}" + "".join(f"{row.get(t, 0):>14}" for t in rungs) for c, row in r["by_cause"].items()]
    m = r["mttr_ms"]
    out += ["", f"MTTR over {m['count']} recoveries: p50 {_ms(m['p50'])}, p95 {_ms(m['p95'])}, max {_ms(m['max'])}"]
    if r["needs_action"]:
        out += ["", f"Needs an operator ({len(r['needs_action'])}):"]
        for i in r["needs_action"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i["start_us"] / 1e6))
            out.append(f"  {i['host']}  {i['class'].upper()}  incident {i['incident']} since {when} (pid {i['pid']}): "
                       f"{i['cause'] or '?'} on rank {i['rank'] if i['rank'] is not None else '?'} -- {i['why']}")
            out.append(f"      {i['command']}")
    else:
        out += ["", "Nothing needs an operator."]
    return "\n".join(out) + "\n"


def main(args: argparse.Namespace) -> int:
    source = source_args(args)
    try:
        entries = read_entries(source, args.since, args.until)
    except (RuntimeError, OSError) as exc:
        print(f"neurond audit: cannot read the journal: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    r = report(entries, source, args.stuck_after)
    sys.stdout.write(json.dumps(r, indent=1) + "\n" if args.json else render(r))
    return r["exit_code"]
