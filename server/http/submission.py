"""The write side: a validated request becomes a queued job (or a clear refusal), and v1 waits for it."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from models.seeds import draw_seed
from server.guard.auth import Caller
from server.guard.images import InputImageError, check_canvas, check_url, decode_base64, decode_image, is_url
from server.http.deps import Services, disk_problem
from server.http.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    InsufficientCredits,
    InsufficientStorage,
    NotFound,
    RateLimited,
)
from server.http.schemas import SegBeyondRequest
from server.jobs.contract import Delivery, ImageSource, Job, JobParams, from_units, to_units
from server.jobs.registry import unavailable_reason
from server.jobs.store import InsufficientBalance, QueueFull, StoreError

log = logging.getLogger("beyond.submission")
# How often a v1 waiter that nothing woke reads its job again (an event from another node can be lost
# while Redis reconnects) and looks at the clock for its deadline.
IDLE_WAKE = 5.0


def _prepare_input(
    body: SegBeyondRequest, params: JobParams, services: Services
) -> tuple[ImageSource, bytes | None, tuple[int, int] | None]:
    """Check the image now (a bad one is a 400); URLs are fetched by the input stage."""
    value = body.input_image
    try:
        if is_url(value):
            check_url(value.strip(), services.limits)
            return ImageSource(url=value.strip()), None, None
        data = decode_base64(value, services.limits)
        size = decode_image(data, services.limits).size
        check_canvas(params.canvas_size(*size), services.limits)
        return ImageSource(), data, size
    except InputImageError as exc:
        raise BadRequest(str(exc)) from None


def _check_webhook(delivery: Delivery, services: Services) -> None:
    """The webhook URL passes the same guard as input_image URLs (and again at each delivery attempt)."""
    if delivery.webhook_url is None:
        return
    if services.webhooks is None:
        raise BadRequest("webhook_url: webhooks are not enabled on this server (it has no BEYOND_WEBHOOK_SECRET)")
    try:
        check_url(delivery.webhook_url, services.limits)
    except InputImageError as exc:
        raise BadRequest("webhook_url: " + str(exc).split(": ", 1)[-1]) from None


async def submit(
    body: SegBeyondRequest,
    services: Services,
    caller: Caller | None = None,
    base_url: str | None = None,
    *,
    sync: bool = False,
) -> Job:
    """Queue a request; `base_url` is the public base the client reached us at (for webhook bodies).

    `sync` (v1): with no engine ready (it failed to load, or its worker is down or restarting) the
    request is refused with a 502 at once, rather than left to a wait the client cannot see the end of.
    """
    # A seed of -1 is drawn now, so a retried job and the stored record use the same seed.
    params = body.job_params(services.styles, body.seed if body.seed != -1 else draw_seed())
    delivery = body.delivery(base_url)
    # Every check that reads the store or the disk, and the write, in one trip to a thread.
    job = await run_in_threadpool(_accept, body, params, delivery, services, caller, sync)
    if delivery.webhook_url is not None and services.webhooks is not None:
        services.webhooks.track(job)
    if not job.input_ready:
        services.inputs.submit(job)
    log.info(
        "accepted request %s",
        job.id,
        extra={"event": "accepted", "request_id": job.id, "caller": caller.name if caller else None},
    )
    return job


def _accept(
    body: SegBeyondRequest,
    params: JobParams,
    delivery: Delivery,
    services: Services,
    caller: Caller | None,
    sync: bool,
) -> Job:
    max_queue = services.settings.max_queue
    queue_full = RateLimited(
        f"the queue is full ({max_queue} requests waiting); try again shortly", headers={"Retry-After": "5"}
    )
    if sync:
        # On an API node without a worker of its own, any live worker the registry knows of will do.
        try:
            reason = unavailable_reason(services.workers.workers())
        except StoreError as exc:
            reason = str(exc)
        if reason:
            raise BadGateway(f"the engine is not available: {reason}")
    # Checked first so a full server does not decode images it will refuse (and exactly, below).
    if services.store.queued_count() >= max_queue:
        raise queue_full
    if disk_problem(services.settings):
        raise InsufficientStorage("the server's disk is full; try again later")
    _check_webhook(delivery, services)
    source, image, image_size = _prepare_input(body, params, services)
    metered = caller is not None and caller.credits is not None
    try:
        return services.store.create(
            params,
            source,
            image=image,
            base64=body.base64,
            owner=caller.owner if caller else None,
            cost=request_cost(params, image_size) if metered else 0,
            max_queued=max_queue,
            delivery=delivery,
        )
    except QueueFull:
        raise queue_full from None
    except InsufficientBalance as exc:
        raise InsufficientCredits(
            f"insufficient credits: this request costs {from_units(exc.cost):g},"
            f" the balance is {from_units(exc.balance):g}"
        ) from None


# An input given by URL is only fetched after submission; its size is taken to be SDXL's native one.
URL_INPUT_SIZE = (1024, 1024)


def request_cost(params: JobParams, image_size: tuple[int, int] | None) -> int:
    """Credit units: samples x steps / 30 x max(1, megapixels of the output canvas), so a default
    request (1 sample, 30 steps) on a canvas up to 1 MP costs 1 credit.

    The price follows the work: the 1 is the denoising, which runs at most on the model's native
    area whatever the canvas's shape (models/canvas.py working_size); a canvas past 1 MP adds the
    work done at its full size (pre-fill, resizing back, paste-back, encoding)."""
    width, height = params.canvas_size(*(image_size or URL_INPUT_SIZE))
    megapixels = max(1.0, width * height / 1e6)
    return to_units(params.samples * params.steps / 30 * megapixels)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read by then, so only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_finished(services: Services, job_id: str, request: Request | None = None) -> Job:
    """Wait for a job to end, woken by the store. If the client goes away first, or
    BEYOND_SYNC_TIMEOUT passes, the job is cancelled so no GPU time is spent on an answer nobody reads."""
    deadline = time.monotonic() + services.settings.sync_timeout
    gone = asyncio.ensure_future(_disconnected(request)) if request is not None else None
    try:
        with services.store.events.watch(job_id, ends_only=True) as watch:
            while True:
                watch.clear()
                # The end of a job finished in this process comes with its event. Anything else that wakes
                # this watch may have ended it (as may the idle look), and so may what happened before the
                # watch began: the store is read then.
                if watch.outcome is not None:
                    return watch.outcome
                state = services.store.state(job_id)
                if state is None:
                    raise NotFound(f"request {job_id!r} not found")
                if state.finished:
                    job = services.store.get(job_id)
                    if job is None:
                        raise NotFound(f"request {job_id!r} not found")
                    return job
                left = deadline - time.monotonic()
                if left <= 0:
                    await run_in_threadpool(services.store.request_cancel, job_id)
                    raise GatewayTimeout(
                        f"not done within {services.settings.sync_timeout:g} s; the request was cancelled",
                        headers={"x-request-id": job_id},
                    )
                changed = asyncio.ensure_future(watch.wait(min(left, IDLE_WAKE)))
                waiting = {changed} if gone is None else {changed, gone}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if gone is not None and gone.done():
                    changed.cancel()
                    log.info("v1 client of %s went away: cancelling it", job_id, extra={"request_id": job_id})
                    await run_in_threadpool(services.store.request_cancel, job_id)
                    gone = None
    finally:
        if gone is not None:
            gone.cancel()
