"""GET /v2/requests/{id}/events: a request's progress as a server-sent event stream.

Events: `status` (data: the body GET .../status answers) whenever what that body says changes, then one
`result` (data: the body GET /v2/requests/{id} answers, the 422 body for a FAILED request), then the end.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from server.auth import CallerDep, owner_of
from server.deps import Services, ServicesDep, public_base
from server.errors import ApiError
from server.jobs.contract import Job, JobState, JobStatus
from server.results import find, find_state, result_body, status_body

router = APIRouter(prefix="/v2")
log = logging.getLogger("beyond.events")

QUEUE_LOOK = 1.0  # a queued job's position moves with other jobs: looked at again this often
WAIT = 30.0  # longest wait in one next_change call; nothing is sent when it passes unchanged
PING = 15  # seconds between keep-alive comments, so proxies do not drop a quiet stream


def seen(body: dict[str, Any]) -> tuple:
    """A status body as a comparable value: two bodies that read the same to a client compare equal."""
    return tuple(sorted(body.items()))


def _visible(services: Services, job_id: str) -> tuple[JobState | Job | None, tuple]:
    try:
        job = find_state(services, job_id)
    except ApiError:
        return None, ("gone",)
    if job.finished:
        return job, ("ended",)
    return job, seen(status_body(services, job))


async def next_change(services: Services, job_id: str, last: tuple, timeout: float) -> JobState | Job | None:
    """The job once something a client sees of it differs from `last` (see `seen`), or when `timeout`
    passes; None once it is gone (expired). The store wakes it on every change of the job itself."""
    deadline = time.monotonic() + timeout
    with services.store.events.watch(job_id) as watch:
        while True:
            watch.clear()
            job, now = _visible(services, job_id)
            left = deadline - time.monotonic()
            if now != last or left <= 0:
                return job
            await watch.wait(min(left, QUEUE_LOOK) if job is not None and job.status == JobStatus.QUEUED else left)


def final_body(services: Services, job_id: str, base: str) -> dict[str, Any]:
    """What GET /v2/requests/{id} answers now, error bodies included (422 FAILED, 404 once expired)."""
    try:
        return result_body(services, find(services, job_id), base)
    except ApiError as exc:
        return exc.body()


async def progress_events(
    services: Services, job: JobState | Job | None, job_id: str, base: str
) -> AsyncIterator[ServerSentEvent]:
    try:
        last: tuple = ()
        while job is not None and not job.finished:
            body = status_body(services, job)
            if seen(body) != last:
                last = seen(body)
                yield ServerSentEvent(data=json.dumps(body), event="status")
            job = await next_change(services, job_id, last, WAIT)
        result = await run_in_threadpool(final_body, services, job_id, base)
        yield ServerSentEvent(data=json.dumps(result), event="result")
    finally:
        # Reached on the last event and when the client goes away (the generator is cancelled then).
        log.info("events stream for %s closed", job_id, extra={"event": "events_closed", "request_id": job_id})


@router.get(
    "/requests/{request_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "`status` events, then one `result`"}},
)
async def get_events(
    request_id: str, request: Request, services: ServicesDep, caller: CallerDep
) -> EventSourceResponse:
    """Server-sent events: `status` (the status body) on every change a client would see, then `result`
    (the body GET /v2/requests/{id} answers, also for FAILED), then the stream ends."""
    job = find_state(services, request_id, owner_of(caller))  # a 404 here comes before any stream starts
    base = public_base(request, services.settings)
    return EventSourceResponse(progress_events(services, job, request_id, base), ping=PING)
