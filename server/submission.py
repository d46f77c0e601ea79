"""Turning a validated request into a queued job, and reading jobs back for clients."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from datetime import datetime, timezone
from typing import Any

from starlette.concurrency import run_in_threadpool

from models.seeds import draw_seed
from server.auth import Caller
from server.deps import Services
from server.errors import BadRequest, GatewayTimeout, InsufficientCredits, JobFailed, NotFound, RateLimited
from server.images import InputImageError, check_canvas, check_url, decode_base64, decode_image, is_url
from server.jobs.model import Job, JobStatus
from server.jobs.store import InsufficientBalance, QueueFull
from server.schemas import SegBeyondRequest

POLL = 0.05
log = logging.getLogger("beyond.submission")


def _prepare_input(
    body: SegBeyondRequest, services: Services
) -> tuple[dict[str, Any], bytes | None, tuple[int, int] | None]:
    """Check the image now (a bad one is a 400); URLs are fetched when the job runs."""
    value = body.input_image
    try:
        if is_url(value):
            check_url(value.strip(), services.limits)
            return {"kind": "url", "url": value.strip()}, None, None
        data = decode_base64(value, services.limits)
        size = decode_image(data, services.limits).size
        check_canvas(size, body.model_dump(), services.limits)
        return {"kind": "file"}, data, size
    except InputImageError as exc:
        raise BadRequest(str(exc)) from None


async def submit(body: SegBeyondRequest, services: Services, caller: Caller | None = None) -> Job:
    max_queue = services.settings.max_queue
    queue_full = RateLimited(
        f"the queue is full ({max_queue} requests waiting); try again shortly", headers={"Retry-After": "5"}
    )
    # Checked first so a full server does not decode images it will refuse (and exactly, below).
    if services.store.queued_count() >= max_queue:
        raise queue_full
    source, image, image_size = await run_in_threadpool(_prepare_input, body, services)
    params = body.engine_params(services.styles)
    if params["seed"] == -1:
        # Drawn now, so a retried job and the stored record use the same seed.
        params["seed"] = draw_seed()
    metered = caller is not None and caller.credits is not None
    try:
        job = await run_in_threadpool(
            services.store.create,
            params,
            source,
            image=image,
            base64=body.base64,
            owner=caller.owner if caller else None,
            cost=request_cost(params, image_size) if metered else 0.0,
            max_queued=max_queue,
        )
    except QueueFull:
        raise queue_full from None
    except InsufficientBalance as exc:
        raise InsufficientCredits(
            f"insufficient credits: this request costs {exc.cost:g}, the balance is {exc.balance:g}"
        ) from None
    log.info(
        "accepted request %s",
        job.id,
        extra={"event": "accepted", "request_id": job.id, "caller": caller.name if caller else None},
    )
    return job


# An input given by URL is only fetched when its job runs; its size is taken to be SDXL's native one.
URL_INPUT_SIZE = (1024, 1024)


def request_cost(params: dict[str, Any], image_size: tuple[int, int] | None) -> float:
    """samples x steps / 30 x max(1, megapixels of the output canvas), rounded to 4 decimals: a
    default request (1 sample, 30 steps) on a canvas up to 1 MP costs 1 credit."""
    width, height = image_size or URL_INPUT_SIZE
    width += params["left"] + params["right"]
    height += params["top"] + params["bottom"]
    megapixels = max(1.0, width * height / 1e6)
    return round(params["samples"] * params["steps"] / 30 * megapixels, 4)


def find(services: Services, job_id: str, owner: str | None = None) -> Job:
    job = services.store.get(job_id)
    if job is None or (owner is not None and job.owner != owner):
        raise NotFound(f"request {job_id!r} not found (unknown, or expired)")
    return job


async def wait_finished(services: Services, job_id: str, disconnected: Any = None) -> Job:
    """Wait for a job to end. If the client goes away first, or BEYOND_SYNC_TIMEOUT passes, the job
    is cancelled so no GPU time is spent on an answer nobody will read."""
    deadline = time.monotonic() + services.settings.sync_timeout
    while True:
        job = services.store.get(job_id)
        if job is None:
            raise NotFound(f"request {job_id!r} not found")
        if job.finished:
            return job
        if time.monotonic() > deadline:
            services.store.request_cancel(job_id)
            raise GatewayTimeout(
                f"not done within {services.settings.sync_timeout:g} s; the request was cancelled",
                headers={"x-request-id": job_id},
            )
        if disconnected is not None and await disconnected():
            services.store.request_cancel(job_id)
        await asyncio.sleep(POLL)


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat() if ts else None


def output_url(base: str, job: Job, index: int) -> str:
    return f"{base}/v2/requests/{job.id}/outputs/{index}.jpg"


def read_output(services: Services, job: Job, index: int) -> bytes:
    outputs = job.result.get("outputs", [])
    if job.status != JobStatus.COMPLETED or not 0 <= index < len(outputs):
        raise NotFound(f"request {job.id!r} has no output {index}")
    return (services.store.job_dir(job.id) / outputs[index]).read_bytes()


def status_body(services: Services, job: Job) -> dict[str, Any]:
    if job.status == JobStatus.FAILED:
        raise JobFailed(job.error or "failed", request_id=job.id)
    body: dict[str, Any] = {"status": job.status.value, "request_id": job.id}
    if job.status == JobStatus.QUEUED:
        body["queue_position"] = services.store.queue_position(job)
    elif job.status == JobStatus.PROCESSING:
        body["progress"] = round(job.progress, 4)
    return body


def result_body(services: Services, job: Job, base: str) -> dict[str, Any]:
    if job.status == JobStatus.FAILED:
        raise JobFailed(job.error or "failed", request_id=job.id)
    body: dict[str, Any] = {
        "status": job.status.value,
        "request_id": job.id,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "parameters": job.params,
    }
    if job.status != JobStatus.COMPLETED:
        return body
    result = job.result
    count = len(result["outputs"])
    if job.base64:
        outputs = [base64.b64encode(read_output(services, job, i)).decode() for i in range(count)]
    else:
        outputs = [output_url(base, job, i) for i in range(count)]
    started = job.started_at or job.created_at
    body.update(
        output=outputs[0],
        outputs=outputs,
        seeds=result["seeds"],
        width=result["width"],
        height=result["height"],
        completed_at=iso(job.finished_at),
        expires_at=iso(job.expires_at),
        metrics={
            "inference_time": round(result["inference_time"], 4),
            "queue_time": round(started - job.created_at, 4),
            "total_time": round((job.finished_at or started) - job.created_at, 4),
        },
        prompts={"positive": result["positive_prompts"], "negative": result["negative_prompts"]},
        styles=result["styles"],
        notes=result.get("notes", {}),
        working_size=result.get("working_size"),
    )
    return body
