"""The parts of docs/ that are generated from the code, so they cannot drift from it.

A generated part sits between two markers in a Markdown file:

    <!-- generated: options -->
    ...
    <!-- end generated: options -->

`python -m neurond.docgen` rewrites every part in place; `python -m neurond.docgen --check` lists the stale
ones and exits 1 (tests/test_docs.py runs the same check). The parts:
  options    every setting of Config: section, default, flag, environment variable, meaning (neurond/config.py)
  metrics    every metric of /metrics: name, type, labels, meaning (neurond/observe/metrics.py)
  events     every journal event: MESSAGE_ID, priority, subject and the catalog text (neurond/observe/catalog.py)
  endpoints  every public HTTP endpoint and its responses (neurond/api/openapi.py)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from neurond.config import ENV_PREFIX, settings
from neurond.lifecycle import LifecycleState

DOCS = Path(__file__).resolve().parent.parent / "docs"
PRIORITY_NAMES = {2: "crit", 3: "err", 4: "warning", 5: "notice", 6: "info", 7: "debug"}


def _code(value: object) -> str:
    from neurond.config_template import toml_value

    return f"`{toml_value(value)}`"


def options() -> str:
    from neurond.cli import _parser

    commands = next(a for a in _parser()._actions if a.dest == "command").choices
    assert isinstance(commands, dict)  # a subparsers action's choices: name -> parser
    serve = commands["serve"]
    flags = {a.dest: a.option_strings[0] for a in serve._actions if a.option_strings}
    out, section = [], None
    for s in settings():
        if s.section != section:
            section = s.section
            out.append(f"\n**{section}**\n\n| setting | default | flag | environment | meaning |\n"
                       "| --- | --- | --- | --- | --- |\n")
        flag = f"`{flags[s.name]}`" if s.name in flags else ""
        env = f"`{ENV_PREFIX}{s.name.upper()}`"
        out.append(f"| `{s.name}` | {_code(s.default)} | {flag} | {env} | {_cell(s.comment)} |\n")
    return "".join(out).lstrip("\n")


def metrics() -> str:
    from prometheus_client.metrics import MetricWrapperBase

    from neurond.observe.metrics import MetricsSink

    sink = MetricsSink()
    rows = ["| metric | type | labels | meaning |\n| --- | --- | --- | --- |\n"]
    for metric in vars(sink).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name = metric._name + ("_total" if metric._type == "counter" else "")
        labels = ", ".join(f"`{label}`" for label in metric._labelnames)
        rows.append(f"| `{name}` | {metric._type} | {labels} | {_cell(metric._documentation)} |\n")
    rows.append("| `process_*` | gauge, counter | | the leader process: `process_start_time_seconds` (uptime), CPU "
                "seconds, resident memory, open file descriptors |\n")
    return "".join(rows)


def events() -> str:
    from neurond.observe.catalog import MESSAGES, priority_of
    from neurond.observe.events import Observation

    out = []
    for m in MESSAGES.values():
        field = lambda text: re.sub(r"@([A-Z0-9_]+)@", r"<\1>", text)  # noqa: E731
        worst = min(priority_of(Observation(m.event, **f)) for f in (
            {}, {"state_to": LifecycleState.POISONED}, {"outcome": "degraded"},
            {"state_to": LifecycleState.UNLOADED, "cause": "breaker_open"}))
        priority = f"{m.priority} ({PRIORITY_NAMES[m.priority]})"
        if worst != m.priority:
            priority += f", up to {worst} ({PRIORITY_NAMES[worst]})"
        out.append(f"### `{m.event.value}`\n\n"
                   f"- MESSAGE_ID `{m.message_id}`; priority {priority}\n"
                   f"- find them: `journalctl -u neurond MESSAGE_ID={m.message_id}`\n"
                   f"- `journalctl -x` shows: `{field(m.subject)}`\n\n"
                   "```text\n" + field(m.text) + "\n```\n\n")
    return "".join(out).rstrip("\n") + "\n"


def endpoints() -> str:
    from neurond.api.openapi import openapi_spec

    spec = openapi_spec("MODEL", with_auth=True)
    out = ["| endpoint | what | responses |\n| --- | --- | --- |\n"]
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            responses = "<br>".join(f"{code}: {_cell(r['description'])}" for code, r in op["responses"].items())
            auth = " (bearer token when `api_token_file` is set)" if op.get("security") else ""
            out.append(f"| `{method.upper()} {path}` | {_cell(op.get('summary', op['operationId']))}{auth} | "
                       f"{responses} |\n")
    return "".join(out)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


PARTS: dict[str, Callable[[], str]] = {"options": options, "metrics": metrics, "events": events,
                                       "endpoints": endpoints}
_BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end generated: \2 -->)", re.S)


def render(text: str) -> str:
    """`text` with every generated part made anew."""
    def fill(m: re.Match) -> str:
        if m.group(2) not in PARTS:
            raise KeyError(f"unknown generated part {m.group(2)!r}")
        return m.group(1) + PARTS[m.group(2)]() + m.group(4)

    return _BLOCK.sub(fill, text)


def parts_in(text: str) -> list[str]:
    return [m.group(2) for m in _BLOCK.finditer(text)]


def main(argv: list[str]) -> int:
    stale = []
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text()
        fresh = render(text)
        if fresh != text:
            stale.append(doc)
            if "--check" not in argv:
                doc.write_text(fresh)
    for doc in stale:
        print(f"{doc}: {'stale' if '--check' in argv else 'rewritten'}")
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
