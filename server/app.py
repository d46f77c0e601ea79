"""The FastAPI application: wiring of settings, store, supervisor and routers, in one place."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from models.styles import default_registry
from server.auth import API_KEY_SCHEME, KeyRing
from server.deps import Services
from server.errors import install_error_handlers
from server.images import ImageLimits
from server.jobs.contract import to_units
from server.jobs.inputs import InputStage
from server.jobs.messages import WorkerConfig
from server.jobs.registry import (
    EmbeddedRegistry,
    Heartbeat,
    LocalWorker,
    RedisRegistry,
    WorkerRegistry,
    share_state,
    worker_name,
)
from server.jobs.results_cache import FinishedJobs
from server.jobs.sqlite_store import SqliteJobStore
from server.jobs.store import JobStore
from server.jobs.supervisor import Supervisor
from server.metrics import Metrics
from server.middleware import ServingMiddleware
from server.ratelimit import RateLimiter
from server.results import webhook_body
from server.routes import events, health, playground, styles, v1, v2
from server.schemas import SegBeyondRequest
from server.settings import Settings, get_settings
from server.webhooks import KEEP_AFTER_EXPIRY, WebhookDispatcher, WebhookOutbox, Webhooks, load_secret

if TYPE_CHECKING:
    from server.jobs.redis_connection import RedisTLS

log = logging.getLogger("beyond")
VERSION = "0.1.0"
REDIS_START_WAIT = 30.0  # seconds


def redis_tls(settings: Settings) -> RedisTLS:
    """The TLS files of the Redis connection (BEYOND_REDIS_CA_FILE, _CERT_FILE, _KEY_FILE)."""
    from server.jobs.redis_connection import RedisTLS

    return RedisTLS(settings.redis_ca_file, settings.redis_cert_file, settings.redis_key_file)


def build_store(settings: Settings) -> JobStore:
    """The one place the job store is chosen: Redis shared by several nodes, or SQLite embedded."""
    if settings.redis_url:
        from server.jobs.redis_store import RedisJobStore

        # A name stable across restarts of this node, so a restarted node releases its own jobs at once; the
        # worker's name or device keeps apart the workers of one host that share a data folder (one per GPU).
        consumer = f"{socket.gethostname()}:{settings.data_dir.resolve()}:{settings.worker_name or settings.device}"
        # A node started with its Redis waits a while for it, then stops with StoreUnavailable.
        return RedisJobStore(
            settings.redis_url,
            ttl=settings.result_ttl,
            reclaim_after=settings.reclaim_after,
            consumer=consumer,
            wait=REDIS_START_WAIT,
            tls=redis_tls(settings),
        )
    return SqliteJobStore(settings.data_dir, ttl=settings.result_ttl)


def image_limits(settings: Settings) -> ImageLimits:
    return ImageLimits(
        max_bytes=settings.max_input_bytes,
        max_pixels=settings.max_input_pixels,
        max_canvas_pixels=settings.max_canvas_pixels,
        allow_private_urls=settings.allow_private_urls,
        timeout=settings.fetch_timeout,
    )


def build_supervisor(settings: Settings, store: JobStore, metrics: Metrics | None) -> Supervisor:
    """The supervisor of one engine process: `beyond serve`'s local worker, or a `beyond worker`."""
    config = WorkerConfig(
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        limits=image_limits(settings),
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
    return Supervisor(
        store,
        config,
        purge_interval=settings.purge_interval,
        backoff=settings.worker_restart_backoff,
        metrics=metrics,
    )


def build_registry(settings: Settings, supervisor: Supervisor | None) -> tuple[WorkerRegistry, Heartbeat | None]:
    """What /health and v1 see of the workers, and the heartbeat that publishes the local one (Redis)."""
    local = LocalWorker(supervisor, worker_name(settings.worker_name), os.getpid()) if supervisor else None
    if settings.redis_url is None:
        if local is None:
            raise ValueError("an API node without a worker (--no-worker) needs BEYOND_REDIS_URL")
        return EmbeddedRegistry(local), None
    registry = RedisRegistry(
        settings.redis_url, ttl=3 * settings.heartbeat_interval, local=local, tls=redis_tls(settings)
    )
    if local is None:
        return registry, None
    heartbeat = Heartbeat(registry, local, settings.heartbeat_interval)
    share_state(local.supervisor, registry, heartbeat)
    return registry, heartbeat


def build_services(settings: Settings) -> Services:
    limits = image_limits(settings)
    store = build_store(settings)
    metrics = Metrics()
    if settings.redis_url:
        from server.jobs.redis_store import RedisJobStore

        assert isinstance(store, RedisJobStore)
        metrics.watch_stream(store.stream_stats)
    supervisor = build_supervisor(settings, store, metrics) if settings.local_worker else None
    workers, heartbeat = build_registry(settings, supervisor)
    keys = KeyRing.load(settings.api_keys.get_secret_value() if settings.api_keys else None, settings.api_keys_file)
    for caller in keys.metered():
        store.open_account(caller.owner, to_units(caller.credits or 0.0))
    services = Services(
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
        workers=workers,
        heartbeat=heartbeat,
    )
    services.webhooks = build_webhooks(settings, services)
    return services


def build_webhooks(settings: Settings, services: Services) -> Webhooks | None:
    """Webhook delivery, with BEYOND_WEBHOOK_SECRET only; its outbox is a file beside the job store's."""
    if settings.webhook_secret is None:
        return None
    secret = settings.webhook_secret.get_secret_value()
    load_secret(secret)  # a malformed secret stops the start (ValueError, worded without the secret)
    outbox = WebhookOutbox(settings.data_dir / "webhooks.sqlite3")
    dispatcher = WebhookDispatcher(outbox, secret, services.limits, timeout=settings.webhook_timeout)
    return Webhooks(
        services.store,
        outbox,
        dispatcher,
        lambda job: webhook_body(services, job),
        keep=settings.result_ttl + KEEP_AFTER_EXPIRY,
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
        # Every route that takes a key says so; the output images and previews are open (their URL is the key).
        schema["components"]["securitySchemes"] = API_KEY_SCHEME
        for path, operations in schema.get("paths", {}).items():
            if path.startswith(("/v1/seg-beyond", "/v2/")) and "/outputs/" not in path and "preview" not in path:
                for operation in operations.values():
                    operation["security"] = [{name: []} for name in API_KEY_SCHEME]
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
        if services.supervisor:
            services.supervisor.start()
        if services.heartbeat:
            services.heartbeat.start()
        services.inputs.start()
        if services.webhooks is not None:
            await services.webhooks.start()
        if services.keys.open:
            log.warning("NO API KEYS CONFIGURED: anyone who reaches this port can use it (set BEYOND_API_KEYS)")
        log.info("beyond serving %s from %s", settings.model, settings.data_dir)
        try:
            yield
        finally:
            await services.inputs.stop()
            if services.supervisor:
                services.supervisor.stop()
            if services.heartbeat:
                services.heartbeat.stop()
            if services.webhooks is not None:
                # After the supervisor: jobs it ends while stopping are still queued (or found at the next start).
                await services.webhooks.stop()

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
