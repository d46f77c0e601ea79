"""The in-process store tests run on both stores: `Stores` opens stores of one kind on one backing
(a folder for SQLite, a key prefix on a real redis-server), so a test can also "restart" its store."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import redis

from server.jobs.contract import FailureKind, ImageSource, Job, JobParams, JobResult, JobStatus, to_units
from server.jobs.lifecycle import MAX_ATTEMPTS, Event, Guard, Stage, stage_of
from server.jobs.redis_store import RedisJobStore
from server.jobs.sqlite_store import SqliteJobStore
from server.jobs.store import JobStore
from tests.helpers import sqlite_files
from tests.redis_helpers import RedisServer

KINDS = ["sqlite", "redis"]


class Stores:
    def __init__(self, kind: str, folder: Path, server: RedisServer | None = None) -> None:
        self.kind, self.folder, self.server = kind, folder, server
        self.prefix = f"t{uuid.uuid4().hex[:12]}:"  # tests share a redis-server, never its keys
        self.opened: list[Any] = []

    def open(self, **options: Any) -> JobStore:
        store: Any
        if self.kind == "sqlite":
            store = SqliteJobStore(self.folder, **options)
        else:
            assert self.server is not None
            store = RedisJobStore(self.server.url, prefix=self.prefix, **options)
        self.opened.append(store)
        return store

    def stored_inputs(self) -> int:
        """How many jobs have files kept (a refused submission must leave none)."""
        if self.kind == "sqlite":
            return len(sqlite_files(self.folder))
        assert self.server is not None
        client = redis.Redis.from_url(self.server.url)
        try:
            return sum(1 for _ in client.scan_iter(f"{self.prefix}files:*"))
        finally:
            client.close()

    def close(self) -> None:
        for store in self.opened:
            if isinstance(store, RedisJobStore):
                store.close()


# -- driving a store through the lifecycle (server/jobs/lifecycle.py) ---------------------------------

OWNER, OTHER = "a" * 64, "b" * 64
RESULT = JobResult(outputs=("output-0.jpg",), seeds=(7,), width=2, height=2, working_size=(2, 2), inference_time=0.5)
INPUT, FETCHED, OUTPUT = b"input", b"fetched", b"\xff\xd8output"
FILE_NAMES = ("input", "output-0.jpg")
COST = to_units(1.0)  # what each lifecycle test's job costs its owner, who has an account
TTL = 60.0
DIED = "the worker process died (exit code -9)"
UNKNOWN = "0" * 32  # the id of no job


def queue(store: JobStore, seed: int = 0, owner: str | None = OWNER, url: str | None = None, **kw: object) -> Job:
    image = None if url else b"input-%d" % seed
    return store.create(
        JobParams(prompt="x", seed=seed), ImageSource(url=url), image=image, base64=True, owner=owner, **kw
    )


def submit(store: JobStore, when: Guard = Guard.WITH_IMAGE) -> Job:
    url = "http://127.0.0.1:9/in.png" if when == Guard.WITH_URL else None
    image = None if url else INPUT
    return store.create(JobParams(prompt="x"), ImageSource(url=url), image=image, base64=True, owner=OWNER, cost=COST)


def drive(store: JobStore, stage: Stage, when: Guard = Guard.ALWAYS) -> Job | None:
    """A job of OWNER's, charged COST, brought to `stage` the way the lifecycle brings one there. For
    LAST_ATTEMPT (or `when` is about to need it), its worker died under it MAX_ATTEMPTS - 1 times first."""
    if stage == Stage.ABSENT:
        return None
    job = submit(store, Guard.WITH_URL if stage == Stage.AWAITING_INPUT else Guard.WITH_IMAGE)
    if stage in (Stage.AWAITING_INPUT, Stage.QUEUED):
        return store.get(job.id)
    for _ in range(MAX_ATTEMPTS - 1 if when == Guard.LAST_ATTEMPT else 0):
        died = store.claim_next()
        assert died.id == job.id
        assert store.release(job.id, DIED, died.attempts) == JobStatus.QUEUED
    claimed = store.claim_next()
    assert claimed.id == job.id
    # Some progress, so that what resets it shows (PROGRESS applies to a claimed job too).
    assert store.set_progress(job.id, claimed.attempts, 0.25) is False
    if stage != Stage.CLAIMED:
        assert store.mark_started(job.id, claimed.attempts) is False
    if stage == Stage.CANCELLING:
        store.request_cancel(job.id)
    elif stage == Stage.COMPLETED:
        assert store.complete(job.id, claimed.attempts, RESULT, {"output-0.jpg": OUTPUT})
    elif stage == Stage.FAILED:
        assert store.fail(job.id, "boom", FailureKind.ENGINE, claimed.attempts)
    job = store.get(job.id)
    assert stage_of(job) == stage, f"could not bring a job to {stage.value}"
    return job


def apply(
    store: JobStore,
    event: Event,
    job: Job | None,
    *,
    kind: FailureKind = FailureKind.ENGINE,
    when: Guard = Guard.ALWAYS,
    attempt: int | None = None,
) -> Any:
    """The event, by the store method that says so, on `job` (its current attempt unless `attempt`);
    what the method answers."""
    job_id = UNKNOWN if job is None else job.id
    attempt = (0 if job is None else job.attempts) if attempt is None else attempt
    if event == Event.SUBMIT:
        return submit(store, when)
    if event == Event.ATTACH_INPUT:
        return store.attach_input(job_id, FETCHED)
    if event == Event.CLAIM:
        return store.claim_next()
    if event == Event.START:
        return store.mark_started(job_id, attempt)
    if event == Event.PROGRESS:
        return store.set_progress(job_id, attempt, 0.5)
    if event == Event.COMPLETE:
        return store.complete(job_id, attempt, RESULT, {"output-0.jpg": OUTPUT})
    if event == Event.FAIL:
        return store.fail(job_id, "boom", kind, attempt)
    if event == Event.ABORT:
        return store.fail(job_id, "boom", kind)
    if event == Event.CANCEL:
        return store.request_cancel(job_id)
    if event == Event.WORKER_DIED:
        return store.release(job_id, DIED, attempt)
    if event == Event.HAND_BACK:
        return store.hand_back(job_id, attempt)
    assert event == Event.EXPIRE
    # Past any retention this test's jobs can have: only a job that never expires stays.
    return store.purge_expired(time.time() + TTL + 60)


def refused_answer(event: Event, job: Job | None) -> Any:
    """What a store method answers for an event with no row for the job's stage (see lifecycle.Event)."""
    if event == Event.CANCEL:
        return job
    if event == Event.WORKER_DIED:
        return JobStatus.FAILED if job is None else job.status
    return {
        Event.ATTACH_INPUT: False,
        Event.CLAIM: None,
        Event.START: True,
        Event.PROGRESS: True,
        Event.COMPLETE: False,
        Event.FAIL: False,
        Event.ABORT: False,
        Event.HAND_BACK: False,
        Event.EXPIRE: 0,
    }[event]


def files_of(store: JobStore, job_id: str) -> dict[str, bytes]:
    return {name: store.read_file(job_id, name) for name in FILE_NAMES if store.has_file(job_id, name)}
