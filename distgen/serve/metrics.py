"""Prometheus metrics of one server (``GET /metrics``), in the anchors' naming style.

Gauges read from the engine when scraped (queue depth, running requests, restarts, seconds
since the group last answered); histograms and counters are observed by the HTTP layer as
requests finish.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("distgen_queue_depth", "requests admitted and waiting to start", registry=r)
        self.queue_depth.set_function(engine.waiting)
        self.running = Gauge("distgen_running_requests", "requests the worker group is running", registry=r)
        self.running.set_function(engine.running)
        self.restarts = Gauge("distgen_rank_restarts", "times the worker group was rebuilt after a failure", registry=r)
        self.restarts.set_function(lambda: engine.stats.restarts)
        self.healthy = Gauge("distgen_group_healthy", "1 when every rank of the group answers", registry=r)
        self.healthy.set_function(lambda: 1.0 if engine.health()["status"] == "ok" else 0.0)
        self.requests = Counter("distgen_requests", "finished requests by kind and HTTP status",
                                ["kind", "status"], registry=r)
        self.admitted_total = Counter("distgen_requests_admitted", "requests admitted to the queue", ["kind"],
                                      registry=r)
        self.latency = Histogram("distgen_request_latency_seconds", "admission to answer", ["kind"],
                                 buckets=_LATENCY, registry=r)
        self.ttft = Histogram("distgen_time_to_first_token_seconds", "admission to the first generated token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("distgen_inter_token_latency_seconds", "between consecutive generated tokens",
                             buckets=_FAST, registry=r)
        self.prompt_tokens = Counter("distgen_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("distgen_generation_tokens", "tokens generated", registry=r)
        self.step = Histogram("distgen_denoising_step_seconds", "one denoising step (rank 0)", buckets=_FAST + (10, 30),
                              registry=r)
        self.step_bytes = Histogram("distgen_comm_bytes_sent_per_step", "bytes rank 0 sent per denoising step",
                                    buckets=(0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9), registry=r)
        self.step_wait = Histogram("distgen_comm_wait_seconds_per_step",
                                   "seconds rank 0 waited on communication per denoising step", buckets=_FAST,
                                   registry=r)

    def admitted(self, kind: str, count: int = 1) -> None:
        self.admitted_total.labels(kind).inc(count)

    def finished(self, kind: str, status: str, seconds: float) -> None:
        self.requests.labels(kind, status).inc()
        self.latency.labels(kind).observe(seconds)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)

    def observe_steps(self, seconds, sent, waited) -> None:
        for s in seconds:
            self.step.observe(s)
        for b in sent:
            self.step_bytes.observe(b)
        for w in waited:
            self.step_wait.observe(w)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
