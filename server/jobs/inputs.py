"""The input stage: URL inputs are fetched, decoded and checked ahead of the worker.

A job given by URL is queued at once and becomes ready to run only when its image is stored, so a
slow or dead URL delays its own job and never the worker or the jobs behind it. Runs as asyncio
tasks in the API process; a restart picks up the jobs still waiting for their input.

Each input is fetched by one node at a time: a node leases a job's fetch from the store before it
starts (`JobStore.lease_input`). On a store shared by several API nodes the lease lasts
BEYOND_RECLAIM_AFTER and is held longer while the fetch goes on, and every node looks at the jobs
still waiting for their input every half of that: a fetch whose node died is taken over once its
lease has run out, and a node that starts or restarts while another fetches an input leaves it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from starlette.concurrency import run_in_threadpool

from server.guard.images import ImageLimits, InputImageError, check_canvas, decode_image, fetch_async
from server.jobs.contract import FailureKind, Job
from server.jobs.store import JobStore, StoreError
from server.logs import RateLimitedLog

log = logging.getLogger("beyond.inputs")
CONCURRENT_FETCHES = 8


class InputStage:
    def __init__(self, store: JobStore, limits: ImageLimits) -> None:
        self.store = store
        self.limits = limits
        self._slots = asyncio.Semaphore(CONCURRENT_FETCHES)
        self._tasks: set[asyncio.Task] = set()
        self._fetching: set[str] = set()  # the jobs this node's tasks are on
        self._errors = RateLimitedLog(log)

    def start(self) -> None:
        for job in self.store.awaiting_input():
            self.submit(job)
        if self.store.reclaim_after is not None:  # other nodes fetch too: take over what a dead one left
            self._spawn(self._take_over(self.store.reclaim_after / 2))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def submit(self, job: Job) -> None:
        if job.id in self._fetching:
            return
        self._fetching.add(job.id)
        task = self._spawn(self._prepare(job))
        task.add_done_callback(lambda _: self._fetching.discard(job.id))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _take_over(self, every: float) -> None:
        """The jobs still waiting for their input, now and then: those whose fetch has no live node."""
        while True:
            await asyncio.sleep(every)
            try:
                waiting = await run_in_threadpool(self.store.awaiting_input)
            except StoreError as exc:
                self._errors.error("could not list the inputs still to fetch: %s", exc)
                continue
            for job in waiting:
                self.submit(job)

    async def _hold(self, job_id: str, every: float) -> None:
        """The fetch's lease, held longer while the fetch goes on."""
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(StoreError):  # the lease runs out and another node may fetch too
                await run_in_threadpool(self.store.lease_input, job_id)

    def _check(self, job: Job, data: bytes) -> None:
        image = decode_image(data, self.limits)
        check_canvas(job.params.canvas_size(*image.size), self.limits)

    async def _prepare(self, job: Job) -> None:
        async with self._slots:
            try:
                if not await run_in_threadpool(self.store.lease_input, job.id):
                    return  # another node fetches it, or it no longer waits for its input
            except StoreError as exc:
                self._errors.error("could not take the fetch of %s's input: %s", job.id, exc)
                return  # looked at again by the next pass over the waiting jobs (or the next start)
            reclaim_after = self.store.reclaim_after
            hold = self._spawn(self._hold(job.id, reclaim_after / 3)) if reclaim_after is not None else None
            try:
                await self._fetch(job)
            finally:
                if hold is not None:
                    hold.cancel()

    async def _fetch(self, job: Job) -> None:
        assert job.source.url is not None
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
            await run_in_threadpool(self.store.fail, job.id, "the server could not keep the input", FailureKind.ENGINE)
