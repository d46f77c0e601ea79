"""The relay: jobs that carry a webhook_url become outbox deliveries when they end.

It hears every job's end through the store's change notifications and settles it on an asyncio task; a job
that ended while the process was down is found by the scan at each start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from server.jobs.contract import Job
from server.jobs.events import Watch
from server.jobs.store import JobStore, StoreError
from server.webhooks.dispatch import WebhookDispatcher, in_thread
from server.webhooks.outbox import Outbox

log = logging.getLogger("beyond.webhooks")

# A store read that failed is tried again after this long; the outbox is purged this often.
RETRY_SETTLE = 5.0
PURGE_EVERY = 600.0
# Outbox rows outlive their jobs by this much, so the start-up scan never finds a job whose row was purged.
KEEP_AFTER_EXPIRY = 3600.0


class Webhooks:
    """The server's webhooks: jobs that carry a webhook_url become outbox deliveries when they end.

    One place hears every job's end, whichever path ends it (worker, cancel, input stage, worker death): the
    store's change notifications, filtered to the jobs tracked here, then settled by an asyncio task (store
    reads and outbox writes on threads, never on the event loop or the supervisor's thread). A job that ended
    while the process was down, or between its end and its enqueue, is found by the scan at each start.

    On a shared outbox (a fleet on Redis) every node may settle any job, once: the outbox lists the live jobs
    tracked anywhere (`watch`), and each node looks through that list every `outbox.poll` seconds for jobs
    that ended with nobody to settle them (their accepting node died or was scaled away).
    `render(job)` makes the body: the JSON GET /v2/requests/{id} answers for the job.
    """

    def __init__(
        self,
        store: JobStore,
        outbox: Outbox,
        dispatcher: WebhookDispatcher,
        render: Callable[[Job], bytes],
        *,
        keep: float,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.dispatcher = dispatcher
        self.render = render
        self.keep = keep  # seconds an outbox row is kept (the jobs' result TTL and a margin)
        self._lock = threading.Lock()
        self._tracked: set[str] = set()
        self._watched: set[str] = set()  # tracked jobs this node has listed in the outbox
        self._unsettled: set[str] = set()  # jobs the last sweep found ended and not queued
        self._pending: set[str] = set()
        self._wake: Watch | None = None
        self._runner: asyncio.Task[None] | None = None

    def track(self, job: Job) -> None:
        """A job just submitted with a webhook_url: its end is to be delivered."""
        with self._lock:
            self._tracked.add(job.id)
        self._poke(job.id)  # it may have ended already (cancelled at once, say)

    def status(self, job_id: str) -> dict[str, Any]:
        """How delivery went, for the result body (blocking: call it off the event loop)."""
        found = self.outbox.status(job_id)
        return found or {"delivered": False, "attempts": 0, "last_status": None, "error": None}

    def _changed(self, job_id: str) -> None:
        # Runs in the store writer's thread at every change (progress included): only a set lookup here.
        with self._lock:
            if job_id not in self._tracked:
                return
        self._poke(job_id)

    def _poke(self, job_id: str) -> None:
        with self._lock:
            self._pending.add(job_id)
        wake = self._wake
        if wake is not None:  # none, or its loop closed: the next start's scan settles it
            wake.set()

    async def start(self) -> None:
        if self._runner is not None:
            return
        self._wake = Watch()
        self.store.events.on_change(self._changed)
        await self.dispatcher.start()
        self._runner = asyncio.create_task(self._run(), name="webhook-relay")

    async def stop(self) -> None:
        """Stop relaying and delivering; what is left is picked up by the next start."""
        self.store.events.remove_on_change(self._changed)
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
            self._runner = None
        await self.dispatcher.stop()
        self._wake = None
        self.outbox.close()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await in_thread(self._recover)
                break
            except Exception:
                log.exception("webhook start-up scan failed; trying again in %g s", RETRY_SETTLE)
                await asyncio.sleep(RETRY_SETTLE)
        self._wake.set()  # jobs tracked before the loop ran
        purged = swept = time.monotonic()
        poll = self.outbox.poll
        while True:
            await self._wake.wait(PURGE_EVERY if poll is None else min(poll, PURGE_EVERY))
            self._wake.clear()
            with self._lock:
                pending, self._pending = self._pending, set()
            for job_id in sorted(pending):
                try:
                    await in_thread(self._settle, job_id)
                except Exception as exc:
                    level = logging.WARNING if isinstance(exc, StoreError) else logging.ERROR
                    log.log(level, "webhook for job %s not queued yet (%s); trying again", job_id, type(exc).__name__)
                    self._wake.loop.call_later(RETRY_SETTLE, self._poke, job_id)
            if poll is not None and time.monotonic() - swept >= poll:
                swept = time.monotonic()
                try:
                    await in_thread(self._sweep)
                except Exception as exc:
                    log.warning("webhook sweep of the fleet's live jobs failed (%s); trying again", type(exc).__name__)
            if time.monotonic() - purged > PURGE_EVERY:
                purged = time.monotonic()
                with contextlib.suppress(Exception):
                    await in_thread(self.outbox.purge, time.time() - self.keep)

    def _recover(self) -> None:
        """At start: deliveries for jobs that ended without one; the live jobs tracked again."""
        queued = tracked = 0
        for job in self.store.webhook_jobs():
            if job.finished:
                if self.outbox.status(job.id) is None:
                    log.info("queueing the webhook of job %s, which ended without one", job.id)
                    self._enqueue(job)
                    queued += 1
            else:
                self.track(job)
                tracked += 1
        log.info("webhook start-up scan done: %d queued, %d live jobs tracked", queued, tracked)

    def _settle(self, job_id: str) -> None:
        state = self.store.state(job_id)
        if state is not None and not state.finished:
            # Still live (the change was progress): listed once for the fleet, in case this node goes away.
            with self._lock:
                listed = job_id in self._watched
            if not listed:
                self.outbox.watch(job_id)
                with self._lock:
                    self._watched.add(job_id)
            return
        job = self.store.get(job_id) if state is not None else None
        if job is not None and job.delivery.webhook_url:
            self._enqueue(job)
        else:
            self.outbox.unwatch(job_id)
        with self._lock:
            self._tracked.discard(job_id)
            self._watched.discard(job_id)

    def _sweep(self) -> None:
        """The fleet's live jobs that ended with nobody to settle them: their accepting node is gone.

        A job is taken only when two sweeps in a row find it ended and not queued: a live node settles its
        own jobs well within one poll of their end, so this node does not render their bodies as well."""
        with self._lock:
            tracked = set(self._tracked)
        unsettled: set[str] = set()
        for job_id in self.outbox.watched():
            if job_id in tracked:
                continue  # this node hears its end itself
            state = self.store.state(job_id)
            if state is None:
                self.outbox.unwatch(job_id)  # expired, or gone with a Redis that lost it
            elif not state.finished:
                continue
            elif self.outbox.status(job_id) is not None:
                self.outbox.unwatch(job_id)  # queued meanwhile
            elif job_id not in self._unsettled:
                unsettled.add(job_id)  # its node may be settling it right now: next time
            elif (job := self.store.get(job_id)) is not None and job.delivery.webhook_url:
                log.info("queueing the webhook of job %s, which ended with no node to queue it", job_id)
                self._enqueue(job)
            else:
                self.outbox.unwatch(job_id)
        self._unsettled = unsettled

    def _enqueue(self, job: Job) -> None:
        assert job.delivery.webhook_url is not None
        if self.outbox.status(job.id) is not None:
            self.outbox.unwatch(job.id)  # queued already (by another node, on a shared outbox): nothing to render
            return
        # The webhook-id follows from the job, so a delivery queued twice still dedupes at the receiver.
        self.outbox.enqueue(job.id, job.delivery.webhook_url, self.render(job), msg_id=f"msg_{job.id}")
