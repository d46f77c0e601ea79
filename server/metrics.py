"""Prometheus metrics (requests, queue depth, job durations, failures, GPU memory) and the access log."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

access = logging.getLogger("beyond.access")


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
        self.failures = Counter("beyond_job_failures", "failed jobs by reason", ["reason"], registry=self.registry)
        self.gpu_memory = Gauge(
            "beyond_gpu_peak_memory_bytes", "peak GPU memory of the last job (0 on CPU)", registry=self.registry
        )

    def job_done(self, result: dict) -> None:
        self.job_seconds.observe(float(result.get("inference_time", 0.0)))
        self.gpu_memory.set(float(result.get("gpu_peak_memory", 0)))

    def job_failed(self, reason: str) -> None:
        self.failures.labels(reason).inc()

    async def middleware(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        # The route template, not the path: request ids would make every path its own series.
        route = getattr(request.scope.get("route"), "path", "unmatched")
        seconds = time.perf_counter() - started
        self.requests.labels(request.method, route, str(response.status_code)).inc()
        self.latency.labels(route).observe(seconds)
        request_id = response.headers.get("x-request-id") or request.path_params.get("request_id")
        caller = getattr(request.state, "caller", None)
        access.info(
            "%s %s %s",
            request.method,
            route,
            response.status_code,
            extra={
                "event": "request",
                "method": request.method,
                "route": route,
                "status": response.status_code,
                "request_id": request_id,
                "seconds": round(seconds, 4),
                "caller": caller.name if caller else None,
            },
        )
        return response

    def render(self, queued: int) -> Response:
        self.queue_depth.set(queued)
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
