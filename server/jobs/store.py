"""The job store: one interface, an embedded SQLite implementation (WAL, files beside it).

The store is the only shared state between the API and the supervisor: whatever it has accepted
survives a `kill -9` of either process.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from server.jobs.model import FailureKind, Job, JobStatus


class InsufficientBalance(Exception):
    def __init__(self, balance: float, cost: float) -> None:
        super().__init__(f"balance {balance:g} is less than the cost {cost:g}")
        self.balance, self.cost = balance, cost


class QueueFull(Exception):
    pass


# A job whose worker died gets one more attempt; a second death means the job itself kills it.
MAX_ATTEMPTS = 2


class JobStore(Protocol):
    def create(
        self,
        params: dict[str, Any],
        source: dict[str, Any],
        *,
        image: bytes | None,
        base64: bool,
        owner: str | None,
        cost: float = 0.0,
        max_queued: int | None = None,
    ) -> Job: ...
    def get(self, job_id: str) -> Job | None: ...
    def claim_next(self) -> Job | None: ...
    def set_progress(self, job_id: str, progress: float) -> None: ...
    def complete(self, job_id: str, result: dict[str, Any]) -> None: ...
    def fail(self, job_id: str, error: str, kind: FailureKind) -> None: ...
    def release(self, job_id: str, reason: str) -> JobStatus: ...
    def request_cancel(self, job_id: str) -> Job | None: ...
    def queue_position(self, job: Job) -> int: ...
    def queued_count(self) -> int: ...
    def processing(self) -> list[Job]: ...
    def purge_expired(self, now: float | None = None) -> int: ...
    def job_dir(self, job_id: str) -> Path: ...
    def open_account(self, owner: str, granted: float) -> None: ...
    def balance(self, owner: str) -> float | None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    source TEXT NOT NULL,
    base64 INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    progress REAL NOT NULL DEFAULT 0,
    error TEXT,
    error_kind TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    expires_at REAL,
    result TEXT NOT NULL DEFAULT '{}',
    cost REAL NOT NULL DEFAULT 0
);
-- The credit ledger: `granted` is the key's credits as last configured, so raising it tops up.
CREATE TABLE IF NOT EXISTS credits (owner TEXT PRIMARY KEY, granted REAL, balance REAL NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);
"""
# Columns added since the first release: a data directory from an older server gets them on start.
ADDED_COLUMNS = (("jobs", "cost", "REAL NOT NULL DEFAULT 0"), ("credits", "granted", "REAL"))


class SqliteJobStore:
    def __init__(self, data_dir: Path, ttl: float = 3600.0) -> None:
        self.data_dir = Path(data_dir)
        self.files = self.data_dir / "jobs"
        self.files.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / "jobs.sqlite3"
        self.ttl = ttl
        self._local = threading.local()
        with self._db() as db:
            db.executescript(SCHEMA)
            for table, column, declaration in ADDED_COLUMNS:
                if column not in {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    @staticmethod
    def _job(row: sqlite3.Row | None) -> Job | None:
        if row is None:
            return None
        return Job(
            id=row["id"],
            seq=row["seq"],
            status=JobStatus(row["status"]),
            params=json.loads(row["params"]),
            source=json.loads(row["source"]),
            base64=bool(row["base64"]),
            owner=row["owner"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            attempts=row["attempts"],
            progress=row["progress"],
            error=row["error"],
            error_kind=row["error_kind"],
            cancel_requested=bool(row["cancel_requested"]),
            expires_at=row["expires_at"],
            result=json.loads(row["result"]),
        )

    def job_dir(self, job_id: str) -> Path:
        return self.files / job_id

    def create(
        self,
        params: dict[str, Any],
        source: dict[str, Any],
        *,
        image: bytes | None,
        base64: bool,
        owner: str | None,
        cost: float = 0.0,
        max_queued: int | None = None,
    ) -> Job:
        """Queue a job. With a cost, the owner's balance (if it has an account) is charged; with
        max_queued, a full queue raises QueueFull. Both in the one transaction that queues the job,
        so concurrent submissions can neither overdraw an account nor overfill the queue."""
        job_id = uuid.uuid4().hex
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True)
        if image is not None:
            # Written (and flushed) before the row exists, so a listed job always has its input.
            with open(folder / "input", "wb") as f:
                f.write(image)
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            if max_queued is not None and self.queued_count() >= max_queued:
                raise QueueFull()
            balance = self.balance(owner) if owner and cost > 0 else None
            if balance is None:
                cost = 0.0
            elif balance < cost:
                raise InsufficientBalance(balance, cost)
            else:
                db.execute("UPDATE credits SET balance = balance - ? WHERE owner = ?", (cost, owner))
            row = db.execute(
                # created_at is taken inside the write lock, so it grows in the order jobs are accepted.
                "INSERT INTO jobs (id, status, params, source, base64, owner, cost, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, (julianday('now') - 2440587.5) * 86400.0) RETURNING *",
                (
                    job_id,
                    JobStatus.QUEUED.value,
                    json.dumps(params),
                    json.dumps(source),
                    int(base64),
                    owner,
                    cost,
                ),
            ).fetchone()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return self._job(row)

    def open_account(self, owner: str, granted: float) -> None:
        """A metered key's account. A new one starts at `granted`; an existing one keeps its balance
        across restarts and moves by the change in the grant, so raising a key's credits tops it up."""
        self._db().execute(
            "INSERT INTO credits (owner, granted, balance) VALUES (?, ?, ?) ON CONFLICT (owner) DO UPDATE"
            " SET balance = balance + excluded.granted - COALESCE(granted, excluded.granted),"
            " granted = excluded.granted",
            (owner, granted, granted),
        )

    def balance(self, owner: str) -> float | None:
        row = self._db().execute("SELECT balance FROM credits WHERE owner = ?", (owner,)).fetchone()
        return None if row is None else float(row[0])

    def get(self, job_id: str) -> Job | None:
        job = self._job(self._db().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
        if job is not None and job.expires_at is not None and job.expires_at <= time.time():
            return None
        return job

    def claim_next(self) -> Job | None:
        row = (
            self._db()
            .execute(
                "UPDATE jobs SET status = ?, started_at = ?, attempts = attempts + 1, progress = 0"
                " WHERE seq = (SELECT seq FROM jobs WHERE status = ? ORDER BY seq LIMIT 1)"
                " AND status = ? RETURNING *",
                (JobStatus.PROCESSING.value, time.time(), JobStatus.QUEUED.value, JobStatus.QUEUED.value),
            )
            .fetchone()
        )
        return self._job(row)

    def set_progress(self, job_id: str, progress: float) -> None:
        self._db().execute(
            "UPDATE jobs SET progress = ? WHERE id = ? AND status = ?",
            (progress, job_id, JobStatus.PROCESSING.value),
        )

    def _finish(self, job_id: str, status: JobStatus, **columns: Any) -> None:
        now = time.time()
        columns.update(status=status.value, finished_at=now, expires_at=now + self.ttl)
        assignments = ", ".join(f"{name} = ?" for name in columns)
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ? AND status IN (?, ?) RETURNING owner, cost",
                (*columns.values(), job_id, JobStatus.QUEUED.value, JobStatus.PROCESSING.value),
            ).fetchone()
            # Every way a job can fail passes here, once: that is where its charge is refunded.
            if row is not None and status == JobStatus.FAILED and row["cost"] > 0:
                db.execute("UPDATE credits SET balance = balance + ? WHERE owner = ?", (row["cost"], row["owner"]))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def complete(self, job_id: str, result: dict[str, Any]) -> None:
        self._finish(job_id, JobStatus.COMPLETED, result=json.dumps(result), progress=1.0)

    def fail(self, job_id: str, error: str, kind: FailureKind) -> None:
        self._finish(job_id, JobStatus.FAILED, error=error, error_kind=kind.value)

    def release(self, job_id: str, reason: str) -> JobStatus:
        """A job's worker died under it: queue it again at its old place, or fail it for good."""
        job = self.get(job_id)
        if job is None or job.status != JobStatus.PROCESSING:
            return job.status if job else JobStatus.FAILED
        if job.cancel_requested:
            self.fail(job_id, "cancelled", FailureKind.CANCELLED)
            return JobStatus.FAILED
        if job.attempts >= MAX_ATTEMPTS:
            self.fail(
                job_id,
                f"{reason} while running this job, {job.attempts} times; giving up",
                FailureKind.WORKER_DIED,
            )
            return JobStatus.FAILED
        self._db().execute(
            "UPDATE jobs SET status = ?, started_at = NULL, progress = 0 WHERE id = ? AND status = ?",
            (JobStatus.QUEUED.value, job_id, JobStatus.PROCESSING.value),
        )
        return JobStatus.QUEUED

    def request_cancel(self, job_id: str) -> Job | None:
        db = self._db()
        db.execute(
            "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status IN (?, ?)",
            (job_id, JobStatus.QUEUED.value, JobStatus.PROCESSING.value),
        )
        job = self.get(job_id)
        if job is not None and job.status == JobStatus.QUEUED:
            # Nothing runs it yet: it ends here (the supervisor stops a running one at its next step).
            self.fail(job_id, "cancelled", FailureKind.CANCELLED)
            job = self.get(job_id)
        return job

    def queue_position(self, job: Job) -> int:
        row = (
            self._db()
            .execute("SELECT COUNT(*) FROM jobs WHERE status = ? AND seq < ?", (JobStatus.QUEUED.value, job.seq))
            .fetchone()
        )
        return int(row[0])

    def queued_count(self) -> int:
        return int(
            self._db().execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (JobStatus.QUEUED.value,)).fetchone()[0]
        )

    def processing(self) -> list[Job]:
        rows = self._db().execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq", (JobStatus.PROCESSING.value,))
        return [self._job(r) for r in rows.fetchall()]

    def purge_expired(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        db = self._db()
        ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE expires_at <= ?", (now,)).fetchall()]
        for job_id in ids:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return len(ids)
