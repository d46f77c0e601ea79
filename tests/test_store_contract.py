"""The JobStore contract, on both stores: every row of the lifecycle table (server/jobs/lifecycle.py) and
every event it has no row for, every method of server/jobs/store.py, and the Redis store's own guarantees
(delivery across nodes, reclaim of a dead worker's job, a Redis restart, Redis down)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from server.jobs import redis_scripts
from server.jobs.codec import job_fields, job_from_fields
from server.jobs.contract import Delivery, FailureKind, ImageSource, Job, JobParams, JobStatus, to_units
from server.jobs.lifecycle import (
    CANCELLED_ERROR,
    FENCED,
    GAVE_UP,
    LIFECYCLE,
    Credits,
    Event,
    Files,
    Guard,
    Progress,
    Retention,
    Stage,
    Started,
    Transition,
    stage_of,
    transitions,
)
from server.jobs.redis_store import RedisJobStore
from server.jobs.sqlite_store import INLINE_MAX
from server.jobs.store import (
    MAX_ATTEMPTS,
    DiskFull,
    FileGone,
    InsufficientBalance,
    JobStore,
    QueueFull,
    StoreUnavailable,
)
from tests.helpers import sqlite_files
from tests.redis_helpers import RedisServer
from tests.store_helpers import (
    COST,
    DIED,
    FETCHED,
    INPUT,
    OTHER,
    OUTPUT,
    OWNER,
    RESULT,
    TTL,
    UNKNOWN,
    Stores,
    apply,
    drive,
    files_of,
    queue,
    refused_answer,
)


def start_next(store: JobStore) -> Job:
    """Claim the next job and start it, as a worker does when it begins denoising."""
    job = store.claim_next()
    assert job is not None
    store.mark_started(job.id, job.attempts)
    return job


@pytest.fixture
def store(stores: Stores) -> JobStore:
    return stores.open()


# -- the lifecycle table: every row, and every event without one -----------------------------------

BALANCE = to_units(10.0)


def cases() -> list[tuple[Transition, FailureKind | None]]:
    """Each row; each failure kind an event can end a job with, once (on the first row that has it: the
    stores keep whichever kind they are given, so once shows it kept)."""
    done: set[tuple[Event, FailureKind]] = set()
    found: list[tuple[Transition, FailureKind | None]] = []
    for row in LIFECYCLE:
        new = [kind for kind in row.kinds if (row.event, kind) not in done]
        done.update((row.event, kind) for kind in new)
        found += [(row, kind) for kind in new or row.kinds[:1] or (None,)]
    return found


CASES = cases()
# What each method answers when an event applies (START and PROGRESS: the row's `stop`).
ANSWERS = {
    Event.ATTACH_INPUT: True,
    Event.COMPLETE: True,
    Event.FAIL: True,
    Event.ABORT: True,
    Event.HAND_BACK: True,
    Event.EXPIRE: 1,  # jobs removed
}


def case_id(case: object) -> str:
    if isinstance(case, Transition):
        return str(case)
    return "" if case is None else case.value  # type: ignore[attr-defined]


def check_effects(
    store: JobStore,
    row: Transition,
    before: Job | None,
    after: Job | None,
    kind: FailureKind | None,
    balance: int,
    files: dict[str, bytes],
    reason: str = DIED,
) -> None:
    """`after` is `before` moved by `row`: in its target stage, with each effect the row names and no other
    change. `balance` and `files` are the owner's balance and the job's files before."""
    assert stage_of(after) == row.target
    charged = {Credits.KEEP: 0, Credits.CHARGE: COST, Credits.REFUND: -COST}[row.credits]
    assert balance - store.balance(OWNER) == charged, "credits"
    job_id = (after or before).id  # type: ignore[union-attr]
    expected = {
        Files.KEEP: files,
        Files.INPUT: {**files, "input": FETCHED if row.event == Event.ATTACH_INPUT else INPUT},
        Files.OUTPUTS: {**files, "output-0.jpg": OUTPUT},
        Files.DELETE: {},
    }[row.files]
    assert files_of(store, job_id) == expected, "files"
    if after is None:  # its retention is over: gone for every reader
        assert row.retention == Retention.END and store.state(job_id) is None
        assert job_id not in {job.id for job in store.list_jobs(OWNER)}
        return
    # A new job starts from nothing: what it was submitted with, no attempt, no progress, no times.
    base = before or replace(
        after, attempts=0, progress=0.0, started_at=None, finished_at=None, expires_at=None, cancel_requested=False
    )
    if before is None:
        assert (after.owner, after.cost, after.error, after.result) == (OWNER, COST, None, None)
    assert after.attempts == base.attempts + row.attempts, "attempts"
    progress = {Progress.KEEP: base.progress, Progress.RESET: 0.0, Progress.REPORTED: 0.5, Progress.DONE: 1.0}
    assert after.progress == progress[row.progress], "progress"
    if row.started == Started.SET:
        assert after.started_at is not None and after.started_at >= (base.started_at or 0), "started_at"
    else:
        assert after.started_at == (None if row.started == Started.CLEAR else base.started_at), "started_at"
    if row.retention == Retention.START:
        assert after.finished_at is not None and after.expires_at == pytest.approx(after.finished_at + TTL)
    else:
        assert (after.finished_at, after.expires_at) == (base.finished_at, base.expires_at), "retention"
    assert after.cancel_requested == (base.cancel_requested or row.cancel_requested), "cancel_requested"
    if row.kinds:
        assert kind is not None and after.error_kind == kind.value
        errors = {Event.CANCEL: CANCELLED_ERROR, Event.WORKER_DIED: GAVE_UP % (reason, base.attempts)}
        if kind == FailureKind.CANCELLED and row.event == Event.WORKER_DIED:
            errors[Event.WORKER_DIED] = CANCELLED_ERROR
        assert after.error == errors.get(row.event, "boom")
    else:
        assert (after.error, after.error_kind) == (base.error, base.error_kind), "error"
    assert after.result == (RESULT if row.event == Event.COMPLETE else base.result), "result"
    unchanged = ("id", "seq", "params", "source", "base64", "owner", "created_at", "cost", "delivery")
    assert [getattr(after, name) for name in unchanged] == [getattr(base, name) for name in unchanged]


@pytest.mark.parametrize(("row", "kind"), CASES, ids=case_id)
def test_each_row_of_the_lifecycle(stores: Stores, row: Transition, kind: FailureKind | None) -> None:
    store = stores.open(ttl=TTL)
    store.open_account(OWNER, BALANCE)
    before = drive(store, row.source, row.when)
    later = queue(store, owner=None)  # submitted after it
    balance, files = store.balance(OWNER), {} if before is None else files_of(store, before.id)
    answer = apply(store, row.event, before, kind=kind or FailureKind.ENGINE, when=row.when)
    after = store.get(answer.id if row.event == Event.SUBMIT else before.id)  # type: ignore[union-attr]
    check_effects(store, row, before, after, kind, balance, files)
    if row.event in (Event.SUBMIT, Event.CLAIM, Event.CANCEL):
        assert answer == after
    elif row.event == Event.WORKER_DIED:
        assert answer == row.target.status
    else:
        assert answer == (row.stop if row.event in (Event.START, Event.PROGRESS) else ANSWERS[row.event])
    if row.keeps_place:
        assert [store.claim_next().id for _ in range(2)] == [after.id, later.id]  # type: ignore[union-attr]


# Each stage, with each event that has no row for it (a submission makes a new job: it has no stage).
REFUSALS = [
    (stage, event) for stage in Stage for event in Event if event != Event.SUBMIT and not transitions(event, stage)
]


@pytest.mark.parametrize(("stage", "event"), REFUSALS, ids=lambda value: value.value)
def test_an_event_with_no_row_for_the_stage_changes_nothing(stores: Stores, stage: Stage, event: Event) -> None:
    store = stores.open(ttl=TTL)
    store.open_account(OWNER, BALANCE)
    before = drive(store, stage)
    balance, files = store.balance(OWNER), {} if before is None else files_of(store, before.id)
    answer = apply(store, event, before)
    assert answer == refused_answer(event, before)
    if before is not None:
        assert store.get(before.id) == before and files_of(store, before.id) == files
    assert store.balance(OWNER) == balance


@pytest.mark.parametrize("event", sorted(FENCED), ids=lambda event: event.value)
@pytest.mark.parametrize("stage", [Stage.CLAIMED, Stage.RUNNING, Stage.CANCELLING], ids=lambda stage: stage.value)
def test_a_write_of_an_earlier_attempt_changes_nothing(stores: Stores, stage: Stage, event: Event) -> None:
    store = stores.open(ttl=TTL)
    store.open_account(OWNER, BALANCE)
    before = drive(store, stage, Guard.LAST_ATTEMPT)
    assert before is not None and before.attempts == 2
    balance, files = store.balance(OWNER), files_of(store, before.id)
    answer = apply(store, event, before, attempt=1)  # its first worker, back late
    assert answer == refused_answer(event, before)
    assert store.get(before.id) == before and files_of(store, before.id) == files and store.balance(OWNER) == balance


def test_a_refused_result_leaves_none_of_its_files(stores: Stores) -> None:
    """Files too large for SQLite's database go to the job's folder: only with the write that accepts them."""
    store = stores.open(ttl=TTL)
    large = {"output-0.jpg": b"L" * (INLINE_MAX + 1)}
    stale = drive(store, Stage.RUNNING, Guard.LAST_ATTEMPT)
    finished = drive(store, Stage.FAILED)
    assert not store.complete(stale.id, stale.attempts - 1, RESULT, large)
    assert not store.complete(finished.id, finished.attempts, RESULT, large)
    assert files_of(store, stale.id) == files_of(store, finished.id) == {"input": INPUT}
    assert store.complete(stale.id, stale.attempts, RESULT, large) and files_of(store, stale.id)["output-0.jpg"]


def test_the_lifecycle_table_is_whole_and_consistent() -> None:
    rows = [(t.event, t.source, t.when) for t in LIFECYCLE]
    assert len(rows) == len(set(rows)), "two rows for one event on one stage"
    finished = (Stage.COMPLETED, Stage.FAILED)
    for t in LIFECYCLE:
        if t.when in (Guard.RETRIES_LEFT, Guard.LAST_ATTEMPT):  # a worker death always does something
            assert {r.when for r in transitions(t.event, t.source)} == {Guard.RETRIES_LEFT, Guard.LAST_ATTEMPT}
        ends = t.target in finished and t.source not in finished
        assert (t.retention == Retention.START) == ends, t
        assert (t.credits == Credits.REFUND) == (ends and t.target == Stage.FAILED), t
        assert bool(t.kinds) == (ends and t.target == Stage.FAILED), t
        assert t.source not in finished or t.event == Event.EXPIRE, t  # a finished job never changes again
        assert (t.stop is not None) == (t.event in (Event.START, Event.PROGRESS)), t
    reached, frontier = {Stage.ABSENT}, [Stage.ABSENT]
    while frontier:
        stage = frontier.pop()
        for t in LIFECYCLE:
            if t.source == stage and t.target not in reached:
                reached.add(t.target)
                frontier.append(t.target)
    assert reached == set(Stage)


def test_the_lua_scripts_take_statuses_and_failure_kinds_from_the_contract() -> None:
    for name, source in redis_scripts.SCRIPTS.items():
        body = source.replace(redis_scripts.HEADER, "")
        assert redis_scripts.HEADER in source and len(body) < len(source)
        for value in (*JobStatus, *FailureKind):
            assert f"'{value.value}'" not in body and f'"{value.value}"' not in body, (name, value)
    for status in JobStatus:
        assert f"local {status.name} = '{status.value}'\n" in redis_scripts.HEADER
    for kind in FailureKind:
        assert f"local KIND_{kind.name} = '{kind.value}'\n" in redis_scripts.HEADER


def test_the_codec_reads_back_every_field_of_a_job_in_either_stores_form() -> None:
    job = Job(
        id="f" * 32,
        seq=12,
        status=JobStatus.FAILED,
        params=JobParams(prompt="p", styles=("Enhance",), seed=5, left=8),
        source=ImageSource(url="http://127.0.0.1:9/in.png"),
        base64=True,
        owner=OWNER,
        created_at=1.25,
        started_at=2.5,
        finished_at=3.75,
        attempts=2,
        progress=0.5,
        error="boom",
        error_kind=FailureKind.ENGINE.value,
        cancel_requested=True,
        expires_at=63.75,
        input_ready=False,
        cost=COST,
        delivery=Delivery(output_format="png", webhook_url="http://127.0.0.1:9/hook"),
        result=RESULT,
    )
    fields = job_fields(job)
    assert set(fields) == {field.name for field in dataclass_fields(Job)}
    assert job_from_fields(fields) == job  # SQLite's typed values
    as_redis = {name: (repr(v) if isinstance(v, float) else str(v)).encode() for name, v in fields.items()}
    assert job_from_fields(as_redis) == job  # Redis's bytes
    unset = job_fields(replace(job, owner=None, started_at=None, error=None, error_kind=None, result=None))
    assert not {"owner", "started_at", "error", "error_kind", "result"} & set(unset)
    assert job_from_fields(unset) == replace(job, owner=None, started_at=None, error=None, error_kind=None, result=None)


# -- submission and the read side ------------------------------------------------------------------


def test_a_created_job_reads_back_whole(store: JobStore) -> None:
    job = queue(store, seed=3)
    assert job.status == JobStatus.QUEUED and job.input_ready and job.attempts == 0
    again = store.get(job.id)
    assert again == job
    state = store.state(job.id)
    assert (state.id, state.seq, state.status, state.owner) == (job.id, job.seq, JobStatus.QUEUED, OWNER)
    assert store.read_file(job.id, "input") == b"input-3"
    assert store.get("0" * 32) is None and store.state("0" * 32) is None


def test_claims_are_first_in_first_out_and_each_job_is_claimed_once(store: JobStore) -> None:
    jobs = [queue(store, seed=i) for i in range(4)]
    assert [j.seq for j in jobs] == sorted(j.seq for j in jobs)
    claimed = [store.claim_next() for _ in range(4)]
    assert [j.id for j in claimed] == [j.id for j in jobs]
    assert all(j.status == JobStatus.PROCESSING and j.attempts == 1 for j in claimed)
    assert store.claim_next() is None
    assert [j.id for j in store.processing()] == [j.id for j in jobs]


def test_keep_alive_names_the_held_jobs_that_attempt_no_longer_holds(store: JobStore) -> None:
    jobs = [queue(store, seed=i) for i in range(3)]
    held = {job.id: job.attempts for job in (store.claim_next(), store.claim_next())}
    assert store.keep_alive({}) == set() and store.keep_alive(held) == set()
    store.request_cancel(jobs[1].id)  # not started: it ends at once
    assert store.keep_alive(held) == {jobs[1].id}
    assert store.keep_alive({jobs[0].id: 2, jobs[2].id: 1}) == {jobs[0].id, jobs[2].id}  # old attempt; not claimed
    store.complete(jobs[0].id, 1, RESULT, {})
    assert store.keep_alive(held) == set(held)


def test_queue_position_counts_the_queued_jobs_ahead(store: JobStore) -> None:
    jobs = [queue(store, seed=i) for i in range(3)]
    assert [store.queue_position(j.seq) for j in jobs] == [0, 1, 2]
    claimed = store.claim_next()
    # Handed to a worker ahead of its turn, a job still waits: it counts until it starts.
    assert store.state(claimed.id).started is False and store.queued_count() == 3
    store.mark_started(claimed.id, claimed.attempts)
    assert [store.queue_position(j.seq) for j in jobs[1:]] == [0, 1]
    assert store.queued_count() == 2 and store.state(claimed.id).started is True


def test_the_queue_bound_is_exact_under_concurrency(store: JobStore) -> None:
    def attempt(i: int) -> bool:
        try:
            queue(store, seed=i, max_queued=5)
            return True
        except QueueFull:
            return False

    with ThreadPoolExecutor(8) as pool:
        accepted = list(pool.map(attempt, range(24)))
    assert sum(accepted) == 5 and store.queued_count() == 5


def test_concurrent_charges_never_overdraw(store: JobStore) -> None:
    store.open_account(OWNER, to_units(10.0))

    def attempt(i: int) -> bool:
        try:
            queue(store, seed=i, cost=to_units(1.0))
            return True
        except InsufficientBalance:
            return False

    with ThreadPoolExecutor(8) as pool:
        accepted = list(pool.map(attempt, range(25)))
    assert sum(accepted) == 10 and store.balance(OWNER) == 0


def test_list_jobs_by_owner_newest_first_with_status_and_paging(store: JobStore) -> None:
    mine = [queue(store, seed=i) for i in range(5)]
    queue(store, owner=OTHER)
    anonymous = queue(store, owner=None)
    store.claim_next()  # mine[0] runs
    assert [j.id for j in store.list_jobs(OWNER)] == [j.id for j in reversed(mine)]
    assert [j.id for j in store.list_jobs(None)] == [anonymous.id]
    assert [j.id for j in store.list_jobs(OWNER, limit=2)] == [mine[4].id, mine[3].id]
    assert [j.id for j in store.list_jobs(OWNER, limit=2, before=mine[3].seq)] == [mine[2].id, mine[1].id]
    assert [j.id for j in store.list_jobs(OWNER, status=JobStatus.PROCESSING)] == [mine[0].id]
    assert store.list_jobs("c" * 64) == []


# -- files ------------------------------------------------------------------------------------------


def test_files_beside_a_job(store: JobStore) -> None:
    job = queue(store)
    store.put_file(job.id, "preview.jpg", b"\xff\xd8preview")
    assert store.read_file(job.id, "preview.jpg") == b"\xff\xd8preview"
    with pytest.raises(FileGone):
        store.read_file(job.id, "output-0.jpg")
    store.put_file("0" * 32, "preview.jpg", b"x")  # no such job: nothing kept, no error
    with pytest.raises(FileGone):
        store.read_file("0" * 32, "preview.jpg")
    claimed = store.claim_next()
    binary = bytes(range(256)) * 64
    assert store.complete(job.id, claimed.attempts, RESULT, {"output-0.jpg": binary})
    assert store.read_file(job.id, "output-0.jpg") == binary


def test_small_and_large_files_read_back_whole_and_the_newest_write_wins(stores: Stores) -> None:
    store = stores.open(ttl=0.3)
    small, large = b"\xff\xd8small", bytes(range(256)) * (INLINE_MAX // 256 + 1)
    job = store.create(JobParams(prompt="x"), ImageSource(), image=large, base64=False, owner=None)
    assert store.read_file(job.id, "input") == large
    for data in (small, large, small):
        store.put_file(job.id, "preview.jpg", data)
        assert store.read_file(job.id, "preview.jpg") == data and store.has_file(job.id, "preview.jpg")
    claimed = store.claim_next()
    outputs = {"output-0.png": large, "output-1.png": small}
    assert store.complete(job.id, claimed.attempts, RESULT, outputs)
    assert all(store.read_file(job.id, name) == data for name, data in outputs.items())
    time.sleep(0.4)
    assert store.purge_expired() == 1
    for name in ("input", "preview.jpg", *outputs):
        assert not store.has_file(job.id, name)
        with pytest.raises(FileGone):
            store.read_file(job.id, name)


def test_sqlite_keeps_small_files_in_its_database_and_large_ones_in_job_folders(tmp_path: Path) -> None:
    store = Stores("sqlite", tmp_path).open(ttl=0.3)
    small = queue(store, seed=1)
    large = store.create(JobParams(prompt="x"), ImageSource(), image=b"L" * (INLINE_MAX + 1), base64=False, owner=None)
    folders = {p.name for p in (tmp_path / "jobs").iterdir() if p.is_dir()}
    assert folders == {large.id}  # a small request costs no folder and no file
    assert sqlite_files(tmp_path) == {small.id: {"input"}, large.id: {"input"}}
    for _ in range(2):
        claimed = store.claim_next()
        assert store.complete(claimed.id, claimed.attempts, RESULT, {"output-0.jpg": b"jpg"})
    assert sqlite_files(tmp_path) == {job.id: {"input", "output-0.jpg"} for job in (small, large)}
    time.sleep(0.4)
    assert store.purge_expired() == 2
    assert sqlite_files(tmp_path) == {} and not [p for p in (tmp_path / "jobs").iterdir() if p.is_dir()]


def test_sqlite_reads_the_job_folders_of_an_older_release_and_drops_rows_without_a_job(tmp_path: Path) -> None:
    store = Stores("sqlite", tmp_path).open()
    job = queue(store)
    # An older release kept every file in the job's folder.
    (tmp_path / "jobs" / job.id).mkdir()
    (tmp_path / "jobs" / job.id / "output-0.jpg").write_bytes(b"old")
    assert store.read_file(job.id, "output-0.jpg") == b"old" and store.has_file(job.id, "output-0.jpg")
    with contextlib.closing(sqlite3.connect(tmp_path / "jobs.sqlite3")) as db, db:
        db.execute("INSERT INTO files (job_id, name, data) VALUES ('0123abcd', 'input', x'00')")
    Stores("sqlite", tmp_path).open()  # a restart
    assert set(sqlite_files(tmp_path)) == {job.id}


# -- the worker side: fencing, release and retry -------------------------------------------------------


def test_writes_are_fenced_by_attempt(store: JobStore) -> None:
    job = queue(store)
    assert store.claim_next().attempts == 1
    assert store.release(job.id, "the worker process died", 1) == JobStatus.QUEUED
    assert store.claim_next().attempts == 2
    # The first attempt's worker, late: changes nothing, and is told to stop.
    assert store.release(job.id, "the worker process died", 1) == JobStatus.PROCESSING
    assert store.set_progress(job.id, 1, 0.9) is True
    assert store.complete(job.id, 1, RESULT, {}) is False
    assert store.fail(job.id, "late", FailureKind.ENGINE, 1) is False
    assert store.get(job.id).status == JobStatus.PROCESSING
    assert store.set_progress(job.id, 2, 0.5) is False
    assert store.mark_started(job.id, 1) is True  # the late worker, starting: told to stop
    assert store.mark_started(job.id, 2) is False
    running = store.get(job.id)
    assert running.progress == 0.5 and running.started_at is not None
    assert store.complete(job.id, 2, RESULT, {"output-0.jpg": b"jpg"}) is True
    # Finished twice: stored once.
    assert store.complete(job.id, 2, RESULT, {}) is False
    assert store.fail(job.id, "too late", FailureKind.ENGINE) is False
    done = store.get(job.id)
    assert done.status == JobStatus.COMPLETED and done.result == RESULT and done.progress == 1.0
    assert done.expires_at is not None and done.finished_at is not None
    assert store.processing() == [] and store.claim_next() is None


def test_a_released_job_keeps_its_place_and_the_second_death_fails_it(store: JobStore) -> None:
    first, second = queue(store, seed=1), queue(store, seed=2)
    store.open_account(OWNER, 0)
    assert store.claim_next().id == first.id
    assert store.release(first.id, "the worker process died (exit code -9)", 1) == JobStatus.QUEUED
    assert store.get(first.id).status == JobStatus.QUEUED and store.queue_position(second.seq) == 1
    again = store.claim_next()
    assert again.id == first.id and again.attempts == MAX_ATTEMPTS
    assert store.release(first.id, "the worker process died (exit code -9)", 2) == JobStatus.FAILED
    failed = store.get(first.id)
    assert failed.error == "the worker process died (exit code -9) while running this job, 2 times; giving up"
    assert failed.error_kind == FailureKind.WORKER_DIED.value
    # Releasing what is not running changes nothing.
    assert store.release(first.id, "again", 2) == JobStatus.FAILED
    assert store.release(second.id, "not running", 0) == JobStatus.QUEUED
    assert store.release("0" * 32, "unknown", 1) == JobStatus.FAILED
    assert store.claim_next().id == second.id


@pytest.mark.parametrize("stage", [Stage.CLAIMED, Stage.RUNNING], ids=lambda stage: stage.value)
def test_a_job_handed_back_on_its_last_attempt_is_queued_not_given_up(store: JobStore, stage: Stage) -> None:
    """A graceful stop is no death: a job whose worker died once, claimed again (waiting, or running) by a
    worker that is then stopped, goes back queued with its last attempt still to come (released, it would fail)."""
    job = drive(store, stage, Guard.LAST_ATTEMPT)
    assert job.attempts == MAX_ATTEMPTS
    assert store.hand_back(job.id, job.attempts) is True
    back = store.get(job.id)
    assert (back.status, back.attempts, back.error) == (JobStatus.QUEUED, MAX_ATTEMPTS - 1, None)
    assert store.claim_next().attempts == MAX_ATTEMPTS


def test_cancel(store: JobStore) -> None:
    store.open_account(OWNER, to_units(5.0))
    waiting, running = queue(store, seed=1, cost=to_units(1.0)), queue(store, seed=2, cost=to_units(1.0))
    start_next(store)  # `waiting` runs first: cancel it while it runs
    cancelled = store.request_cancel(running.id)  # queued: ends at once
    assert cancelled.status == JobStatus.FAILED and cancelled.cancelled and cancelled.cancel_requested
    assert store.balance(OWNER) == to_units(4.0)
    flagged = store.request_cancel(waiting.id)
    assert flagged.status == JobStatus.PROCESSING and flagged.cancel_requested
    assert store.set_progress(waiting.id, 1, 0.3) is True  # the worker is told at its next step
    # Its worker dies before it stops: the job ends cancelled, not retried.
    assert store.release(waiting.id, "the worker process died", 1) == JobStatus.FAILED
    assert store.get(waiting.id).cancelled and store.balance(OWNER) == to_units(5.0)
    assert store.request_cancel("0" * 32) is None
    assert store.claim_next() is None


def test_sqlite_a_cancel_between_releases_read_and_its_write_ends_the_job_cancelled(tmp_path: Path) -> None:
    """SQLite's release reads the job, then writes: a client's cancel landing in between must not be lost with
    the job queued again (Redis decides it in one script)."""
    store = Stores("sqlite", tmp_path).open()
    store.open_account(OWNER, to_units(5.0))
    job = queue(store, cost=to_units(1.0))
    start_next(store)
    read = store.get

    def read_then_cancel(job_id: str) -> Job | None:
        seen = read(job_id)
        del store.get  # once: the store's own get from here on
        store.request_cancel(job_id)
        return seen

    store.get = read_then_cancel
    assert store.release(job.id, "the worker process died", 1) == JobStatus.FAILED
    ended = store.get(job.id)
    assert ended.status == JobStatus.FAILED and ended.cancelled and store.balance(OWNER) == to_units(5.0)
    assert store.claim_next() is None


def test_a_job_claimed_but_not_started_is_cancelled_at_once(store: JobStore) -> None:
    job = queue(store)
    claimed = store.claim_next()
    cancelled = store.request_cancel(job.id)
    assert cancelled.status == JobStatus.FAILED and cancelled.cancelled
    # Its worker, starting it late, is told to stop; the ended job stays as it is.
    assert store.mark_started(job.id, claimed.attempts) is True
    assert store.get(job.id).started_at is None


def test_starting_a_job_whose_cancel_was_asked_says_stop(store: JobStore) -> None:
    job = queue(store)
    claimed = store.claim_next()
    assert store.mark_started(job.id, claimed.attempts) is False
    assert store.request_cancel(job.id).cancel_requested
    assert store.mark_started(job.id, claimed.attempts) is True


def test_url_jobs_wait_for_their_input(store: JobStore) -> None:
    url_job = queue(store, url="http://127.0.0.1:9/in.png")
    assert not url_job.input_ready and store.claim_next() is None
    assert [j.id for j in store.awaiting_input()] == [url_job.id]
    assert store.queued_count() == 1
    assert store.attach_input(url_job.id, b"fetched") is True
    assert store.awaiting_input() == []
    claimed = store.claim_next()
    assert claimed.id == url_job.id and store.read_file(url_job.id, "input") == b"fetched"
    gone = queue(store, url="http://127.0.0.1:9/other.png")
    store.request_cancel(gone.id)
    assert store.attach_input(gone.id, b"late") is False and store.claim_next() is None


def test_a_url_job_is_fetched_while_it_waits_for_its_input(store: JobStore) -> None:
    url_job = queue(store, url="http://127.0.0.1:9/in.png")
    assert store.lease_input(url_job.id) is True
    assert store.lease_input(url_job.id) is True  # asked again by its node: held longer
    store.attach_input(url_job.id, FETCHED)
    assert store.lease_input(url_job.id) is False  # stored: nothing left to fetch
    gone = queue(store, url="http://127.0.0.1:9/other.png")
    store.request_cancel(gone.id)
    assert store.lease_input(gone.id) is False
    assert store.lease_input(queue(store).id) is False  # its image came with it
    assert store.lease_input(UNKNOWN) is False


# -- expiry, events, health ---------------------------------------------------------------------------------


def test_finished_jobs_expire_with_their_files(stores: Stores) -> None:
    store = stores.open(ttl=0.6)
    live, done = queue(store, seed=1, owner=OTHER), queue(store, seed=2, owner=OTHER)
    store.claim_next()
    store.claim_next()
    store.complete(done.id, 1, RESULT, {"output-0.jpg": b"jpg"})
    assert store.purge_expired() == 0 and store.get(done.id) is not None
    time.sleep(0.8)
    assert store.get(done.id) is None and store.state(done.id) is None
    assert [j.id for j in store.list_jobs(OTHER)] == [live.id]  # the live job never expires
    assert store.purge_expired() == 1 and store.purge_expired() == 0
    with pytest.raises(FileGone):
        store.read_file(done.id, "output-0.jpg")
    assert store.get(live.id).status == JobStatus.PROCESSING
    # purge_expired(now) with a time ahead: what will have expired by then goes now.
    store.fail(live.id, "boom", FailureKind.ENGINE)
    assert store.purge_expired(time.time() + 5) == 1 and store.get(live.id) is None


def test_the_store_wakes_its_waiters(store: JobStore) -> None:
    woken = threading.Event()
    store.events.on_work(woken.set)
    job = queue(store)
    assert woken.wait(2)

    async def wait_for_change() -> bool:
        with store.events.watch(job.id) as watch:
            watch.clear()
            threading.Timer(0.1, store.request_cancel, (job.id,)).start()
            return await watch.wait(5)

    assert asyncio.run(wait_for_change())


async def woken_while_it_runs(watching: JobStore, running: JobStore, job: Job) -> tuple[bool, bool, bool]:
    """Whether a watch on `watching`'s events is woken while `running` claims, starts and moves `job` on
    (one watch waiting only for its end, one for any change), then whether the end-only one is by its end."""
    with watching.events.watch(job.id, ends_only=True) as end, watching.events.watch(job.id) as any_change:
        claimed = start_next(running)
        running.set_progress(job.id, claimed.attempts, 0.5)
        changed = await any_change.wait(5)
        early = await end.wait(0.5)
        running.complete(job.id, claimed.attempts, RESULT, {"output-0.jpg": b"jpg"})
        return early, changed, await end.wait(5)


def test_a_watch_for_the_end_is_not_woken_while_the_job_runs(store: JobStore) -> None:
    job = queue(store)
    early, changed, ended = asyncio.run(woken_while_it_runs(store, store, job))
    assert changed and not early and ended


def test_a_job_ended_here_is_handed_to_its_waiters_as_it_ended(store: JobStore) -> None:
    done, failed = queue(store, seed=1), queue(store, seed=2)

    async def outcome(job: Job, end: Callable[[Job], object]) -> Job | None:
        with store.events.watch(job.id, ends_only=True) as watch:
            end(start_next(store))
            await watch.wait(5)
            return watch.outcome

    completed = asyncio.run(outcome(done, lambda j: store.complete(j.id, j.attempts, RESULT, {"output-0.jpg": b"j"})))
    assert completed is not None and completed.status == JobStatus.COMPLETED and completed.result == RESULT
    assert completed == store.get(done.id)
    gone = asyncio.run(outcome(failed, lambda j: store.fail(j.id, "boom", FailureKind.ENGINE, j.attempts)))
    assert gone is not None and (gone.status, gone.error) == (JobStatus.FAILED, "boom")
    assert gone == store.get(failed.id)


def test_health_says_none_when_the_store_works(store: JobStore) -> None:
    assert store.health() is None


def test_a_deleted_sqlite_store_is_unavailable(tmp_path: Path) -> None:
    store = Stores("sqlite", tmp_path).open()
    (tmp_path / "jobs.sqlite3").unlink()
    assert "deleted" in store.health()
    with pytest.raises(StoreUnavailable):
        queue(store)


# -- Redis only: several nodes on one Redis --------------------------------------------------------------------


@pytest.fixture
def nodes(redis_server: RedisServer, tmp_path: Path):
    """Stores that stand for separate nodes: one Redis, one key prefix, each its own consumer name."""
    made = Stores("redis", tmp_path, redis_server)

    def node(**options: object) -> RedisJobStore:
        return made.open(**options)  # type: ignore[return-value]

    try:
        yield node
    finally:
        made.close()


def test_each_job_goes_to_one_node_in_order(nodes) -> None:
    a, b = nodes(), nodes()
    jobs = [queue(a, seed=i) for i in range(6)]
    taken = [store.claim_next() for store in (a, b, b, a, b, a)]
    assert [j.id for j in taken] == [j.id for j in jobs]
    assert a.claim_next() is None and b.claim_next() is None
    assert {j.id for j in a.processing()} == {jobs[0].id, jobs[3].id, jobs[5].id}


def test_another_nodes_writes_wake_this_nodes_waiters(nodes) -> None:
    api, worker = nodes(), nodes()
    woken = threading.Event()
    worker.events.on_work(woken.set)
    job = queue(api)
    assert woken.wait(5), "the worker's node was not told of the new job"

    async def wait_for_end() -> JobStatus:
        with api.events.watch(job.id) as watch:
            watch.clear()
            claimed = worker.claim_next()
            worker.complete(job.id, claimed.attempts, RESULT, {"output-0.jpg": b"jpg"})
            assert await watch.wait(5), "the API's node was not told the job finished"
            return api.state(job.id).status

    assert asyncio.run(wait_for_end()) == JobStatus.COMPLETED
    assert api.read_file(job.id, "output-0.jpg") == b"jpg"  # any node serves any result


def test_another_nodes_running_job_does_not_wake_a_watch_for_its_end(nodes) -> None:
    api, worker = nodes(), nodes()
    job = queue(api)
    early, changed, ended = asyncio.run(woken_while_it_runs(api, worker, job))
    assert changed, "the API's node was not told of the other node's progress at all"
    assert not early and ended


def test_a_cancel_asked_on_one_node_reaches_the_worker_on_another(nodes) -> None:
    api, worker = nodes(), nodes()
    job = queue(api)
    claimed = start_next(worker)
    assert worker.set_progress(job.id, claimed.attempts, 0.1) is False
    api.request_cancel(job.id)
    assert worker.set_progress(job.id, claimed.attempts, 0.2) is True


def test_one_node_at_a_time_fetches_a_url_input_and_another_takes_over_after_its_lease(nodes) -> None:
    a, b = nodes(reclaim_after=0.4), nodes(reclaim_after=0.4)
    job = queue(a, url="http://127.0.0.1:9/in.png")
    assert a.lease_input(job.id) is True and b.lease_input(job.id) is False
    time.sleep(0.25)
    assert a.lease_input(job.id) is True  # held longer while its fetch goes on
    time.sleep(0.25)
    assert b.lease_input(job.id) is False  # past the first lease, but it was held longer
    # Its node restarted under the same consumer name: the fetch is its own again at once.
    restarted = nodes(reclaim_after=0.4, consumer=a.consumer)
    assert restarted.lease_input(job.id) is True
    time.sleep(0.5)  # then it dies too: its lease runs out and another node takes the fetch over
    assert b.lease_input(job.id) is True and a.lease_input(job.id) is False
    assert b.attach_input(job.id, FETCHED) is True
    assert a.lease_input(job.id) is False and b.lease_input(job.id) is False
    assert b.redis.exists(f"{b.prefix}fetch:{job.id}") == 0  # the lease goes with the fetch


def test_a_silent_workers_job_is_reclaimed_then_failed_after_the_second_death(nodes) -> None:
    api, first, second, third = nodes(), nodes(reclaim_after=0.3), nodes(reclaim_after=0.3), nodes(reclaim_after=0.3)
    api.open_account(OWNER, to_units(3.0))
    job = queue(api, cost=to_units(1.0))
    assert first.claim_next().attempts == 1
    # While its worker reports progress, nobody else takes it.
    for _ in range(4):
        time.sleep(0.15)
        assert first.set_progress(job.id, 1, 0.1) is False
        assert second.claim_next() is None
    time.sleep(0.45)  # first goes silent: it died
    retried = second.claim_next()
    assert retried.id == job.id and retried.attempts == 2 and retried.status == JobStatus.PROCESSING
    assert first.complete(job.id, 1, RESULT, {}) is False  # the dead attempt, back from the grave: fenced
    assert first.set_progress(job.id, 1, 0.5) is True
    assert api.balance(OWNER) == to_units(2.0)
    time.sleep(0.45)  # second dies too
    assert third.claim_next() is None
    failed = api.get(job.id)
    assert failed.status == JobStatus.FAILED and failed.error_kind == FailureKind.WORKER_DIED.value
    assert failed.error == ("the worker process died or stopped answering while running this job, 2 times; giving up")
    assert api.balance(OWNER) == to_units(3.0)  # refunded once


@pytest.mark.parametrize("stopped", [False, True], ids=["engine_died", "sigterm"])
def test_a_worker_whose_job_was_taken_over_gives_back_nothing_of_the_new_attempt(nodes, stopped: bool) -> None:
    """A worker silent past reclaim_after whose job another node took over, then its engine dies or it is
    stopped: its release (or hand-back) names its own attempt, which no longer holds the job, and changes
    nothing; the new attempt runs on, is not queued again, not charged an attempt, not failed."""
    api, silent, other = nodes(), nodes(reclaim_after=0.3), nodes(reclaim_after=0.3)
    api.open_account(OWNER, to_units(3.0))
    job = queue(api, cost=to_units(1.0))
    start_next(silent)
    time.sleep(0.45)
    taken = start_next(other)
    assert (taken.id, taken.attempts) == (job.id, MAX_ATTEMPTS)  # the last attempt: a release would fail it
    before = api.get(job.id)
    reason = "the worker was stopped" if stopped else "the worker process died (exit code -9)"
    assert silent.hand_back(job.id, 1) is False
    assert silent.release(job.id, reason, 1) == JobStatus.PROCESSING
    assert api.get(job.id) == before and api.balance(OWNER) == to_units(2.0)
    assert api.claim_next() is None  # not queued again for anyone
    assert other.complete(job.id, taken.attempts, RESULT, {}) is True


@pytest.mark.parametrize("row", [t for t in LIFECYCLE if t.event == Event.WORKER_DIED], ids=str)
def test_a_worker_death_seen_by_another_nodes_claim_follows_the_lifecycle(nodes, row: Transition) -> None:
    """On Redis a worker's death is also found by a claim on any node, once its job's entry went unheard
    for reclaim_after: the same rows as a release by its own supervisor, then (queued again) the claim."""
    dead, other = nodes(ttl=TTL, reclaim_after=0.2), nodes(ttl=TTL, reclaim_after=0.2)
    dead.open_account(OWNER, BALANCE)
    before = drive(dead, row.source, row.when)
    balance, files = dead.balance(OWNER), files_of(dead, before.id)
    time.sleep(0.3)  # its node fell silent
    claimed = other.claim_next()
    after = other.get(before.id)
    if row.target == Stage.QUEUED:  # queued again at its place, and taken at once as a new attempt
        assert claimed == after and stage_of(after) == Stage.CLAIMED and after.attempts == before.attempts + 1
        assert (after.progress, after.started_at) == (0.0, None) and other.balance(OWNER) == balance
    else:
        assert claimed is None
        check_effects(other, row, before, after, row.kinds[0], balance, files, reason=redis_scripts.DIED)


def test_jobs_kept_alive_by_their_worker_are_never_reclaimed(nodes) -> None:
    """Held but silent (waiting behind the running job, or finishing): alive while their worker says so."""
    worker, other = nodes(reclaim_after=0.3), nodes(reclaim_after=0.3)
    running, waiting = queue(worker, seed=1), queue(worker, seed=2)
    start_next(worker)
    assert worker.claim_next().id == waiting.id
    for _ in range(8):
        time.sleep(0.1)
        assert worker.keep_alive({running.id: 1, waiting.id: 1}) == set()
        assert other.claim_next() is None
    time.sleep(0.45)  # silent from here on: its worker died
    assert other.claim_next().id == running.id
    assert worker.keep_alive({running.id: 1, waiting.id: 1}) == {running.id}  # taken over by another


def test_a_restarted_node_releases_its_own_jobs_at_once(nodes) -> None:
    before = nodes(consumer="node-1")
    job = queue(before)
    before.claim_next()
    after = nodes(consumer="node-1")  # the same node, started again (its worker died with it)
    assert [j.id for j in after.processing()] == [job.id]
    assert nodes(consumer="node-2").processing() == []
    (left,) = after.processing()
    assert after.release(job.id, "the server stopped", left.attempts) == JobStatus.QUEUED
    assert after.claim_next().attempts == 2


def test_a_released_job_whose_stream_entry_was_lost_queues_again(nodes, redis_server: RedisServer) -> None:
    store = nodes()
    job = queue(store)
    store.claim_next()
    client = redis.Redis.from_url(redis_server.url)
    try:
        entry = client.hget(f"{store.prefix}job:{job.id}", "entry")
        client.xack(f"{store.prefix}stream", "workers", entry)
        client.xdel(f"{store.prefix}stream", entry)
    finally:
        client.close()
    assert store.release(job.id, "the server stopped", 1) == JobStatus.QUEUED
    again = store.claim_next()
    assert again.id == job.id and again.attempts == 2


def test_a_job_handed_back_is_taken_at_once_by_another_node_as_if_never_claimed(nodes) -> None:
    """A worker stopping gracefully gives back the job it runs and the one it claimed ahead of its turn: another
    node takes them at once (not after reclaim_after), ahead of the jobs submitted after them, with none of
    their attempts spent. One it runs whose engine had to be killed is released instead: that attempt counts."""
    stopping, other = nodes(reclaim_after=60), nodes(reclaim_after=60)
    running, ahead, killed, later = (queue(stopping, seed=i) for i in range(4))
    start_next(stopping)
    assert stopping.claim_next().id == ahead.id
    assert stopping.hand_back(running.id, 1) is True
    assert stopping.hand_back(ahead.id, 1) is True
    assert stopping.hand_back(ahead.id, 1) is False  # once
    back = stopping.get(running.id)
    assert (back.status, back.attempts, back.progress, back.started_at) == (JobStatus.QUEUED, 0, 0.0, None)
    assert stopping.get(ahead.id).status == JobStatus.QUEUED and stopping.queue_position(ahead.seq) == 1
    taken = [start_next(other) for _ in range(2)]
    assert [(job.id, job.attempts) for job in taken] == [(running.id, 1), (ahead.id, 1)]
    start_next(stopping)  # `killed`, whose engine will not end as asked
    assert stopping.release(killed.id, "the worker was stopped", 1) == JobStatus.QUEUED
    taken = [other.claim_next() for _ in range(2)]
    assert [(job.id, job.attempts) for job in taken] == [(killed.id, 2), (later.id, 1)]


def readers(store: RedisJobStore) -> dict[str, int]:
    """The consumers of the job stream's group, as XINFO CONSUMERS lists them: name -> pending entries."""
    listed = store.redis.xinfo_consumers(f"{store.prefix}stream", redis_scripts.GROUP)
    return {reader["name"].decode(): reader["pending"] for reader in listed}


def test_a_stopping_node_leaves_the_consumer_group_unless_it_holds_an_entry(nodes) -> None:
    idle, busy, api = nodes(), nodes(), nodes()
    first, second = queue(api, seed=1), queue(api, seed=2)
    done = idle.claim_next()
    assert idle.complete(first.id, done.attempts, RESULT, {})  # it ran a job: a consumer that holds nothing
    claimed = busy.claim_next()
    assert readers(api) == {idle.consumer: 0, busy.consumer: 1}
    idle.leave()
    busy.leave()  # it still holds the job's entry: forgetting it would lose that entry
    assert readers(api) == {busy.consumer: 1}
    assert busy.complete(second.id, claimed.attempts, RESULT, {})
    busy.leave()
    assert readers(api) == {}


def test_the_consumers_of_workers_gone_are_forgotten_once_they_hold_nothing(nodes) -> None:
    """Every node's housekeeping (purge_expired) forgets the consumers that hold no entry and were handed
    none for reclaim_after: workers gone. One that holds an entry stays until another node took it over."""
    finished, dead, live, fresh = (nodes(reclaim_after=1.0) for _ in range(4))
    first, second, third = (queue(live, seed=i) for i in range(3))
    done = finished.claim_next()
    assert finished.complete(first.id, done.attempts, RESULT, {})
    assert dead.claim_next().id == second.id  # then both fall silent
    time.sleep(1.2)
    assert live.purge_expired() == 0
    assert readers(live) == {dead.consumer: 1}
    assert live.claim_next().id == second.id  # the dead worker's job, taken over
    ran = fresh.claim_next()  # a live worker that has just run a job
    assert fresh.complete(third.id, ran.attempts, RESULT, {})
    live.purge_expired()
    assert readers(live) == {live.consumer: 1, fresh.consumer: 0}


def test_a_redis_restart_loses_no_accepted_job_and_while_down_the_store_says_so(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    store = RedisJobStore(server.url, prefix="r:")
    try:
        store.open_account(OWNER, to_units(4.0))
        jobs = [queue(store, seed=i, cost=to_units(1.0)) for i in range(3)]
        server.kill()
        assert "unreachable" in store.health() and server.url.split("//")[1].split("/")[0] in store.health()
        for call in (lambda: queue(store), lambda: store.get(jobs[0].id), store.claim_next, store.queued_count):
            with pytest.raises(StoreUnavailable):
                call()
        server.restart()
        assert store.health() is None
        # Nothing was half-written while it was down: the refused submission left no job and no charge.
        assert store.queued_count() == 3 and store.balance(OWNER) == to_units(1.0)
        assert [store.claim_next().id for _ in jobs] == [j.id for j in jobs]
        assert all(store.read_file(j.id, "input") == b"input-%d" % i for i, j in enumerate(jobs))
    finally:
        store.close()
        server.stop()


def test_a_full_redis_is_disk_full_and_a_result_that_does_not_fit_fails_its_job(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    store = RedisJobStore(server.url, prefix="m:")
    client = redis.Redis.from_url(server.url)
    try:
        job = queue(store)
        claimed = store.claim_next()
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used + 256 * 1024)
        with pytest.raises(DiskFull):
            store.create(JobParams(prompt="x"), ImageSource(), image=b"\0" * 2_000_000, base64=True, owner=None)
        with pytest.raises(DiskFull):
            store.complete(job.id, claimed.attempts, RESULT, {"output-0.jpg": b"\0" * 2_000_000})
        failed = store.get(job.id)
        assert failed.status == JobStatus.FAILED and "memory is full" in failed.error
        # Well below what it uses (its use moves by a few KiB as buffers come and go).
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) // 2)
        assert "out of memory" in store.health()
        assert store.queued_count() == 0
    finally:
        client.close()
        store.close()
        server.stop()


def test_the_event_listener_comes_back_after_a_redis_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    store = RedisJobStore(server.url, prefix="e:")
    client = redis.Redis.from_url(server.url)
    try:
        server.kill()
        time.sleep(1.0)
        server.restart()

        async def heard() -> bool:
            # Another node's message, sent until the listener has reconnected (its backoff is at most 5 s).
            with store.events.watch("probe") as watch:
                for _ in range(40):
                    watch.clear()
                    client.publish("e:events", "another-node j probe")
                    if await watch.wait(0.5):
                        return True
            return False

        assert asyncio.run(heard())
    finally:
        client.close()
        store.close()
        server.stop()


def test_jobs_with_a_webhook_are_found_for_the_start_up_scan(store: JobStore) -> None:
    hooked = store.create(
        JobParams(prompt="p"),
        ImageSource(),
        image=b"x",
        base64=False,
        owner=OWNER,
        delivery=Delivery(webhook_url="http://127.0.0.1:9/hook"),
    )
    queue(store)
    assert [job.id for job in store.webhook_jobs()] == [hooked.id]
