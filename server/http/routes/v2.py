"""The /v2 queue: submit, status, result, cancel, and the output images."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from server.guard.auth import CallerDep, SubmitterDep, get_caller, owner_of
from server.http import fast_routes
from server.http.deps import BodyDep, Services, ServicesDep, public_base
from server.http.errors import BadRequest, Conflict, NotFound
from server.http.results import (
    find,
    find_state,
    list_item,
    read_output,
    read_preview,
    result_body,
    status_body,
    webhook_status,
)
from server.http.routes.responses import CANCEL, READ, SUBMIT, SUBMITTED_LINKS, errors, ok
from server.http.routes.v1 import REQUEST_SCHEMA, SLUG
from server.http.schemas import (
    EXTENSION,
    BodyResponse,
    CancelResponse,
    RequestList,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
)
from server.http.submission import submit
from server.jobs.contract import OUTPUT_FORMATS, JobStatus

router = APIRouter(prefix="/v2")
MAX_LIST = 100
CURSOR = re.compile(r"[A-Za-z0-9_-]{1,32}")
EXTENSIONS = [extension for extension, _ in OUTPUT_FORMATS.values()]


@router.post(
    f"/{SLUG}",
    openapi_extra=REQUEST_SCHEMA,
    operation_id="submit",
    responses={**ok(SubmitResponse, "queued", links=SUBMITTED_LINKS), **SUBMIT},
    summary="Queue a request",
)
async def submit_async(caller: SubmitterDep, body: BodyDep, request: Request, services: ServicesDep) -> Response:
    root = public_base(request, services.settings)
    job = await submit(body, services, caller, root)
    base = f"{root}/v2/requests/{job.id}"
    answer = SubmitResponse(request_id=job.id, status=job.status.value, status_url=f"{base}/status", response_url=base)
    return BodyResponse(answer, headers={"x-request-id": job.id})


# The hot path of every polling client: async (no thread hop), one small row, finished jobs cached.
@router.get(
    "/requests/{request_id}/status",
    operation_id="get_status",
    responses={**ok(StatusResponse, "QUEUED, PROCESSING or COMPLETED (FAILED: 422)"), **READ},
    summary="Poll a request",
)
async def get_status(request_id: str, request: Request) -> Response:
    return await answer_status(request, request_id)


async def answer_status(request: Request, request_id: str) -> Response:
    """What every polling client calls, many times a request: no dependency injection, no thread hop,
    one small row or the cache. The middleware answers it ahead of the router, through here (a fast route,
    added below)."""
    services: Services = request.app.state.services
    caller = await get_caller(request)
    state = find_state(services, request_id, owner_of(caller))
    return BodyResponse(status_body(services, state, public_base(request, services.settings)))


fast_routes.add("GET", f"{router.prefix}/requests/{{request_id}}/status", answer_status)


@router.get(
    "/requests/{request_id}",
    operation_id="get_result",
    responses={**ok(ResultResponse, "the result once COMPLETED, the request as queued before (FAILED: 422)"), **READ},
    summary="A request's result",
)
async def get_result(request_id: str, request: Request, services: ServicesDep, caller: CallerDep) -> Response:
    job = find(services, request_id, owner_of(caller))
    base = public_base(request, services.settings)
    # Only a request with a webhook_url reads the outbox (off the event loop); the others answer as before.
    webhook = await run_in_threadpool(webhook_status, services, job) if job.delivery.webhook_url else None
    if job.base64:  # reads every image: off the event loop
        return BodyResponse(await run_in_threadpool(result_body, services, job, base, webhook))
    return BodyResponse(result_body(services, job, base, webhook))


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The seq a cursor continues below; BadRequest for anything this server did not hand out."""
    problem = BadRequest("cursor: not a cursor this server handed out (pass next_cursor as it came)")
    if not CURSOR.fullmatch(cursor):
        raise problem
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise problem from None
    kind, _, number = text.partition(":")
    if kind != "seq" or not number.isdigit() or not 0 < int(number) < 2**63:
        raise problem
    return int(number)


def parse_limit(limit: str | None) -> int:
    if limit is None:
        return 20
    digits = limit.strip()
    # ASCII digits only, and not too many: str.isdigit() also takes "²", which int() refuses, and int() takes
    # no more than 4300 digits.
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 10) or not 1 <= int(digits) <= MAX_LIST:
        raise BadRequest(f"limit: must be an integer from 1 to {MAX_LIST}")
    return int(digits)


def parse_status(status: str | None) -> JobStatus | None:
    if status is None:
        return None
    try:
        return JobStatus(status.strip().upper())
    except ValueError:
        raise BadRequest(f"status: must be one of {', '.join(s.value for s in JobStatus)}") from None


# The query parameters as the server reads them (documented here: FastAPI would offer null for each).
LIST_PARAMETERS = {
    "parameters": [
        {
            "name": "limit",
            "in": "query",
            "description": f"requests per page, 1 to {MAX_LIST}",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST, "default": 20},
        },
        {
            "name": "status",
            "in": "query",
            "description": "only requests in this state (any case)",
            "schema": {"type": "string", "enum": [s.value for s in JobStatus]},
        },
        {
            "name": "cursor",
            "in": "query",
            "description": "next_cursor of the page before, as it came",
            "schema": {"type": "string", "pattern": f"^{CURSOR.pattern}$"},
        },
    ]
}


@router.get(
    "/requests",
    operation_id="list_requests",
    responses={**ok(RequestList, "a page of requests"), **errors(400, 401, 403, 503)},
    openapi_extra=LIST_PARAMETERS,
    summary="List your requests",
    description=EXTENSION + "the caller's own requests (those made with its key; without keys configured, those"
    " made without one), newest first, a page at a time. Expired requests are not listed.",
)
def list_requests(
    request: Request,
    services: ServicesDep,
    caller: CallerDep,
    limit: Annotated[str | None, Query(include_in_schema=False)] = None,
    status: Annotated[str | None, Query(include_in_schema=False)] = None,
    cursor: Annotated[str | None, Query(include_in_schema=False)] = None,
) -> Response:
    count, wanted = parse_limit(limit), parse_status(status)
    before = decode_cursor(cursor) if cursor is not None else None
    # One more than the page, to know whether another page follows.
    jobs = services.store.list_jobs(owner_of(caller), status=wanted, limit=count + 1, before=before)
    page = jobs[:count]
    base = public_base(request, services.settings)
    more = len(jobs) > count
    listing = RequestList(
        requests=[list_item(job, base) for job in page],
        next_cursor=encode_cursor(page[-1].seq) if more else None,
    )
    return BodyResponse(listing)


@router.post(
    "/requests/{request_id}/cancel",
    operation_id="cancel_request",
    responses={**ok(CancelResponse, "cancelled, or being stopped"), **CANCEL},
    summary="Cancel a request",
)
def cancel(request_id: str, services: ServicesDep, caller: CallerDep) -> Response:
    job = find(services, request_id, owner_of(caller))
    if job.finished and not job.cancelled:
        raise Conflict(f"request already {job.status.value}", status=job.status.value)
    job = services.store.request_cancel(request_id) or job
    answer = CancelResponse(request_id=job.id, status=job.status.value, cancel_requested=True, error=job.error)
    return BodyResponse(answer)


@router.get(
    "/requests/{request_id}/outputs/{index}.{extension}",
    operation_id="get_output",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}, "description": "an output image"},
        **errors(400, 404, 503, e400="index: not an integer"),
    },
    summary="An output image",
)
def get_output(
    request_id: str,
    # Documented from 0; a negative index is an output that does not exist (404), as it always was.
    index: Annotated[int, Path(description="the image's place, from 0", json_schema_extra={"minimum": 0})],
    extension: Annotated[str, Path(description="the images' format", json_schema_extra={"enum": EXTENSIONS})],
    services: ServicesDep,
) -> Response:
    # Output URLs are handed to browsers and downloaders that hold no key: the 128-bit random
    # request id in the path is what guards them, as signed URLs do on the hosted service.
    job = find(services, request_id)
    if extension != job.delivery.extension:
        raise NotFound(f"request {request_id!r} has no output {index}.{extension}")
    return Response(read_output(services, job, index), media_type=job.delivery.media_type)


@router.get(
    "/requests/{request_id}/preview.jpg",
    operation_id="get_preview",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "the live preview"}, **errors(404, 503)},
    summary="A running request's live preview",
)
def get_preview(request_id: str, services: ServicesDep) -> Response:
    # Guarded as the outputs are: by the request id in the path.
    job = find_state(services, request_id)
    return Response(read_preview(services, job.id), media_type="image/jpeg", headers={"cache-control": "no-store"})
