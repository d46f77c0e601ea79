"""The FastAPI application: wiring of settings, store, supervisor and routers, in one place."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from models.styles import default_registry
from server.auth import KeyRing
from server.deps import Services
from server.errors import install_error_handlers
from server.images import ImageLimits
from server.jobs.contract import to_units
from server.jobs.inputs import InputStage
from server.jobs.messages import WorkerConfig
from server.jobs.results_cache import FinishedJobs
from server.jobs.sqlite_store import SqliteJobStore
from server.jobs.store import JobStore
from server.jobs.supervisor import Supervisor
from server.metrics import Metrics
from server.middleware import ServingMiddleware
from server.ratelimit import RateLimiter
from server.routes import events, health, playground, styles, v1, v2
from server.schemas import SegBeyondRequest
from server.settings import Settings, get_settings

log = logging.getLogger("beyond")
VERSION = "0.1.0"


def build_store(settings: Settings) -> JobStore:
    """The one place the job store is chosen."""
    return SqliteJobStore(settings.data_dir, ttl=settings.result_ttl)


def build_services(settings: Settings) -> Services:
    limits = ImageLimits(
        max_bytes=settings.max_input_bytes,
        max_pixels=settings.max_input_pixels,
        max_canvas_pixels=settings.max_canvas_pixels,
        allow_private_urls=settings.allow_private_urls,
        timeout=settings.fetch_timeout,
    )
    store = build_store(settings)
    metrics = Metrics()
    config = WorkerConfig(
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        limits=limits,
        styles_dir=settings.styles_dir,
        expansion_model=settings.expansion_model,
        tokenizer_dir=settings.tokenizer_dir,
        cpu_threads=settings.cpu_threads,
        channels_last=settings.channels_last,
        fuse_qkv=settings.fuse_qkv,
        compile=settings.compile,
        log_level=settings.log_level,
        log_format=settings.log_format,
        max_batch=settings.max_batch,
        prefetch=settings.worker_prefetch,
    )
    supervisor = Supervisor(
        store, config, purge_interval=settings.purge_interval, backoff=settings.worker_restart_backoff, metrics=metrics
    )
    keys = KeyRing.load(settings.api_keys.get_secret_value() if settings.api_keys else None, settings.api_keys_file)
    for caller in keys.metered():
        store.open_account(caller.owner, to_units(caller.credits or 0.0))
    return Services(
        settings=settings,
        store=store,
        supervisor=supervisor,
        inputs=InputStage(store, limits),
        finished=FinishedJobs(),
        limits=limits,
        styles=default_registry(settings.styles_dir),
        keys=keys,
        limiter=RateLimiter(settings.rate_limit),
        metrics=metrics,
    )


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, less its own 422 validation-error bodies: this API answers every error as
    {"error"}, and 422 means a FAILED request."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                answers = operation.get("responses", {})
                failed = answers.get("422", {})
                if "HTTPValidationError" in str(failed):
                    del answers["422"]
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        request = SegBeyondRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(request.pop("$defs", {}))
        components[SegBeyondRequest.__name__] = request
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services.supervisor.start()
        services.inputs.start()
        if services.keys.open:
            log.warning("NO API KEYS CONFIGURED: anyone who reaches this port can use it (set BEYOND_API_KEYS)")
        log.info("beyond serving %s from %s", settings.model, settings.data_dir)
        try:
            yield
        finally:
            await services.inputs.stop()
            services.supervisor.stop()

    # The docs pages' scripts and styles are served from the fastapi-offline package: no CDN.
    app = FastAPIOffline(
        title="beyond",
        description="Self-hosted drop-in for the seg-beyond outpainting API.",
        version=VERSION,
        lifespan=lifespan,
    )
    app.state.services = services
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    app.add_middleware(ServingMiddleware, metrics=services.metrics, balance=services.store.balance)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(styles.router)
    app.include_router(events.router)
    app.include_router(playground.router)
    return app
