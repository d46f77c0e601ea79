"""/health (is an engine ready, does the store work, is there disk left) and /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from server.guard.auth import MetricsReaderDep
from server.http.deps import ServicesDep, disk_problem
from server.jobs.registry import WorkerInfo
from server.jobs.store import StoreError

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(services: ServicesDep, _: MetricsReaderDep) -> Response:
    return services.metrics.render(services.store.queued_count())


def _primary(workers: list[WorkerInfo], local: str | None) -> WorkerInfo | None:
    """The worker the top-level fields describe: a ready one (this node's own first), else this node's own,
    else the first. With one local worker that is always it, as before there were several."""
    ranked = sorted(workers, key=lambda w: (not w.ready, w.name != local))
    return ranked[0] if ranked else None


def _health(services: ServicesDep) -> tuple[dict, bool]:
    store_problem = services.store.health()
    try:
        workers = services.workers.workers()
        registry_problem = None
    except StoreError as exc:
        workers, registry_problem = [], str(exc)
    local = services.heartbeat.local.name if services.heartbeat else None
    primary = _primary(workers, local)
    settings = services.settings
    body: dict = {
        "state": primary.state if primary else "no_workers",
        "model": primary.model if primary else settings.model,
        "device": primary.device if primary else settings.device,
        "dtype": primary.dtype if primary else settings.dtype,
        "worker_pid": primary.engine_pid if primary else None,
        "worker_restarts": primary.restarts if primary else 0,
        "queued": None if store_problem else services.store.queued_count(),
        "store": store_problem or "ok",
        "workers": [worker.to_json() for worker in workers],
    }
    disk = disk_problem(settings)
    if disk:
        body["disk"] = disk
    worker_error = primary.error if primary else (registry_problem or "no live worker is known")
    if worker_error:
        body["error"] = worker_error
    problems = [p for p in (store_problem, disk) if p]
    if problems:
        body["error"] = "; ".join(problems + ([worker_error] if worker_error else []))
    ready = primary is not None and primary.ready
    return body, ready and not problems


@router.get("/health", include_in_schema=False)
async def health(services: ServicesDep) -> JSONResponse:
    body, ok = await run_in_threadpool(_health, services)
    return JSONResponse(body, status_code=200 if ok else 503)
