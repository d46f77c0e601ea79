"""The request path's hand-overs, in-process on a real store: what a v1 waiter reads, and who sends a
new job to an idle worker."""

from __future__ import annotations

import asyncio
import threading
import time
from multiprocessing import Pipe
from pathlib import Path
from types import SimpleNamespace

import pytest

import server.http.submission as submission
from server.jobs.contract import ImageSource, Job, JobParams, JobResult, JobStatus
from server.jobs.messages import RunJob
from server.jobs.sqlite_store import SqliteJobStore
from server.jobs.supervisor import Supervisor, WorkerStatus
from tests.helpers import tiny_worker_config

RESULT = JobResult(outputs=("output-0.jpg",), seeds=(1,), width=8, height=8, working_size=(8, 8), inference_time=0.1)
FILES = {"output-0.jpg": b"\xff\xd8 not really a jpeg"}


class CountingStore(SqliteJobStore):
    """Counts the reads the v1 waiter may make."""

    reads = 0

    def state(self, job_id: str):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().state(job_id)

    def get(self, job_id: str) -> Job | None:
        self.reads += 1
        return super().get(job_id)


def queue_one(store: SqliteJobStore) -> Job:
    store.create(JobParams(prompt="x"), ImageSource(), image=b"input", base64=False, owner=None)
    job = store.claim_next()
    assert job is not None
    return job


def wait_for(store: SqliteJobStore, job_id: str) -> Job:
    services = SimpleNamespace(settings=SimpleNamespace(sync_timeout=30.0), store=store)
    return asyncio.run(asyncio.wait_for(submission.wait_finished(services, job_id), 20))  # type: ignore[arg-type]


def later(action, delay: float = 0.2) -> threading.Thread:  # type: ignore[no-untyped-def]
    def run() -> None:
        time.sleep(delay)
        action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_job_finished_in_this_process_reaches_its_waiter_without_a_store_read(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    job = queue_one(store)

    def run_it() -> None:
        for step in range(1, 21):
            store.set_progress(job.id, job.attempts, step / 20)
            time.sleep(0.01)  # each step wakes the waiter on its own
        store.complete(job.id, job.attempts, RESULT, FILES)

    thread = later(run_it)
    finished = wait_for(store, job.id)
    thread.join()
    # The one read when it began waiting; none for the 20 steps, none for the end.
    assert store.reads == 1
    assert (finished.status, finished.result) == (JobStatus.COMPLETED, RESULT)
    assert finished == store.get(job.id)


def test_a_v1_waiter_is_woken_by_its_jobs_end_only(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    job = store.create(JobParams(prompt="x"), ImageSource(), image=b"input", base64=False, owner=None)

    def run_it() -> None:
        claimed = store.claim_next()
        assert claimed is not None
        store.mark_started(job.id, claimed.attempts)
        for step in range(1, 21):
            store.set_progress(job.id, claimed.attempts, step / 20)
            time.sleep(0.01)
        store.complete(job.id, claimed.attempts, RESULT, FILES)

    thread = later(run_it)
    finished = wait_for(store, job.id)
    thread.join()
    # Being claimed, starting and moving on do not end a job: its waiter reads nothing for them.
    assert store.reads == 1
    assert finished.status == JobStatus.COMPLETED


def test_an_end_written_elsewhere_is_read_when_its_event_comes(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    job = queue_one(store)
    elsewhere = SqliteJobStore(tmp_path)  # another writer, whose events this process does not share

    def finish_elsewhere() -> None:
        elsewhere.complete(job.id, job.attempts, RESULT, FILES)
        store.events.job_changed(job.id)  # as Redis's listener passes on another node's change

    thread = later(finish_elsewhere)
    finished = wait_for(store, job.id)
    thread.join()
    assert (finished.status, finished.result) == (JobStatus.COMPLETED, RESULT)


def test_an_end_whose_event_was_lost_is_found_by_the_idle_look(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(submission, "IDLE_WAKE", 0.3)
    store = SqliteJobStore(tmp_path)
    job = queue_one(store)
    elsewhere = SqliteJobStore(tmp_path)
    thread = later(lambda: elsewhere.complete(job.id, job.attempts, RESULT, FILES))  # no event at all
    started = time.monotonic()
    finished = wait_for(store, job.id)
    thread.join()
    assert finished.status == JobStatus.COMPLETED
    assert time.monotonic() - started < 5


def idle_supervisor(tmp_path: Path) -> tuple[SqliteJobStore, Supervisor, object]:
    """A supervisor whose loop is not running, with a ready worker at the other end of a pipe."""
    store = SqliteJobStore(tmp_path)
    supervisor = Supervisor(store, tiny_worker_config())
    parent, child = Pipe()
    supervisor._conn = parent
    supervisor.status.state = WorkerStatus.READY
    return store, supervisor, child


def test_a_new_job_goes_to_an_idle_worker_from_the_submitting_thread(tmp_path: Path) -> None:
    store, supervisor, worker = idle_supervisor(tmp_path)
    job = store.create(JobParams(prompt="x"), ImageSource(), image=b"input", base64=False, owner=None)
    # Sent before create() returned, by this thread: no wait for the supervisor's own thread.
    assert worker.poll(0)  # type: ignore[attr-defined]
    message = worker.recv()  # type: ignore[attr-defined]
    assert isinstance(message, RunJob)
    assert (message.job_id, message.attempt, message.image) == (job.id, 1, b"input")
    assert supervisor.status.in_flight == {job.id: 1}
    assert store.state(job.id).status == JobStatus.PROCESSING


def test_a_busy_supervisor_is_woken_instead(tmp_path: Path) -> None:
    store, supervisor, worker = idle_supervisor(tmp_path)
    with supervisor._lock:  # its loop handles a message meanwhile
        job = store.create(JobParams(prompt="x"), ImageSource(), image=b"input", base64=False, owner=None)
    assert not worker.poll(0.1)  # type: ignore[attr-defined]
    assert supervisor._wake_r.recv(16)  # its loop is woken, and claims the job itself
    assert store.state(job.id).status == JobStatus.QUEUED
