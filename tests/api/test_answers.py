"""The stream's event encoding (neurond/api/answers.py)."""

from __future__ import annotations

import json

from neurond.api.answers import sse_data


def test_an_event_stays_one_line_for_every_line_splitter():
    """Text a byte-level vocabulary can generate: NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR and controls. httpx's
    aiter_lines splits by str.splitlines' rules, which cut such an event in two before the escaping (the chaos
    soak saw a chunk end mid-string)."""
    body = {"choices": [{"delta": {"content": "a\x85b\u2028c\u2029d\x1ce\x0bf\nf\r\u00e9\u20ac"}}]}
    raw = sse_data(body)
    assert raw.endswith(b"\n\n") and raw.count(b"\n") == 2
    lines = raw.decode().splitlines()
    assert lines[0].startswith("data: ") and lines[1:] == [""]
    assert json.loads(lines[0][len("data: "):]) == body
