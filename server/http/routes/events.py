"""GET /v2/requests/{id}/events: a request's progress as a server-sent event stream.

Events: `status` (data: the body GET .../status answers) whenever what that body says changes, then one
`result` (data: the body GET /v2/requests/{id} answers, the 422 body for a FAILED request), then the end.

A stream costs nothing while its job stands still: it waits for its job's own changes, which the store
announces, and, while the job waits in the queue, for the queue to move, which one look at the queue per
second tells all such streams of this process at once (`QueueLook`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from server.guard.auth import CallerDep, owner_of
from server.http.deps import Services, ServicesDep, public_base
from server.http.errors import ApiError
from server.http.results import find, find_state, result_body, status_body
from server.http.routes.responses import READ
from server.http.schemas import Body, ErrorBody, FailedBody, ResultResponse, StatusResponse
from server.jobs.contract import Job, JobState, JobStatus
from server.jobs.events import Watch
from server.jobs.store import JobStore

router = APIRouter(prefix="/v2")
log = logging.getLogger("beyond.events")

QUEUE_LOOK = 1.0  # how often the queue is looked at for the streams of waiting jobs (one look for all)
WAKE_SLICE = 32  # waiting streams woken per turn of the event loop when the queue moved
WAIT = 30.0  # longest wait in one next_change call; nothing is sent when it passes unchanged
PING = 15  # seconds between keep-alive comments, so proxies do not drop a quiet stream


class QueueLook:
    """The streams of this process whose job waits in the queue, and one look at the queue for all of them.

    A waiting job's position moves when a job ahead of it starts, ends or is put back: changes of other
    jobs, which its own watch does not hear of. Each stream re-reading its job every second would cost a
    thousand streams a thousand reads a second, and their wake-ups, while the queue stands still. Instead
    one task looks every QUEUE_LOOK: how many jobs wait ahead of the last watched job (every move ahead of a
    watched job changes that count, except a job put back while another starts), and the store's count of
    changes that end a job or put one back (`JobEvents.settled`, which covers that exception). When either
    moved, every waiting stream reads its job again, a slice per turn of the event loop, so that the other
    requests are answered in between. A look that fails wakes them all: each meets the error on its own.
    """

    def __init__(self) -> None:
        self.waiting: dict[Watch, int] = {}  # a waiting stream's watch -> its job's seq
        self._task: asyncio.Task | None = None
        self._waking: set[asyncio.Task] = set()  # held until done (the loop keeps only weak references)
        self._mark: tuple[int, int, int] | None = None  # (a seq, jobs waiting below it, settled), at the last look

    @contextlib.contextmanager
    def join(self, store: JobStore, watch: Watch, seq: int) -> Iterator[None]:
        """Wakes `watch` whenever the queue may have moved, from the next look on: its stream reads its job
        after joining, so a move before the look's mark is in that read and any later one is looked for."""
        self.waiting[watch] = seq
        try:
            if self._mark is None or seq > self._mark[0]:
                self._look_now(store)  # the mark must count the jobs ahead of this one from now on
            loop = asyncio.get_running_loop()
            if self._task is None or self._task.done() or self._task.get_loop() is not loop:
                self._task = loop.create_task(self._run(store))
            yield
        finally:
            self.waiting.pop(watch, None)

    async def _run(self, store: JobStore) -> None:
        while self.waiting:
            await asyncio.sleep(QUEUE_LOOK)
            if self.waiting:
                self._look_now(store)
        self._mark = None

    def _look_now(self, store: JobStore) -> None:
        try:
            moved = self._moved(store)
        except Exception:  # the store failed (or went): the streams read it themselves and end as they must
            log.debug("queue look failed", exc_info=True)
            self._mark, moved = None, True
        if moved:
            task = asyncio.get_running_loop().create_task(self._wake(list(self.waiting)))
            self._waking.add(task)
            task.add_done_callback(self._waking.discard)

    def _moved(self, store: JobStore) -> bool:
        """Whether the queue moved since the last look; marks it anew at the last waiting job."""
        settled = store.events.settled  # read first: a change after this one is seen at the next look
        last = max(self.waiting.values())
        moved, below = False, None
        if self._mark is not None:
            seq, counted, seen = self._mark
            now = store.queue_position(seq)
            moved = now != counted or settled != seen
            if seq == last:
                below = now
        if below is None:
            below = store.queue_position(last)
        self._mark = (last, below, settled)
        return moved

    async def _wake(self, watches: list[Watch]) -> None:
        for start in range(0, len(watches), WAKE_SLICE):
            if start:
                await asyncio.sleep(0)  # a turn of the loop: its sockets are served before the next slice
            loop = asyncio.get_running_loop()
            for watch in watches[start : start + WAKE_SLICE]:
                if watch.loop is loop:
                    watch.set_here()
                else:  # a stream served by another loop
                    watch.set()


# One per store, made when its first stream waits in the queue; it goes with the store.
_looks: weakref.WeakKeyDictionary[JobStore, QueueLook] = weakref.WeakKeyDictionary()


def queue_look(store: JobStore) -> QueueLook:
    look = _looks.get(store)
    if look is None:
        look = _looks[store] = QueueLook()
    return look


def waiting(job: JobState | Job) -> bool:
    """Still waiting its turn (queued, or handed to the worker and not started): its position can move."""
    return job.status == JobStatus.QUEUED or (job.status == JobStatus.PROCESSING and not job.started)


def seen(body: StatusResponse) -> tuple:
    """A status body as a comparable value: two bodies that read the same to a client compare equal."""
    return tuple(sorted(body.data().items()))


def _visible(services: Services, job_id: str) -> tuple[JobState | Job | None, StatusResponse | None]:
    """The job and its status body; (None, None) once it is gone (expired), (job, None) once it has ended."""
    try:
        job = find_state(services, job_id)
    except ApiError:
        return None, None
    return job, None if job.finished else status_body(services, job)


async def next_change(services: Services, job_id: str, last: tuple, timeout: float) -> StatusResponse | None:
    """The job's status body once what a client sees of it differs from `last` (see `seen`), or when `timeout`
    passes; None once it has ended or is gone (expired). The store wakes it on every change of the job itself,
    and the queue's look (`QueueLook`) while it waits in the queue."""
    deadline = time.monotonic() + timeout
    store = services.store
    with store.events.watch(job_id) as watch, contextlib.ExitStack() as in_queue:
        joined = False
        while True:
            watch.clear()
            job, body = _visible(services, job_id)
            left = deadline - time.monotonic()
            if body is None or seen(body) != last or left <= 0:
                return body
            if not joined and job is not None and waiting(job):
                in_queue.enter_context(queue_look(store).join(store, watch, job.seq))
                joined = True
                continue  # read again, now that moves of the queue wake it
            await watch.wait(left)


def final_body(services: Services, job_id: str, base: str) -> Body:
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
        body = None if job is None or job.finished else status_body(services, job)
        while body is not None:
            if (now := seen(body)) != last:
                last = now
                # json.dumps' default form (spaces, ASCII escapes), as the stream has always sent it.
                yield ServerSentEvent(data=json.dumps(body.data()), event="status")
            body = await next_change(services, job_id, last, WAIT)
        result = await run_in_threadpool(final_body, services, job_id, base)
        yield ServerSentEvent(data=json.dumps(result.data()), event="result")
    finally:
        # Reached on the last event and when the client goes away (the generator is cancelled then).
        log.info("events stream for %s closed", job_id, extra={"event": "events_closed", "request_id": job_id})


def _component(model: type[Body]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _event(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """One kind of event as OpenAPI 3.1 describes a text/event-stream item: its fields, the data as JSON."""
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"const": name},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
        },
    }


# The result is what GET /v2/requests/{id} answers: its 200 body, the FAILED 422 one, or the 404 once expired.
EVENT = {
    "oneOf": [
        _event("status", _component(StatusResponse)),
        _event("result", {"anyOf": [_component(m) for m in (ResultResponse, FailedBody, ErrorBody)]}),
    ]
}


@router.get(
    "/requests/{request_id}/events",
    operation_id="get_events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": EVENT}},
            "description": "`status` events, then one `result`, then the end of the stream",
        },
        # A FAILED request is a `result` event of the stream, not a 422.
        **{code: answer for code, answer in READ.items() if code != 422},
    },
    summary="A request's progress as server-sent events",
)
async def get_events(
    request_id: str, request: Request, services: ServicesDep, caller: CallerDep
) -> EventSourceResponse:
    """Server-sent events: `status` (the status body) on every change a client would see, then `result`
    (the body GET /v2/requests/{id} answers, also for FAILED), then the stream ends."""
    job = find_state(services, request_id, owner_of(caller))  # a 404 here comes before any stream starts
    base = public_base(request, services.settings)
    return EventSourceResponse(progress_events(services, job, request_id, base), ping=PING)
