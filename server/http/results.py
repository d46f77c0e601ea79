"""The read side: status, result and output bodies, each built as its documented model (server/http/schemas.py).
Finished jobs never change, so they are cached."""

from __future__ import annotations

import base64
from datetime import datetime, timezone

from server.http.deps import Services
from server.http.errors import FailedRequest, NotFound
from server.http.schemas import (
    ListedRequest,
    Prompts,
    ResultResponse,
    RunMetrics,
    RunParameters,
    StatusResponse,
    SyncResult,
    WebhookStatus,
)
from server.jobs.contract import PREVIEW_NAME, Job, JobState, JobStatus
from server.jobs.store import FileGone


def _not_found(job_id: str) -> NotFound:
    return NotFound(f"request {job_id!r} not found (unknown, or expired)")


def find(services: Services, job_id: str, owner: str | None = None) -> Job:
    job = services.finished.get(job_id)
    if job is None:
        job = services.store.get(job_id)
        if job is not None:
            services.finished.put(job)
    if job is None or (owner is not None and job.owner != owner):
        raise _not_found(job_id)
    return job


def find_state(services: Services, job_id: str, owner: str | None = None) -> JobState | Job:
    """The small row of a live job, or the cached job when it has finished."""
    state: JobState | Job | None = services.finished.get(job_id)
    if state is None:
        state = services.store.state(job_id)
        if state is not None and state.finished:
            # Read whole once; the cache answers every later poll of a finished job.
            state = services.store.get(job_id) or state
            if isinstance(state, Job):
                services.finished.put(state)
    if state is None or (owner is not None and state.owner != owner):
        raise _not_found(job_id)
    return state


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat() if ts else None


def output_url(base: str, job: Job, index: int) -> str:
    return f"{base}/v2/requests/{job.id}/outputs/{index}.{job.delivery.extension}"


def read_output(services: Services, job: Job, index: int) -> bytes:
    outputs = job.result.outputs if job.result else ()
    if job.status != JobStatus.COMPLETED or not 0 <= index < len(outputs):
        raise NotFound(f"request {job.id!r} has no output {index}")
    try:
        return services.store.read_file(job.id, outputs[index])
    except FileGone:
        raise NotFound(f"output {index} of request {job.id!r} is no longer stored") from None


def failed(job: JobState | Job, webhook: WebhookStatus | None = None) -> FailedRequest:
    return FailedRequest(job.error or "failed", request_id=job.id, webhook=webhook)


NOT_ENABLED = WebhookStatus(delivered=False, attempts=0, last_status=None, error="webhooks are not enabled")


def webhook_status(services: Services, job: Job) -> WebhookStatus | None:
    """How the job's webhook delivery went; None for a job without a webhook_url. Blocking (the outbox)."""
    if job.delivery.webhook_url is None:
        return None
    if services.webhooks is None:  # started since without a secret: nothing is delivered
        return NOT_ENABLED
    return WebhookStatus(**services.webhooks.status(job.id))


def webhook_body(services: Services, job: Job) -> bytes:
    """What a finished job's webhook carries: the body GET /v2/requests/{id} answers (the 422 body for a FAILED
    one), less the `webhook` member, which is about this delivery itself. Blocking (base64 reads the images)."""
    if job.status == JobStatus.FAILED:
        return failed(job).body().render()
    return result_body(services, job, job.delivery.base_url or "").render()


def status_body(services: Services, job: JobState | Job, base: str = "") -> StatusResponse:
    """`base`: the public origin for the preview's URL (without one, the URL is a path)."""
    if job.status == JobStatus.FAILED:
        raise failed(job)
    # A job handed to the worker ahead of time is still waiting its turn until it starts.
    if job.status == JobStatus.QUEUED or (job.status == JobStatus.PROCESSING and not job.started):
        return StatusResponse(status="QUEUED", request_id=job.id, queue_position=services.store.queue_position(job.seq))
    if job.status == JobStatus.PROCESSING:
        preview = preview_url(base, job.id) if services.store.has_file(job.id, PREVIEW_NAME) else None
        return StatusResponse(status="PROCESSING", request_id=job.id, progress=round(job.progress, 4), preview=preview)
    return StatusResponse(status=job.status.value, request_id=job.id)


def preview_url(base: str, job_id: str) -> str:
    return f"{base}/v2/requests/{job_id}/{PREVIEW_NAME}"


def read_preview(services: Services, job_id: str) -> bytes:
    try:
        return services.store.read_file(job_id, PREVIEW_NAME)
    except FileGone:
        raise NotFound(f"request {job_id!r} has no preview (yet)") from None


def result_body(
    services: Services, job: Job, base: str, webhook: WebhookStatus | None = None, *, sync: bool = False
) -> ResultResponse:
    """The result body; `webhook` (a webhook_status) is added for a job with a webhook_url. `sync`: v1's JSON
    answer, the images also under `image` and `images` (a COMPLETED job's only)."""
    if job.status == JobStatus.FAILED:
        raise failed(job, webhook)
    parameters = RunParameters(**job.params.to_json())
    result = job.result
    if job.status != JobStatus.COMPLETED or result is None:
        return ResultResponse(
            status=job.status.value,
            request_id=job.id,
            created_at=iso(job.created_at),
            started_at=iso(job.started_at),
            parameters=parameters,
            webhook=webhook,
        )
    count = len(result.outputs)
    if job.base64:
        outputs = [base64.b64encode(read_output(services, job, i)).decode() for i in range(count)]
    else:
        outputs = [output_url(base, job, i) for i in range(count)]
    started = job.started_at or job.created_at
    completed = dict(
        status=job.status.value,
        request_id=job.id,
        created_at=iso(job.created_at),
        started_at=iso(job.started_at),
        parameters=parameters,
        output=outputs[0],
        outputs=outputs,
        seeds=list(result.seeds),
        width=result.width,
        height=result.height,
        completed_at=iso(job.finished_at),
        expires_at=iso(job.expires_at),
        metrics=RunMetrics(
            inference_time=round(result.inference_time, 4),
            queue_time=round(started - job.created_at, 4),
            total_time=round((job.finished_at or started) - job.created_at, 4),
        ),
        prompts=Prompts(positive=list(result.positive_prompts), negative=list(result.negative_prompts)),
        styles=list(result.styles),
        notes=result.notes,
        working_size=list(result.working_size),
        webhook=webhook,
    )
    if sync:
        return SyncResult(**completed, image=outputs[0], images=outputs)
    return ResultResponse(**completed)


def list_item(job: Job, base: str) -> ListedRequest:
    """One request in GET /v2/requests: what it is and where its images are, without reading them."""
    outputs = None
    if job.status == JobStatus.COMPLETED and job.result is not None:
        outputs = [output_url(base, job, i) for i in range(len(job.result.outputs))]
    return ListedRequest(
        request_id=job.id,
        status=job.status.value,
        created_at=iso(job.created_at),
        completed_at=iso(job.finished_at) if job.finished else None,
        outputs=outputs,
        error=(job.error or "failed") if job.status == JobStatus.FAILED else None,
    )
