"""`/metrics` of `edgeweave serve`, in Prometheus' text format (prometheus-client).

Two sources: the scheduler reports as it runs (it calls this module's `ServingMetrics` as its
`StepObserver`: tokens, first-token and per-token times, batch sizes, finished requests), and at
each scrape a collector reads what only the engine knows (per-node round-trip and compute time,
recoveries) and the queue's depth. Every app has its own registry, so several servers in one
process (tests) do not mix their figures.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from edgeweave.coordinator.engine import TextEngine
from edgeweave.coordinator.scheduler import GenerationJob, Scheduler

#: seconds: from a fast local step to a slow Wi-Fi cluster's first token
_TIME_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 64)


class _EngineCollector(Collector):
    """Per-node totals and recoveries, read from the engine at scrape time."""

    def __init__(self, engine: TextEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        telemetry = self.engine.telemetry()
        messages = CounterMetricFamily("edgeweave_node_messages", "Forward messages answered by each node",
                                       labels=["node"])
        round_trip = CounterMetricFamily("edgeweave_node_round_trip_seconds",
                                         "Seconds from sending a step's message to a node until its reply was read",
                                         labels=["node"])
        compute = CounterMetricFamily("edgeweave_node_compute_seconds",
                                      "Seconds each node reported computing its messages", labels=["node"])
        for address, timing in sorted(telemetry.nodes.items()):
            messages.add_metric([address], timing.messages)
            round_trip.add_metric([address], timing.round_trip_s)
            compute.add_metric([address], timing.compute_s)
        yield messages
        yield round_trip
        yield compute
        yield CounterMetricFamily("edgeweave_recoveries", "Node losses survived by re-planning", value=telemetry.recoveries)
        yield CounterMetricFamily("edgeweave_rejoins", "Times restarted or new nodes joined the model",
                                  value=telemetry.rejoins)


class ServingMetrics:
    """The scheduler's observer and the registry `/metrics` renders."""

    def __init__(self, engine: TextEngine, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.generated = Counter("edgeweave_generated_tokens", "Completion tokens generated", registry=r)
        self.prompt = Counter("edgeweave_prompt_tokens", "Prompt tokens read (prefill)", registry=r)
        self.requests = Counter("edgeweave_requests", "Requests finished, by finish reason", ["reason"], registry=r)
        self.ttft = Histogram("edgeweave_time_to_first_token_seconds", "From submission to the first token",
                              buckets=_TIME_BUCKETS, registry=r)
        self.tpot = Histogram("edgeweave_time_per_output_token_seconds",
                              "Time between consecutive tokens of one request", buckets=_TIME_BUCKETS, registry=r)
        self.batch = Histogram("edgeweave_batch_size", "Sequences (rows) per batched step", buckets=_BATCH_BUCKETS,
                               registry=r)
        self.step_time = Histogram("edgeweave_step_seconds", "Duration of one batched engine step",
                                   buckets=_TIME_BUCKETS, registry=r)
        queue = Gauge("edgeweave_queue_depth", "Requests waiting to be admitted", registry=r)
        queue.set_function(lambda: scheduler.counts()[1])
        active = Gauge("edgeweave_active_sequences", "Requests being decoded (one KV cache each)", registry=r)
        active.set_function(lambda: scheduler.counts()[0])
        r.register(_EngineCollector(engine))

    # -- StepObserver (called on the scheduler thread) ------------------------------------------
    def step(self, rows: int, prefill_tokens: int, seconds: float) -> None:
        self.batch.observe(rows)
        self.step_time.observe(seconds)
        if prefill_tokens:
            self.prompt.inc(prefill_tokens)

    def token(self, job: GenerationJob, gap_s: float | None) -> None:
        self.generated.inc()
        if gap_s is None:
            if job.ttft_s is not None:
                self.ttft.observe(job.ttft_s)
        else:
            self.tpot.observe(gap_s)

    def finished(self, job: GenerationJob) -> None:
        self.requests.labels(job.finish_reason or "unknown").inc()

    # -- /metrics ----------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """(body, content type) of one scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
