"""Prometheus metrics, served at GET /metrics, fed from two places.

Incidents reach them as the events the journal gets (`observe`; from the supervisor, the repair ladder and,
for a request a fault ended, the engine): the lifecycle state, transitions, faults and their detection time,
recoveries, aborts, give-ups, load progress and requests failed by a fault, so the journal and the metrics
cannot disagree about an incident. The rest is fed to them directly, by the methods below `observe` and gauges
read at scrape time: step latency, generated tokens, request outcomes, preemptions, KV cache blocks, prefix
cache tokens and queued requests by the engine (and `rejected_NNN` outcomes by the API); open and refused
connections by api/connections.py. `neurond_info` is set once, at construction.

A private CollectorRegistry per daemon (no process-global default registry), so tests can run several. The
process collector adds process_start_time_seconds (uptime), CPU and memory of the leader. Tokens per second
is `rate(neurond_generated_tokens_total[1m])`: a counter, so no rate is lost between two scrapes, raised as the
tokens are drawn (a minute-long answer counts in the minute it ran, not all at its end).
docs/operator-guide.md lists every metric; a test keeps the list and this file in step.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from neurond.lifecycle import LifecycleState
from neurond.observe.events import Event, EventSink, Observation

STATES = tuple(LifecycleState)  # every state, in the order they are declared
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_RECOVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
# Detection is the step deadline for a hang (floor 5 s, ceiling 60 s by default) and milliseconds otherwise.
_DETECTION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)


class MetricsSink(EventSink):
    def __init__(self, model: str = "", tp_size: int = 1) -> None:
        from neurond import version

        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        self.info = Gauge("neurond_info", "What this daemon serves (always 1)", ["model", "tp_size", "version"],
                          registry=r)
        self.info.labels(model, str(tp_size), version()).set(1)
        self.state = Gauge("neurond_lifecycle_state", "1 for the current lifecycle state", ["state"], registry=r)
        self.transitions = Counter("neurond_transitions_total", "Lifecycle transitions",
                                   ["event", "cause", "rung"], registry=r)
        self.recoveries = Counter("neurond_recoveries_total", "Finished recoveries by cause and ladder rung",
                                  ["cause", "rung"], registry=r)
        self.gave_up = Counter("neurond_gave_up_total", "Times recovery gave up (-> unloaded)", registry=r)
        self.faults = Counter("neurond_faults_total", "Faults detected by cause", ["cause"], registry=r)
        self.detection_seconds = Histogram(
            "neurond_fault_detection_seconds", "How long the failed step had run when its fault was detected: the "
            "step deadline for a hang, about the step time otherwise (faults between steps are seen at once and "
            "not observed)", ["cause"], buckets=_DETECTION_BUCKETS, registry=r)
        self.recovery_seconds = Histogram("neurond_recovery_seconds", "Fault detected to healthy again",
                                          ["rung"], buckets=_RECOVERY_BUCKETS, registry=r)
        self.abort_seconds = Histogram("neurond_abort_seconds", "Communicator abort on all live ranks",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("neurond_step_seconds", "Prefill/decode step latency as the leader sees it",
                                      ["kind"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("neurond_generated_tokens_total", "Completion tokens generated, counted at each step "
                              "that draws them (not when their request ends)", registry=r)
        self.requests = Counter("neurond_requests_total", "Requests by outcome: completed, cancelled, failed (of "
                                "those, failed_by_fault and repair_wait_expired are also counted on their own), "
                                "rejected_NNN (its 4xx status)", ["outcome"], registry=r)
        self.preemptions = Counter("neurond_preemptions", "Running requests preempted because the KV cache had "
                                   "no blocks left for the others to grow into (each is replayed later: a slower "
                                   "stream, not an error). Often: raise kv_cache_blocks or lower "
                                   "max_batch_size", registry=r)
        self.kv_cache_blocks = Gauge("neurond_kv_cache_blocks", "KV cache blocks: `total` in the cache, `used` "
                                     "by requests holding a slot, `cached`: held by none but keeping a full "
                                     "block of an earlier context for requests with the same prefix (evicted "
                                     "when blocks run short)", ["state"], registry=r)
        self.prefix_tokens_total = Counter(
            "neurond_prefix_cache_tokens", "Context tokens of admitted requests (replays included) with a paged "
            "KV cache: `hit` found in the prefix cache (not prefilled again), `miss` prefilled. The hit rate is "
            "hit / (hit + miss)", ["result"], registry=r)
        self.queued_requests = Gauge("neurond_queued_requests", "Admitted requests waiting for a KV cache slot: "
                                     "new ones, preempted ones and those a fault interrupted, waiting to be "
                                     "replayed (at most max_queued_requests new ones)", registry=r)
        self.http_connections = Gauge("neurond_http_connections", "Open connections to the API port, idle and "
                                      "half-sent ones included (at most max_connections)", registry=r)
        self.http_connections_refused = Counter("neurond_http_connections_refused_total", "Connections refused "
                                                "with 503 too_many_connections: max_connections were open",
                                                registry=r)
        self.load_progress = Gauge("neurond_load_progress_ratio", "Share of its checkpoint files a rank has read in "
                                   "the latest load (1 when loaded)", ["rank"], registry=r)
        for state in STATES:
            self.state.labels(state).set(1 if state == LifecycleState.LOADING else 0)

    # ------------------------------------------------------------------ from the events
    def observe(self, o: Observation) -> None:
        name = o.event
        if name is Event.TRANSITION:
            for state in STATES:
                self.state.labels(state).set(1 if state == o.state_to else 0)
            self.transitions.labels(o.lifecycle_event or "", o.cause or "", o.rung or "").inc()
        elif name is Event.FAULT_DETECTED:
            self.faults.labels(o.cause or "").inc()
            if o.detect_ms is not None:
                self.detection_seconds.labels(o.cause or "").observe(o.detect_ms / 1000)
        elif name is Event.LOAD_PROGRESS:
            if o.total_bytes:
                self.load_progress.labels(str(o.rank)).set((o.done_bytes or 0) / o.total_bytes)
        elif name is Event.RECOVERY_FINISHED:
            self.recoveries.labels(o.cause or "", o.rung or "").inc()
            if o.duration_ms is not None:
                self.recovery_seconds.labels(o.rung or "").observe(o.duration_ms / 1000)
        elif name in (Event.ABORT_FINISHED, Event.ABORT_FAILED):
            if o.duration_ms is not None:
                self.abort_seconds.observe(o.duration_ms / 1000)
        elif name is Event.GAVE_UP:
            self.gave_up.inc()
        elif name is Event.REQUEST_FAILED:
            self.requests.labels("failed_by_fault").inc()

    # ------------------------------------------------------------------ from the engine and the API
    def step(self, kind: str, seconds: float) -> None:
        self.step_seconds.labels(kind).observe(seconds)

    def generated(self, tokens: int) -> None:
        self.tokens.inc(tokens)

    def request_done(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def preempted(self, n: int) -> None:
        self.preemptions.inc(n)

    def kv_blocks(self, used: int, total: int, cached: int = 0) -> None:
        self.kv_cache_blocks.labels("used").set(used)
        self.kv_cache_blocks.labels("total").set(total)
        self.kv_cache_blocks.labels("cached").set(cached)

    def prefix_tokens(self, hits: int, misses: int) -> None:
        if hits:
            self.prefix_tokens_total.labels("hit").inc(hits)
        if misses:
            self.prefix_tokens_total.labels("miss").inc(misses)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

