"""The FastAPI application: wiring of settings, store, supervisor and routers, in one place."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from models.styles import default_registry
from server.auth import KeyRing
from server.deps import Services
from server.errors import install_error_handlers
from server.images import ImageLimits
from server.jobs.messages import WorkerConfig
from server.jobs.store import SqliteJobStore
from server.jobs.supervisor import Supervisor
from server.metrics import Metrics
from server.ratelimit import RateLimiter
from server.routes import events, health, playground, styles, v1, v2
from server.settings import Settings, get_settings

log = logging.getLogger("beyond")


def build_services(settings: Settings) -> Services:
    limits = ImageLimits(
        max_bytes=settings.max_input_bytes,
        max_pixels=settings.max_input_pixels,
        max_canvas_pixels=settings.max_canvas_pixels,
        allow_private_urls=settings.allow_private_urls,
        timeout=settings.fetch_timeout,
    )
    store = SqliteJobStore(settings.data_dir, ttl=settings.result_ttl)
    metrics = Metrics()
    config = WorkerConfig(
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        limits=limits,
        styles_dir=settings.styles_dir,
        expansion_model=settings.expansion_model,
        cpu_threads=settings.cpu_threads,
        channels_last=settings.channels_last,
        fuse_qkv=settings.fuse_qkv,
        compile=settings.compile,
    )
    supervisor = Supervisor(
        store,
        config,
        purge_interval=settings.purge_interval,
        backoff=settings.worker_restart_backoff,
        log_level=settings.log_level,
        metrics=metrics,
    )
    registry = default_registry(settings.styles_dir)
    keys = KeyRing.load(settings.api_keys.get_secret_value() if settings.api_keys else None, settings.api_keys_file)
    for caller in keys.metered():
        store.open_account(caller.owner, caller.credits or 0.0)
    return Services(
        settings=settings,
        store=store,
        supervisor=supervisor,
        limits=limits,
        styles=registry,
        keys=keys,
        limiter=RateLimiter(settings.rate_limit),
        metrics=metrics,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services.supervisor.start()
        if services.keys.open:
            log.warning("NO API KEYS CONFIGURED: anyone who reaches this port can use it (set BEYOND_API_KEYS)")
        log.info("beyond serving %s from %s", settings.model, settings.data_dir)
        try:
            yield
        finally:
            services.supervisor.stop()

    app = FastAPI(
        title="beyond",
        description="Self-hosted drop-in for the seg-beyond outpainting API.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.services = services
    app.middleware("http")(services.metrics.middleware)

    @app.middleware("http")
    async def guard_headers(request: Request, call_next: Callable) -> Response:
        """x-remaining-credits for metered keys and X-RateLimit-* for rate-limited submissions, on
        every answer, errors included (those raised by a dependency still pass through here)."""
        response = await call_next(request)
        response.headers.update(getattr(request.state, "rate_headers", None) or {})
        caller = getattr(request.state, "caller", None)
        if caller is not None and caller.credits is not None:
            balance = await run_in_threadpool(services.store.balance, caller.owner)
            if balance is not None:
                response.headers["x-remaining-credits"] = f"{balance:g}"
        return response

    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(styles.router)
    app.include_router(events.router)
    app.include_router(playground.router)
    return app
