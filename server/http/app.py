"""The FastAPI application: the services (store and supervisor built by server/commands/startup.py), the
middleware and the routers, wired in one place."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from models.styles import default_registry
from server.commands.startup import build_store, build_supervisor, image_limits, redis_tls
from server.guard.auth import KeyRing
from server.guard.hosts import AllowedHosts
from server.guard.loras import lora_library
from server.guard.ratelimit import RateLimiter
from server.http.deps import Services
from server.http.errors import install_error_handlers
from server.http.middleware import ServingMiddleware
from server.http.openapi import openapi_schema
from server.http.results import webhook_body
from server.http.routes import events, health, loras, playground, styles, unknown, v1, v2
from server.jobs.contract import to_units
from server.jobs.inputs import InputStage
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
from server.jobs.store import JobStore
from server.jobs.supervisor import Supervisor
from server.metrics import Metrics
from server.settings import Settings, get_settings
from server.webhooks import KEEP_AFTER_EXPIRY, Outbox, SqliteOutbox, WebhookDispatcher, Webhooks, load_secret

log = logging.getLogger("beyond")
VERSION = "0.1.0"


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
        loras=lora_library(settings),
        keys=keys,
        limiter=RateLimiter(settings.rate_limit),
        metrics=metrics,
        workers=workers,
        heartbeat=heartbeat,
    )
    services.webhooks = build_webhooks(settings, services)
    return services


def build_outbox(settings: Settings, store: JobStore) -> Outbox:
    """The webhook outbox: a file beside the SQLite job store's, or, on Redis, one shared by the fleet."""
    if settings.redis_url is None:
        return SqliteOutbox(settings.data_dir / "webhooks.sqlite3")
    from server.jobs.redis_store import RedisJobStore
    from server.webhooks.redis_outbox import RedisOutbox

    assert isinstance(store, RedisJobStore)
    # A node that dies mid-send loses its lease after half the reclaim time, and every node looks every
    # quarter: its deliveries are taken over within BEYOND_RECLAIM_AFTER, as its jobs are.
    lease = settings.reclaim_after / 2
    keep = settings.result_ttl + KEEP_AFTER_EXPIRY  # a delivery outlives its job, as the SQLite rows do
    return RedisOutbox(store.redis, prefix=store.prefix, where=store.where, lease=lease, poll=lease / 2, keep=keep)


def build_webhooks(settings: Settings, services: Services) -> Webhooks | None:
    """Webhook delivery, with BEYOND_WEBHOOK_SECRET only."""
    if settings.webhook_secret is None:
        return None
    secret = settings.webhook_secret.get_secret_value()
    load_secret(secret)  # a malformed secret stops the start (ValueError, worded without the secret)
    outbox = build_outbox(settings, services.store)
    dispatcher = WebhookDispatcher(outbox, secret, services.limits, timeout=settings.webhook_timeout)
    return Webhooks(
        services.store,
        outbox,
        dispatcher,
        lambda job: webhook_body(services, job),
        keep=settings.result_ttl + KEEP_AFTER_EXPIRY,
    )


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
    hosts = AllowedHosts(settings.allowed_hosts) if settings.allowed_hosts else None
    app.add_middleware(ServingMiddleware, metrics=services.metrics, balance=services.store.balance, hosts=hosts)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(styles.router)
    app.include_router(loras.router)
    app.include_router(events.router)
    app.include_router(playground.router)
    app.include_router(unknown.router)  # last: see its module
    return app
