"""The /v2 queue: submit, status, result, cancel, and the output images."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from server.auth import CallerDep, SubmitterDep, owner_of
from server.deps import BodyDep, ServicesDep, public_base
from server.errors import Conflict, NotFound
from server.results import find, find_state, read_output, read_preview, result_body, status_body
from server.routes.responses import READ, SUBMIT, errors
from server.routes.v1 import REQUEST_SCHEMA, SLUG
from server.schemas import CancelResponse, ResultResponse, StatusResponse, SubmitResponse
from server.submission import submit

router = APIRouter(prefix="/v2")


@router.post(
    f"/{SLUG}", openapi_extra=REQUEST_SCHEMA, response_model=SubmitResponse, responses=SUBMIT, summary="Queue a request"
)
async def submit_async(caller: SubmitterDep, body: BodyDep, request: Request, services: ServicesDep) -> JSONResponse:
    job = await submit(body, services, caller)
    base = f"{public_base(request, services.settings)}/v2/requests/{job.id}"
    return JSONResponse(
        {
            "request_id": job.id,
            "status": job.status.value,
            "status_url": f"{base}/status",
            "response_url": base,
        },
        headers={"x-request-id": job.id},
    )


@router.post("/{slug}", include_in_schema=False)
async def unknown_model(slug: str) -> Response:
    raise NotFound(f"model {slug!r} not found; this server serves {SLUG!r}")


# The hot path of every polling client: async (no thread hop), one small row, finished jobs cached.
@router.get("/requests/{request_id}/status", response_model=StatusResponse, responses=READ, summary="Poll a request")
async def get_status(request_id: str, request: Request, services: ServicesDep, caller: CallerDep) -> JSONResponse:
    state = find_state(services, request_id, owner_of(caller))
    return JSONResponse(status_body(services, state, public_base(request, services.settings)))


@router.get("/requests/{request_id}", response_model=ResultResponse, responses=READ, summary="A request's result")
async def get_result(request_id: str, request: Request, services: ServicesDep, caller: CallerDep) -> JSONResponse:
    job = find(services, request_id, owner_of(caller))
    base = public_base(request, services.settings)
    if job.base64:  # reads every image: off the event loop
        return JSONResponse(await run_in_threadpool(result_body, services, job, base))
    return JSONResponse(result_body(services, job, base))


@router.post(
    "/requests/{request_id}/cancel",
    response_model=CancelResponse,
    responses={**READ, **errors(409)},
    summary="Cancel a request",
)
def cancel(request_id: str, services: ServicesDep, caller: CallerDep) -> dict:
    job = find(services, request_id, owner_of(caller))
    if job.finished and not job.cancelled:
        raise Conflict(f"request already {job.status.value}", body={"status": job.status.value})
    job = services.store.request_cancel(request_id) or job
    return {"request_id": job.id, "status": job.status.value, "cancel_requested": True, "error": job.error}


@router.get(
    "/requests/{request_id}/outputs/{index}.{extension}",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}, "description": "an output image"},
        **errors(404, 503),
    },
    summary="An output image",
)
def get_output(request_id: str, index: int, extension: str, services: ServicesDep) -> Response:
    # Output URLs are handed to browsers and downloaders that hold no key: the 128-bit random
    # request id in the path is what guards them, as signed URLs do on the hosted service.
    job = find(services, request_id)
    if extension != job.delivery.extension:
        raise NotFound(f"request {request_id!r} has no output {index}.{extension}")
    return Response(read_output(services, job, index), media_type=job.delivery.media_type)


@router.get(
    "/requests/{request_id}/preview.jpg",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "the live preview"}, **errors(404, 503)},
    summary="A running request's live preview",
)
def get_preview(request_id: str, services: ServicesDep) -> Response:
    # Guarded as the outputs are: by the request id in the path.
    job = find_state(services, request_id)
    return Response(read_preview(services, job.id), media_type="image/jpeg", headers={"cache-control": "no-store"})
