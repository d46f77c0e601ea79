"""The read side: status, result and output bodies. Finished jobs never change, so they are cached."""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from typing import Any

from fastapi.responses import JSONResponse

from server.http.deps import Services
from server.http.errors import FailedRequest, NotFound
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


def failed(job: JobState | Job, webhook: dict[str, Any] | None = None) -> FailedRequest:
    extra = {} if webhook is None else {"webhook": webhook}
    return FailedRequest(job.error or "failed", request_id=job.id, **extra)


def webhook_status(services: Services, job: Job) -> dict[str, Any] | None:
    """How the job's webhook delivery went; None for a job without a webhook_url. Blocking (the outbox)."""
    if job.delivery.webhook_url is None:
        return None
    if services.webhooks is None:  # started since without a secret: nothing is delivered
        return {"delivered": False, "attempts": 0, "last_status": None, "error": "webhooks are not enabled"}
    return services.webhooks.status(job.id)


def webhook_body(services: Services, job: Job) -> bytes:
    """What a finished job's webhook carries: the body GET /v2/requests/{id} answers (the 422 body for a FAILED
    one), less the `webhook` member, which is about this delivery itself. Blocking (base64 reads the images)."""
    if job.status == JobStatus.FAILED:
        body = failed(job).body()
    else:
        body = result_body(services, job, job.delivery.base_url or "")
    return bytes(JSONResponse(body).body)  # rendered exactly as the HTTP answer is


def status_body(services: Services, job: JobState | Job, base: str = "") -> dict[str, Any]:
    """`base`: the public origin for the preview's URL (without one, the URL is a path)."""
    if job.status == JobStatus.FAILED:
        raise failed(job)
    # A job handed to the worker ahead of time is still waiting its turn until it starts.
    waiting = job.status == JobStatus.QUEUED or (job.status == JobStatus.PROCESSING and not job.started)
    status = JobStatus.QUEUED if waiting else job.status
    body: dict[str, Any] = {"status": status.value, "request_id": job.id}
    if waiting:
        body["queue_position"] = services.store.queue_position(job.seq)
    elif job.status == JobStatus.PROCESSING:
        body["progress"] = round(job.progress, 4)
        if services.store.has_file(job.id, PREVIEW_NAME):
            body["preview"] = preview_url(base, job.id)
    return body


def preview_url(base: str, job_id: str) -> str:
    return f"{base}/v2/requests/{job_id}/{PREVIEW_NAME}"


def read_preview(services: Services, job_id: str) -> bytes:
    try:
        return services.store.read_file(job_id, PREVIEW_NAME)
    except FileGone:
        raise NotFound(f"request {job_id!r} has no preview (yet)") from None


def result_body(services: Services, job: Job, base: str, webhook: dict[str, Any] | None = None) -> dict[str, Any]:
    """The result body; `webhook` (a webhook_status) is added for a job with a webhook_url."""
    if job.status == JobStatus.FAILED:
        raise failed(job, webhook)
    body: dict[str, Any] = {
        "status": job.status.value,
        "request_id": job.id,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "parameters": job.params.to_json(),
    }
    result = job.result
    if job.status != JobStatus.COMPLETED or result is None:
        return body if webhook is None else {**body, "webhook": webhook}
    count = len(result.outputs)
    if job.base64:
        outputs = [base64.b64encode(read_output(services, job, i)).decode() for i in range(count)]
    else:
        outputs = [output_url(base, job, i) for i in range(count)]
    started = job.started_at or job.created_at
    body.update(
        output=outputs[0],
        outputs=outputs,
        seeds=list(result.seeds),
        width=result.width,
        height=result.height,
        completed_at=iso(job.finished_at),
        expires_at=iso(job.expires_at),
        metrics={
            "inference_time": round(result.inference_time, 4),
            "queue_time": round(started - job.created_at, 4),
            "total_time": round((job.finished_at or started) - job.created_at, 4),
        },
        prompts={"positive": list(result.positive_prompts), "negative": list(result.negative_prompts)},
        styles=list(result.styles),
        notes=result.notes,
        working_size=list(result.working_size),
    )
    if webhook is not None:
        body["webhook"] = webhook
    return body


def list_item(job: Job, base: str) -> dict[str, Any]:
    """One request in GET /v2/requests: what it is and where its images are, without reading them."""
    item: dict[str, Any] = {"request_id": job.id, "status": job.status.value, "created_at": iso(job.created_at)}
    if job.finished:
        item["completed_at"] = iso(job.finished_at)
    if job.status == JobStatus.COMPLETED and job.result is not None:
        item["outputs"] = [output_url(base, job, i) for i in range(len(job.result.outputs))]
    elif job.status == JobStatus.FAILED:
        item["error"] = job.error or "failed"
    return item
