"""The chaos soak's judges can fail: each is fed a made-up ending or journal that breaks its promise (no daemon
needed). tests/test_chaos.py holds them to a real run."""

from __future__ import annotations

import json

import httpx

from tests.chaos.client import Ending, Outcome, _judge_error
from tests.chaos.injector import VolleyRecord
from tests.chaos.soak import SoakReport, short_profile, verdicts
from tests.chaos.volleys import Fault, Volley
from tests.chaos.workload import RequestPlan

PLAN = RequestPlan(0, "qzx0", "hello qzx0", 8, False, (), 0.0, None, False, None)
RANK_DIED = Volley("single", (Fault(1, "sigkill", "decode"),), ((frozenset({"rank_died"}),),))


def _error(status: int, code: str, admitted: bool, retry_after: bool = True) -> Outcome:
    out = Outcome(PLAN, bound_s=60.0, started=0.0, status=status, request_id="chatcmpl-1" if admitted else None)
    headers = httpx.Headers({"Retry-After": "2"} if retry_after else {})
    body = {"error": {"message": "m", "type": "server_error", "param": None, "code": code}}
    _judge_error(out, headers, json.dumps(body).encode())
    return out


def test_an_error_is_clean_only_with_its_own_status_and_retry_after():
    assert _error(503, "rank_died", admitted=True).ending is Ending.FAILED
    assert _error(503, "model_unavailable", admitted=False).ending is Ending.REFUSED
    assert _error(500, "rank_died", admitted=True).ending is Ending.BROKEN  # rank_died is a 503
    assert _error(503, "rank_died", admitted=True, retry_after=False).ending is Ending.BROKEN
    assert _error(400, "invalid_value", admitted=True).ending is Ending.BROKEN  # the soak sends valid requests
    assert _error(503, "rank_died", admitted=False).ending is Ending.BROKEN  # a fault code needs admission


def _event(n: int, event: str, incident: str, **fields) -> dict:
    entry = {"NEUROND_EVENT": event, "NEUROND_INCIDENT": incident, "__REALTIME_TIMESTAMP": str(n),
             "_HOSTNAME": "soak", "_PID": "1"}
    entry.update({f"NEUROND_{k.upper()}": str(v) for k, v in fields.items()})
    return entry


def _incident(incident: str, cause: str, end: str = "healthy", request: str = "chatcmpl-1") -> list[dict]:
    rows = [("fault_detected", dict(cause=cause, rank=1, request_id=request)),
            ("transition", dict(lifecycle_event="fault", state_from="healthy", state_to="poisoned", cause=cause)),
            ("transition", dict(lifecycle_event="abort", state_from="poisoned", state_to="aborting", cause=cause)),
            ("transition", dict(lifecycle_event="repair", state_from="aborting", state_to="reloading", cause=cause))]
    if end == "healthy":
        rows += [("recovery_finished", dict(cause=cause, rung="replace_ranks", duration_ms=900)),
                 ("transition", dict(lifecycle_event="recovered", state_from="reloading", state_to="healthy"))]
    return [_event(n, name, incident, **f) for n, (name, f) in enumerate(rows)]


def _report(events: list[dict], outcomes=()) -> SoakReport:
    report = SoakReport(seed=1, profile=short_profile(), settings={})
    report.records = [VolleyRecord(RANK_DIED, armed_at=0.0, incidents_before=0, repaired_at=1.0, incidents_seen=1)]
    report.events = events
    report.outcomes = list(outcomes)
    return report


def test_incident_story_verdict():
    promise = "one complete incident per injected fault"
    assert verdicts(_report(_incident("a", "rank_died")))[promise] == []
    assert "cause rank_timeout" in verdicts(_report(_incident("a", "rank_timeout")))[promise][0]
    assert "does not end healthy" in " ".join(verdicts(_report(_incident("a", "rank_died", end="stuck")))[promise])
    extra = verdicts(_report(_incident("a", "rank_died") + _incident("b", "rank_died")))[promise]
    assert extra and "unexplained incident b" in extra[-1]
    assert "missing" in verdicts(_report([]))[promise][0]


def test_innocent_and_hung_requests_are_counted():
    culprit = _error(503, "rank_died", admitted=True)
    innocent = _error(503, "model_unavailable", admitted=True)
    innocent.request_id = "chatcmpl-2"  # failed after admission, but the journal names another request
    hung = Outcome(PLAN, bound_s=60.0, started=0.0, ended=60.0, ending=Ending.HUNG)
    v = verdicts(_report(_incident("a", "rank_died"), [culprit]))
    assert v["no innocent request lost"] == [] and v["every request ends cleanly within its bound"] == []
    failed = _event(9, "request_failed", "a", request_id="chatcmpl-2", cause="request_quarantined")
    failed["MESSAGE"] = "neurond request_failed: chatcmpl-2 request_quarantined"
    v = verdicts(_report(_incident("a", "rank_died") + [failed], [culprit, innocent, hung]))
    assert "1 innocent requests failed" in v["no innocent request lost"][0]
    # and what the journal says about it: its own entry, and the fault of the incident it failed in
    story = v["no innocent request lost"][1:]
    assert len(story) == 2 and story[-1].endswith("chatcmpl-2 request_quarantined"), story
    assert "hung" in v["every request ends cleanly within its bound"][0]
