"""POST /v1/seg-beyond: the synchronous endpoint. It goes through the same queue as /v2."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from server.guard.auth import get_caller, get_submitter
from server.http import fast_routes
from server.http.deps import Services, parse_body, public_base
from server.http.errors import BadRequest, Conflict, InternalError
from server.http.results import read_output, result_body, webhook_status
from server.http.routes.responses import errors
from server.http.schemas import BodyResponse, SegBeyondRequest, SyncResult
from server.http.submission import submit, wait_finished
from server.jobs.contract import FailureKind, JobStatus

SLUG = "seg-beyond"
PATH = f"/v1/{SLUG}"
router = APIRouter()
# The body is parsed by server/http/deps.py (for our 400s and 413s); the schema is added to the components
# by server/http/app.py's openapi_schema.
REQUEST_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{SegBeyondRequest.__name__}"}}},
    }
}


@router.post(
    PATH,
    operation_id="run",
    openapi_extra=REQUEST_SCHEMA,
    summary="Outpaint an image and wait for it",
    response_class=Response,
    responses={
        200: {
            "content": {
                "image/jpeg": {},
                "image/png": {},
                "image/webp": {},
                "application/json": {"schema": {"$ref": f"#/components/schemas/{SyncResult.__name__}"}},
            },
            "description": "the outpainted image (JSON with the images inline when base64 is true); its type follows"
            " output_format (an extension of the hosted API; jpeg by default)",
        },
        **errors(400, 401, 403, 406, 409, 413, 429, 500, 502, 503, 504, 507),
    },
    # SyncResult is not a response_model (the route answers images too): server/http/app.py adds it to the components.
)
async def run_sync(request: Request) -> Response:
    return await answer_v1(request)


async def answer_v1(request: Request) -> Response:
    """The whole v1 request, dependencies included, with no FastAPI routing or dependency injection
    (they cost as much as this server's own part of a small request). The middleware answers
    POST /v1/seg-beyond ahead of the router, through here (a fast route, added at the end of this module);
    the route above documents it."""
    services: Services = request.app.state.services
    # The rate limit counts the caller before its body is read.
    caller = await get_submitter(request, await get_caller(request))
    body = await parse_body(request, services)
    base = public_base(request, services.settings)
    # sync: with no worker ready anywhere (none known, loading, restarting or failed), a 502 at once and
    # nothing queued; /v2 takes the same request and queues it for when a worker is back.
    job = await submit(body, services, caller, base, sync=True)
    job = await wait_finished(services, job.id, request)
    if job.status == JobStatus.FAILED:
        headers = {"x-request-id": job.id}
        if job.error_kind == FailureKind.INPUT.value:
            raise BadRequest(job.error or "input_image: unusable", headers=headers)
        if job.cancelled:
            raise Conflict(f"request {job.id} was cancelled", headers=headers)
        raise InternalError(job.error or "failed", headers=headers)
    assert job.result is not None
    headers = {
        "x-request-id": job.id,
        "x-seeds": ",".join(str(s) for s in job.result.seeds),
        "x-inference-time": f"{job.result.inference_time:.4f}",
    }
    if not job.base64:
        return Response(read_output(services, job, 0), media_type=job.delivery.media_type, headers=headers)
    # The v2 result body (its outputs inline), with the images also under "image"/"images".
    webhook = await run_in_threadpool(webhook_status, services, job) if job.delivery.webhook_url else None
    result = await run_in_threadpool(result_body, services, job, base, webhook, sync=True)
    return BodyResponse(result, headers=headers)


fast_routes.add("POST", PATH, answer_v1)
