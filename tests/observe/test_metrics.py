"""/metrics covers what an operator's dashboards and alerts need (the list is the issue's): lifecycle state,
transitions and recoveries by cause and rung, detection and recovery time histograms, step latency, tokens
(for tokens/s), requests by outcome, load progress, the process; each fed from the same events as the journal."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from neurond.observe.events import Event, emit
from neurond.observe.metrics import MetricsSink

# family -> (type, label names): what the issue asks /metrics to have.
REQUIRED = {
    "neurond_lifecycle_state": ("gauge", {"state"}),
    "neurond_transitions": ("counter", {"event", "cause", "rung"}),
    "neurond_recoveries": ("counter", {"cause", "rung"}),
    "neurond_faults": ("counter", {"cause"}),
    "neurond_fault_detection_seconds": ("histogram", {"cause"}),
    "neurond_recovery_seconds": ("histogram", {"rung"}),
    "neurond_step_seconds": ("histogram", {"kind"}),
    "neurond_generated_tokens": ("counter", set()),
    "neurond_requests": ("counter", {"outcome"}),
    "neurond_load_progress_ratio": ("gauge", {"rank"}),
    "neurond_info": ("gauge", {"model", "tp_size", "version"}),
    "process_start_time_seconds": ("gauge", set()),
}


def scrape(sink: MetricsSink) -> tuple[dict, dict]:
    body, content_type = sink.render()
    assert content_type.startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    return families, samples


def one_incident(sink: MetricsSink) -> None:
    """The events of a hang detected at a 5 s deadline and repaired by replacing rank 1, as the supervisor
    emits them, then some traffic."""
    f = dict(incident="i1", model="m", tp_size=2)
    emit(sink, Event.TRANSITION, lifecycle_event="loaded", state_from="loading", state_to="healthy", cause="startup")
    emit(sink, Event.FAULT_DETECTED, cause="rank_timeout", rank=1, detect_ms=5003, **f)
    for event, src, dst, rung in (("fault", "healthy", "poisoned", None), ("abort", "poisoned", "aborting", None),
                                  ("repair", "aborting", "reloading", "replace_ranks")):
        emit(sink, Event.TRANSITION, lifecycle_event=event, state_from=src, state_to=dst, cause="rank_timeout",
             rung=rung, **f)
    emit(sink, Event.ABORT_FINISHED, duration_ms=12, **f)
    emit(sink, Event.LOAD_PROGRESS, rank=1, done_bytes=1, total_bytes=4, files_done=1, files_total=4, **f)
    emit(sink, Event.RECOVERY_FINISHED, cause="rank_timeout", rung="replace_ranks", duration_ms=14200, **f)
    emit(sink, Event.TRANSITION, lifecycle_event="recovered", state_from="reloading", state_to="healthy",
         cause="rank_timeout", rung="replace_ranks", **f)
    emit(sink, Event.REQUEST_FAILED, request_id="r1", cause="rank_timeout", status=504, **f)
    sink.step("prefill", 0.02)
    sink.step("decode", 0.004)
    sink.generated(17)
    sink.request_done("completed")


def test_every_required_family_is_there_with_its_labels():
    families, _ = scrape(_fed())
    for name, (kind, labels) in REQUIRED.items():
        assert name in families, f"/metrics lacks {name}"
        assert families[name].type == kind, name
        seen = {k for s in families[name].samples for k in s.labels if k not in ("le", "quantile")}
        assert seen == labels, (name, seen)


def _fed() -> MetricsSink:
    sink = MetricsSink(model="m", tp_size=2)
    one_incident(sink)
    return sink


def test_values_follow_the_events():
    _, s = scrape(_fed())
    assert s[("neurond_lifecycle_state", (("state", "healthy"),))] == 1
    assert s[("neurond_lifecycle_state", (("state", "reloading"),))] == 0
    repair = (("cause", "rank_timeout"), ("event", "repair"), ("rung", "replace_ranks"))
    assert s[("neurond_transitions_total", repair)] == 1
    assert s[("neurond_faults_total", (("cause", "rank_timeout"),))] == 1
    assert s[("neurond_recoveries_total", (("cause", "rank_timeout"), ("rung", "replace_ranks")))] == 1
    # detection 5.003 s: in the 10 s bucket, not the 5 s one
    assert s[("neurond_fault_detection_seconds_bucket", (("cause", "rank_timeout"), ("le", "5.0")))] == 0
    assert s[("neurond_fault_detection_seconds_bucket", (("cause", "rank_timeout"), ("le", "10.0")))] == 1
    assert s[("neurond_fault_detection_seconds_sum", (("cause", "rank_timeout"),))] == 5.003
    assert s[("neurond_recovery_seconds_sum", (("rung", "replace_ranks"),))] == 14.2
    assert s[("neurond_abort_seconds_count", ())] == 1
    assert s[("neurond_load_progress_ratio", (("rank", "1"),))] == 0.25
    assert s[("neurond_step_seconds_count", (("kind", "decode"),))] == 1
    assert s[("neurond_generated_tokens_total", ())] == 17
    assert s[("neurond_requests_total", (("outcome", "completed"),))] == 1
    assert s[("neurond_requests_total", (("outcome", "failed_by_fault"),))] == 1
    assert s[("neurond_info", (("model", "m"), ("tp_size", "2"), ("version", _version())))] == 1


def test_a_fault_between_steps_is_counted_but_not_timed():
    sink = MetricsSink()
    emit(sink, Event.FAULT_DETECTED, cause="rank_died", rank=0)  # no detect_ms: seen at once by pidfd
    _, s = scrape(sink)
    assert s[("neurond_faults_total", (("cause", "rank_died"),))] == 1
    assert ("neurond_fault_detection_seconds_count", (("cause", "rank_died"),)) not in s


def _version() -> str:
    from neurond import version

    return version()
