"""The input stage: URL inputs are fetched, decoded and checked ahead of the worker.

A job given by URL is queued at once and becomes ready to run only when its image is stored, so a
slow or dead URL delays its own job and never the worker or the jobs behind it. Runs as asyncio
tasks in the API process; a restart picks up the jobs still waiting for their input.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.concurrency import run_in_threadpool

from server.guard.images import ImageLimits, InputImageError, check_canvas, decode_image, fetch_async
from server.jobs.contract import FailureKind, Job
from server.jobs.store import JobStore, StoreError

log = logging.getLogger("beyond.inputs")
CONCURRENT_FETCHES = 8


class InputStage:
    def __init__(self, store: JobStore, limits: ImageLimits) -> None:
        self.store = store
        self.limits = limits
        self._slots = asyncio.Semaphore(CONCURRENT_FETCHES)
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        for job in self.store.awaiting_input():
            self.submit(job)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def submit(self, job: Job) -> None:
        task = asyncio.get_running_loop().create_task(self._prepare(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check(self, job: Job, data: bytes) -> None:
        image = decode_image(data, self.limits)
        check_canvas(job.params.canvas_size(*image.size), self.limits)

    async def _prepare(self, job: Job) -> None:
        assert job.source.url is not None
        async with self._slots:
            try:
                data = await fetch_async(job.source.url, self.limits)
                await run_in_threadpool(self._check, job, data)
            except InputImageError as exc:
                await run_in_threadpool(self.store.fail, job.id, str(exc), FailureKind.INPUT)
                return
            except Exception:
                log.exception("fetching the input of %s failed", job.id)
                await run_in_threadpool(
                    self.store.fail, job.id, "input_image: the URL could not be fetched", FailureKind.INPUT
                )
                return
            try:
                await run_in_threadpool(self.store.attach_input, job.id, data)
            except StoreError as exc:
                log.error("could not store the input of %s: %s", job.id, exc)
                await run_in_threadpool(
                    self.store.fail, job.id, "the server could not keep the input", FailureKind.ENGINE
                )
