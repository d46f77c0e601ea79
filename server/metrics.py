"""Prometheus metrics: requests, queue depth, job durations, failed jobs, worker deaths, GPU memory."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.responses import Response

from server.jobs.contract import JobResult


class Metrics:
    def __init__(self) -> None:
        # One registry per app, so several apps in one process (tests, benchmarks) do not collide.
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "beyond_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "beyond_http_request_seconds", "HTTP request latency by route", ["route"], registry=self.registry
        )
        self.queue_depth = Gauge("beyond_queue_depth", "requests waiting in the queue", registry=self.registry)
        self.job_seconds = Histogram(
            "beyond_job_inference_seconds",
            "engine seconds per completed job",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
            registry=self.registry,
        )
        # A failed job is counted once, by why it failed; a worker death apart, whatever it did to its job.
        self.failures = Counter("beyond_job_failures", "failed jobs by reason", ["reason"], registry=self.registry)
        self.worker_deaths = Counter(
            "beyond_worker_deaths", "times the worker process died", registry=self.registry
        )
        self._counters: dict[tuple[str, str, int], Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        self.gpu_memory = Gauge(
            "beyond_gpu_peak_memory_bytes", "peak GPU memory of the last job (0 on CPU)", registry=self.registry
        )

    def job_done(self, result: JobResult) -> None:
        self.job_seconds.observe(result.inference_time)
        self.gpu_memory.set(result.gpu_peak_memory)

    def job_failed(self, reason: str) -> None:
        self.failures.labels(reason).inc()

    def worker_died(self) -> None:
        self.worker_deaths.inc()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        # Children looked up once per label set: `labels()` costs more than the count itself.
        key = (method, route, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.requests.labels(method, route, str(status))
        histogram = self._histograms.get(route)
        if histogram is None:
            histogram = self._histograms[route] = self.latency.labels(route)
        counter.inc()
        histogram.observe(seconds)

    def render(self, queued: int) -> Response:
        self.queue_depth.set(queued)
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
