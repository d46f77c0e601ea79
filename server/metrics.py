"""Prometheus metrics: requests, queue depth, job durations, failed jobs, worker deaths, GPU memory.

The process that supervises an engine (`beyond serve`, `beyond worker`) also counts its jobs, denoising
steps and busy time, and shows the jobs it holds and how long it has held the oldest. An API node on
Redis also reads the job stream (length, pending entries, the consumer group's lag) when scraped.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from starlette.responses import Response

from server.jobs.contract import JobResult
from server.jobs.store import StoreError

if TYPE_CHECKING:
    from server.jobs.redis_store import StreamStats


class Collected:
    """Metrics made when scraped, by a function (prometheus_client's custom collector)."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


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
        self.worker_deaths = Counter("beyond_worker_deaths", "times the worker process died", registry=self.registry)
        self._counters: dict[tuple[str, str, int], Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        self.gpu_memory = Gauge(
            "beyond_gpu_peak_memory_bytes", "peak GPU memory of the last job (0 on CPU)", registry=self.registry
        )
        self.jobs_completed = Counter(
            "beyond_jobs_completed", "jobs this process's worker completed", registry=self.registry
        )
        self.steps = Counter(
            "beyond_denoising_steps",
            "denoising steps of this process's worker's jobs (a step of n jobs in one batch counts n)",
            registry=self.registry,
        )
        self._busy_lock = threading.Lock()
        self._busy_seconds = 0.0
        self._busy_since: float | None = None

    def job_done(self, result: JobResult) -> None:
        self.jobs_completed.inc()
        self.job_seconds.observe(result.inference_time)
        self.gpu_memory.set(result.gpu_peak_memory)

    def step_done(self) -> None:
        self.steps.inc()

    def worker_busy(self, busy: bool) -> None:
        """The worker began (True) or stopped (False) having a job between its start and its answer."""
        with self._busy_lock:
            now = time.monotonic()
            if busy and self._busy_since is None:
                self._busy_since = now
            elif not busy and self._busy_since is not None:
                self._busy_seconds += now - self._busy_since
                self._busy_since = None

    def busy_seconds(self) -> float:
        with self._busy_lock:
            since = self._busy_since
            return self._busy_seconds + (time.monotonic() - since if since is not None else 0.0)

    def track_worker(self, held: Callable[[], int], oldest: Callable[[], float]) -> None:
        """The supervised worker's gauges, read when scraped: the jobs it holds (running, prepared ahead or
        finishing) and the seconds since it claimed the oldest of them (0: none; a hung job keeps growing)."""
        Gauge(
            "beyond_worker_jobs_held",
            "jobs the worker holds: running, prepared ahead or finishing",
            registry=self.registry,
        ).set_function(held)
        Gauge(
            "beyond_worker_job_age_seconds",
            "seconds since the worker claimed the oldest job it holds (0 when it holds none)",
            registry=self.registry,
        ).set_function(oldest)

        def busy() -> Iterable[Metric]:
            help_text = "seconds the worker had a job between its start and its answer; its rate is the busy share"
            return [CounterMetricFamily("beyond_worker_busy_seconds", help_text, value=self.busy_seconds())]

        self.registry.register(Collected(busy))

    def name_worker(self, name: str) -> None:
        """`beyond_worker_info{name=...} 1`: the name /health lists the worker by."""
        Info("beyond_worker", "the worker this process supervises", registry=self.registry).info({"name": name})

    def watch_stream(self, stats: Callable[[], StreamStats]) -> None:
        """The Redis job stream, read when scraped (nothing of it while Redis cannot be read)."""

        def collect() -> Iterable[Metric]:
            try:
                now = stats()
            except StoreError:
                return []  # /metrics answers 503 then, as its queue depth cannot be read either
            lag = math.nan if now.lag is None else float(now.lag)
            return [
                GaugeMetricFamily(
                    "beyond_stream_length",
                    "entries in the job stream: jobs waiting for a worker plus jobs workers hold",
                    value=now.length,
                ),
                GaugeMetricFamily(
                    "beyond_stream_pending", "stream entries delivered to a worker and not yet done", value=now.pending
                ),
                GaugeMetricFamily(
                    "beyond_stream_lag",
                    "the consumer group's lag as Redis reports it (NaN: Redis cannot count it; see docs/scaling.md)",
                    value=lag,
                ),
                GaugeMetricFamily(
                    "beyond_queue_oldest_age_seconds",
                    "seconds since the oldest job not started yet was submitted (0 when none waits)",
                    value=now.oldest_age,
                ),
            ]

        self.registry.register(Collected(collect))

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
