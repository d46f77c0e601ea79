"""/health (is the engine ready, does the store work, is there disk left) and /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from server.auth import MetricsReaderDep
from server.deps import ServicesDep, disk_problem

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(services: ServicesDep, _: MetricsReaderDep) -> Response:
    return services.metrics.render(services.store.queued_count())


def _health(services: ServicesDep) -> tuple[dict, bool]:
    status = services.supervisor.status
    store_problem = services.store.health()
    body: dict = {
        "state": status.state.value,
        "model": services.settings.model,
        "device": status.info.get("device", services.settings.device),
        "dtype": status.info.get("dtype", services.settings.dtype),
        "worker_pid": status.pid,
        "worker_restarts": status.restarts,
        "queued": None if store_problem else services.store.queued_count(),
        "store": store_problem or "ok",
    }
    disk = disk_problem(services.settings)
    if disk:
        body["disk"] = disk
    if status.error:
        body["error"] = status.error
    problems = [p for p in (store_problem, disk) if p]
    if problems:
        body["error"] = "; ".join(problems + ([status.error] if status.error else []))
    return body, services.supervisor.ready and not problems


@router.get("/health", include_in_schema=False)
async def health(services: ServicesDep) -> JSONResponse:
    body, ok = await run_in_threadpool(_health, services)
    return JSONResponse(body, status_code=200 if ok else 503)
