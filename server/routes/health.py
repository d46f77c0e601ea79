from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from server.auth import MetricsReaderDep
from server.deps import ServicesDep

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(services: ServicesDep, _: MetricsReaderDep) -> Response:
    return services.metrics.render(services.store.queued_count())


@router.get("/health")
def health(services: ServicesDep) -> JSONResponse:
    status = services.supervisor.status
    body = {
        "state": status.state,
        "model": services.settings.model,
        "device": status.info.get("device", services.settings.device),
        "dtype": status.info.get("dtype", services.settings.dtype),
        "worker_pid": status.pid,
        "worker_restarts": status.restarts,
        "queued": services.store.queued_count(),
    }
    if status.error:
        body["error"] = status.error
    return JSONResponse(body, status_code=200 if services.supervisor.ready else 503)
