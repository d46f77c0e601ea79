"""POST /v1/seg-beyond: the synchronous endpoint. It goes through the same queue as /v2."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.auth import SubmitterDep, owner_of
from server.deps import BodyDep, ServicesDep, public_base
from server.errors import BadGateway, BadRequest, InternalError, NotFound
from server.jobs.model import FailureKind, JobStatus
from server.schemas import SegBeyondRequest
from server.submission import read_output, result_body, submit, wait_finished

SLUG = "seg-beyond"
router = APIRouter()
REQUEST_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": SegBeyondRequest.model_json_schema()}},
    }
}


@router.post(
    f"/v1/{SLUG}",
    openapi_extra=REQUEST_SCHEMA,
    responses={200: {"content": {"image/jpeg": {}}, "description": "the outpainted image (JSON with base64: true)"}},
)
async def run_sync(caller: SubmitterDep, body: BodyDep, request: Request, services: ServicesDep) -> Response:
    # While a worker restarts, v1 waits its turn; when the model cannot load, waiting is pointless.
    if services.supervisor.status.state == "failed":
        raise BadGateway(f"the engine is not available: {services.supervisor.status.error or 'it failed to start'}")
    job = await submit(body, services, owner_of(caller))
    job = await wait_finished(services, job.id, request.is_disconnected)
    if job.status == JobStatus.FAILED:
        if job.error_kind == FailureKind.INPUT.value:
            raise BadRequest(job.error or "input_image: unusable")
        raise InternalError(job.error or "failed", headers={"x-request-id": job.id})
    headers = {
        "x-request-id": job.id,
        "x-seeds": ",".join(str(s) for s in job.result["seeds"]),
        "x-inference-time": f"{job.result['inference_time']:.4f}",
    }
    if not job.base64:
        return Response(read_output(services, job, 0), media_type="image/jpeg", headers=headers)
    # The v2 result body (its outputs inline), with the images also under "image"/"images".
    result = result_body(services, job, public_base(request, services.settings))
    return JSONResponse({**result, "image": result["output"], "images": result["outputs"]}, headers=headers)


@router.post("/v1/{slug}", include_in_schema=False)
async def unknown_model(slug: str) -> Response:
    raise NotFound(f"model {slug!r} not found; this server serves {SLUG!r}")
