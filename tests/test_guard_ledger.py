"""The credit ledger and the queue bound in the job store: charged once, refunded on every way to FAILED.

Each test runs on both stores (SQLite, Redis): the `stores` fixture of tests/conftest.py."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from server.http.submission import request_cost
from server.jobs.contract import FailureKind, ImageSource, JobParams, JobResult, JobStatus, from_units, to_units
from server.jobs.sqlite_store import SqliteJobStore
from server.jobs.store import MAX_ATTEMPTS, InsufficientBalance, JobStore, QueueFull
from tests.store_helpers import Stores

OWNER, OTHER = "a" * 64, "b" * 64
PARAMS = JobParams(prompt="x")
NOTHING = JobResult(outputs=(), seeds=(), width=1, height=1, working_size=(1, 1), inference_time=0.0)


def queue(store: JobStore, cost: float = 2.0, owner: str = OWNER, **kw: object):
    return store.create(PARAMS, ImageSource(), image=b"x", base64=False, owner=owner, cost=to_units(cost), **kw)


def balance(store: JobStore, owner: str = OWNER) -> float | None:
    units = store.balance(owner)
    return None if units is None else from_units(units)


@pytest.fixture
def store(stores: Stores) -> JobStore:
    store = stores.open()
    store.open_account(OWNER, to_units(10.0))
    return store


def test_a_job_is_charged_at_submission_and_kept_when_it_completes(store: JobStore) -> None:
    job = queue(store)
    assert balance(store) == 8.0
    store.claim_next()
    store.complete(job.id, 1, NOTHING, {})
    assert balance(store) == 8.0


def test_a_retried_job_is_charged_once(store: JobStore) -> None:
    job = queue(store)
    assert store.claim_next().id == job.id
    assert store.release(job.id, "the worker died", 1) == JobStatus.QUEUED
    assert store.claim_next().attempts == 2
    store.complete(job.id, 2, NOTHING, {})
    assert balance(store) == 8.0


@pytest.mark.parametrize("path", ["worker_failure", "cancel_queued", "cancel_running", "worker_death"])
def test_every_way_to_failed_refunds_once(store: JobStore, path: str) -> None:
    job = queue(store)
    assert balance(store) == 8.0
    if path == "worker_failure":
        store.claim_next()
        store.fail(job.id, "out of memory", FailureKind.ENGINE)
    elif path == "cancel_queued":
        store.request_cancel(job.id)
    elif path == "cancel_running":
        claimed = store.claim_next()
        store.mark_started(claimed.id, claimed.attempts)
        store.request_cancel(job.id)
        assert balance(store) == 8.0  # still running until the worker stops it
        store.fail(job.id, "cancelled", FailureKind.CANCELLED)
    else:
        for _ in range(MAX_ATTEMPTS):
            claimed = store.claim_next()
            store.release(job.id, "the worker died", claimed.attempts)
    assert store.get(job.id).status == JobStatus.FAILED
    assert balance(store) == 10.0
    # A second fail (a late message from a dying worker) neither refunds again nor changes the job.
    store.fail(job.id, "late", FailureKind.ENGINE)
    store.request_cancel(job.id)
    assert balance(store) == 10.0


def test_not_enough_credits_queues_nothing(stores: Stores, store: JobStore) -> None:
    queue(store, cost=6.0)
    with pytest.raises(InsufficientBalance) as caught:
        queue(store, cost=6.0)
    assert caught.value.balance == to_units(4.0) and caught.value.cost == to_units(6.0)
    assert store.queued_count() == 1 and balance(store) == 4.0
    assert stores.stored_inputs() == 1  # the refused job's input is gone too (never kept, on Redis)


def test_keys_without_an_account_are_not_metered(store: JobStore) -> None:
    job = queue(store, owner=OTHER)
    assert balance(store, OTHER) is None
    store.claim_next()
    store.fail(job.id, "boom", FailureKind.ENGINE)
    assert balance(store) == 10.0 and balance(store, OTHER) is None


def test_the_ledger_survives_a_restart_and_a_raised_grant_tops_it_up(stores: Stores) -> None:
    first = stores.open()
    first.open_account(OWNER, to_units(10.0))
    queue(first, cost=3.0)
    again = stores.open()
    again.open_account(OWNER, to_units(10.0))  # the same grant: the balance is kept, not reset
    assert balance(again) == 7.0
    again.open_account(OWNER, to_units(15.0))  # 5 more granted
    assert balance(again) == 12.0


def test_a_store_from_before_credits_is_upgraded(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.execute(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL,"
        " params TEXT NOT NULL, source TEXT NOT NULL, base64 INTEGER NOT NULL DEFAULT 0, owner TEXT,"
        " created_at REAL NOT NULL, started_at REAL, finished_at REAL, attempts INTEGER NOT NULL DEFAULT 0,"
        " progress REAL NOT NULL DEFAULT 0, error TEXT, error_kind TEXT,"
        " cancel_requested INTEGER NOT NULL DEFAULT 0, expires_at REAL, result TEXT NOT NULL DEFAULT '{}')"
    )
    db.execute("CREATE TABLE credits (owner TEXT PRIMARY KEY, balance REAL NOT NULL)")
    db.execute("INSERT INTO credits VALUES (?, 4.0)", (OWNER,))
    db.commit()
    db.close()
    store = SqliteJobStore(tmp_path)
    store.open_account(OWNER, to_units(10.0))  # no grant on record: the balance stands
    assert balance(store) == 4.0
    job = queue(store, cost=1.0)
    assert balance(store) == 3.0 and store.get(job.id).status == JobStatus.QUEUED


def test_the_queue_bound_is_exact(store: JobStore) -> None:
    for _ in range(3):
        queue(store, cost=0.0, max_queued=3)
    with pytest.raises(QueueFull):
        queue(store, cost=1.0, max_queued=3)
    assert store.queued_count() == 3 and balance(store) == 10.0
    claimed = store.claim_next()
    store.mark_started(claimed.id, claimed.attempts)  # a running job no longer waits: room for one more
    queue(store, cost=0.0, max_queued=3)


def cost(size: tuple[int, int] | None, **fields: int) -> float:
    return from_units(request_cost(replace(PARAMS, **fields), size))


def test_the_cost_formula() -> None:
    assert cost((512, 512)) == 1.0  # up to 1 MP counts as 1
    assert cost((512, 512), samples=4, steps=60) == 8.0
    assert cost((1024, 1024), left=1024) == round(2048 * 1024 / 1e6, 4)
    # A URL's size is not known at submission: it counts as 1024x1024, plus the padding.
    assert cost(None, right=1024) == cost((1024, 1024), right=1024)


def test_a_thin_canvas_costs_what_a_square_one_does() -> None:
    # Its denoising is no more work than a square canvas's (tests/test_working_size.py), nor less: 1 credit.
    assert cost((5000, 1), left=32) == cost((1, 5000), top=32) == cost((64, 64), left=32) == 1.0


def test_balances_never_drift() -> None:
    # Thirds of a credit, charged and refunded many times: integer units add up exactly.
    assert to_units(2.0) - 3 * to_units(0.6667) == -1
    assert sum([to_units(0.1)] * 10) == to_units(1.0)


def test_a_ledger_of_many_small_charges_adds_up(stores: Stores) -> None:
    store = stores.open()
    store.open_account(OWNER, to_units(1.0))
    jobs = [queue(store, cost=0.1) for _ in range(10)]
    assert store.balance(OWNER) == 0  # exactly: ten tenths are one credit, with nothing left over
    with pytest.raises(InsufficientBalance):
        queue(store, cost=0.0001)
    for job in jobs[:3]:
        store.fail(job.id, "boom", FailureKind.ENGINE)
    assert store.balance(OWNER) == to_units(0.3)
