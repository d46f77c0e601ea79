"""The embedded job store: SQLite in WAL mode, with each job's files beside its row.

The database is the only state the API and the supervisor share. A job's files up to INLINE_MAX bytes
(a small request's input, output and previews) are rows of the `files` table, written in the same
transaction as the job's own row. Larger ones are files in a folder per job, written before the row
that points to them; a folder without a row (a crash between the two) is removed at start.

Longer than most modules, as one cohesive thing: one implementation of the JobStore protocol
(server/jobs/store.py), whose methods share the database's schema and transactions; its row codec is in
server/jobs/codec.py and its lifecycle rules in server/jobs/lifecycle.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from server.jobs.codec import (
    JOB_FIELDS,
    STATE_FIELDS,
    encode_result,
    job_from_fields,
    state_from_fields,
    submitted_fields,
)
from server.jobs.contract import (
    CREDIT_UNITS,
    INPUT_NAME,
    Delivery,
    FailureKind,
    ImageSource,
    Job,
    JobParams,
    JobResult,
    JobState,
    JobStatus,
)
from server.jobs.events import JobEvents
from server.jobs.lifecycle import CANCELLED_ERROR, GAVE_UP, LIVE, MAX_ATTEMPTS, expired
from server.jobs.store import (
    DiskFull,
    FileGone,
    InsufficientBalance,
    QueueFull,
    StoreCorrupt,
    StoreUnavailable,
)

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
    input_ready INTEGER NOT NULL DEFAULT 1,
    cost_units INTEGER NOT NULL DEFAULT 0,
    delivery TEXT NOT NULL DEFAULT '{}'
);
-- The credit ledger, in integer units (contract.CREDIT_UNITS a credit): `granted_units` is the key's
-- credits as last configured, so raising it tops the balance up.
CREATE TABLE IF NOT EXISTS credits (owner TEXT PRIMARY KEY, granted_units INTEGER, balance_units INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE TABLE IF NOT EXISTS files (job_id TEXT NOT NULL, name TEXT NOT NULL, data BLOB NOT NULL, UNIQUE (job_id, name));
"""
# Columns added since the first release, and the older column (credits as REAL) each is filled from.
ADDED_COLUMNS = (
    ("jobs", "input_ready", "INTEGER NOT NULL DEFAULT 1", None),
    ("jobs", "cost_units", "INTEGER NOT NULL DEFAULT 0", "cost"),
    ("jobs", "delivery", "TEXT NOT NULL DEFAULT '{}'", None),
)
# The codec's fields by their columns: `cost` is kept in integer units since credits stopped being REAL.
COLUMNS = {name: name for name in JOB_FIELDS} | {"cost": "cost_units"}
JOB = ", ".join(column if column == name else f"{column} AS {name}" for name, column in COLUMNS.items())
STATE = ", ".join(STATE_FIELDS)
# Files up to this size live in the database: creating a file and its folder costs a small request more
# than the rest of its store work together, and SQLite keeps blobs of this size as fast as a file system.
INLINE_MAX = 256 * 1024
# In the files folder: a store was made here, so a data directory whose database is gone is not taken
# for a new one (that would forget every request and reset every credit balance).
MARKER = ".store"


class SqliteJobStore:
    def __init__(self, data_dir: Path, ttl: float = 3600.0, events: JobEvents | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.files = self.data_dir / "jobs"
        self.path = self.data_dir / "jobs.sqlite3"
        self.ttl = ttl
        self.events = events or JobEvents()
        self._local = threading.local()
        self.files.mkdir(parents=True, exist_ok=True)
        kept = sum(1 for entry in self.files.iterdir() if entry.name != MARKER)
        if not self.path.exists() and (kept or (self.files / MARKER).exists()):
            # Deleted or moved away: an empty new store would silently forget every request.
            detail = f"{kept} requests' files are in {self.files}" if kept else f"{self.files} shows it was here"
            raise StoreCorrupt(str(self.path), detail, problem="missing")
        try:
            db = self._connect()
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise StoreCorrupt(str(self.path), str(problem)[:200])
            db.executescript(SCHEMA)
            self._upgrade(db)
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(str(self.path), str(exc)) from None
        stat = os.stat(self.path)
        self._identity = (stat.st_dev, stat.st_ino)
        self._local.db = db
        (self.files / MARKER).touch()
        self._remove_orphans()

    # -- plumbing ---------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    @staticmethod
    def _upgrade(db: sqlite3.Connection) -> None:
        credits = {row["name"] for row in db.execute("PRAGMA table_info(credits)")}
        if "balance" in credits:  # the REAL ledger of older releases becomes integer units
            granted = "granted" if "granted" in credits else "NULL"
            db.executescript(
                f"""
                BEGIN;
                CREATE TABLE credits_units
                    (owner TEXT PRIMARY KEY, granted_units INTEGER, balance_units INTEGER NOT NULL);
                INSERT INTO credits_units SELECT owner, CAST(ROUND({granted} * {CREDIT_UNITS}) AS INTEGER),
                    CAST(ROUND(balance * {CREDIT_UNITS}) AS INTEGER) FROM credits;
                DROP TABLE credits;
                ALTER TABLE credits_units RENAME TO credits;
                COMMIT;
                """
            )
        for table, column, declaration, old in ADDED_COLUMNS:
            present = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
                if old in present:
                    db.execute(f"UPDATE {table} SET {column} = CAST(ROUND({old} * {CREDIT_UNITS}) AS INTEGER)")

    def _db(self) -> sqlite3.Connection:
        self._check_file()
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    def _check_file(self) -> None:
        """Writing to a store file that was deleted or replaced would lose every write silently."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            raise StoreUnavailable(f"the job store {self.path} was deleted while the server was running") from None
        if (stat.st_dev, stat.st_ino) != self._identity:
            raise StoreUnavailable(f"the job store {self.path} was replaced while the server was running")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's and the disk's failures as the store's own."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "full" in str(exc):
                raise DiskFull("the disk of the job store is full") from None
            raise StoreUnavailable(f"the job store {self.path} failed: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(f"the job store {self.path} is damaged: {exc}") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull("the disk of the job store is full") from None
            raise

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._errors():
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise

    def _execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._errors():
            return self._db().execute(sql, args)

    @staticmethod
    def _job(row: sqlite3.Row | None) -> Job | None:
        return None if row is None else job_from_fields(dict(row))

    def job_dir(self, job_id: str) -> Path:
        return self.files / job_id

    def _remove_orphans(self) -> None:
        known = {row[0] for row in self._execute("SELECT id FROM jobs")}
        for folder in self.files.iterdir():
            if folder.name not in known and folder.name != MARKER:
                shutil.rmtree(folder, ignore_errors=True)
        self._execute("DELETE FROM files WHERE job_id NOT IN (SELECT id FROM jobs)")

    def _write_files(self, db: sqlite3.Connection, job_id: str, files: Mapping[str, bytes]) -> None:
        """A job's files, inside the transaction that writes its row; the large ones are written to its
        folder first (by `_write_large`), so here they only replace a smaller one of the same name."""
        for name, data in files.items():
            if len(data) <= INLINE_MAX:
                db.execute("INSERT OR REPLACE INTO files (job_id, name, data) VALUES (?, ?, ?)", (job_id, name, data))
            else:
                db.execute("DELETE FROM files WHERE job_id = ? AND name = ?", (job_id, name))

    def _write_large(self, job_id: str, files: Mapping[str, bytes]) -> None:
        """The files too large for the database, in the job's folder. Before the row that points to them."""
        self._place(self._stage_large(job_id, files))

    def _stage_large(self, job_id: str, files: Mapping[str, bytes]) -> list[tuple[Path, Path]]:
        """The files too large for the database, each written whole in the job's folder under a temporary
        name (a reader never sees half a file); `_place` moves them into place, or drops them."""
        large = {name: data for name, data in files.items() if len(data) > INLINE_MAX}
        if not large:
            return []
        folder = self.job_dir(job_id)
        staged = [(folder / f".{name}.part", folder / name) for name in large]
        try:
            with self._errors():
                folder.mkdir(parents=True, exist_ok=True)
                for (temporary, _), data in zip(staged, large.values(), strict=True):
                    temporary.write_bytes(data)
        except BaseException:
            for temporary, _ in staged:
                temporary.unlink(missing_ok=True)
            raise
        return staged

    def _place(self, staged: list[tuple[Path, Path]], keep: bool = True) -> None:
        with self._errors():
            for temporary, final in staged:
                if keep:
                    os.replace(temporary, final)
                else:
                    temporary.unlink(missing_ok=True)

    # -- submission -------------------------------------------------------------------------------

    def create(
        self,
        params: JobParams,
        source: ImageSource,
        *,
        image: bytes | None,
        base64: bool,
        owner: str | None,
        cost: int = 0,
        max_queued: int | None = None,
        delivery: Delivery | None = None,
    ) -> Job:
        """Queue a job. With a cost, the owner's balance (if it has an account) is charged; with
        max_queued, a full queue raises QueueFull. Both in the one transaction that queues the job,
        so concurrent submissions can neither overdraw an account nor overfill the queue."""
        job_id = uuid.uuid4().hex
        fields = submitted_fields(
            job_id,
            params,
            source,
            base64=base64,
            owner=owner,
            cost=cost,
            input_ready=image is not None,
            delivery=delivery or Delivery(),
        )
        files = {} if image is None else {INPUT_NAME: image}
        try:
            # A large input is written before the row exists, so a listed job always has its input.
            self._write_large(job_id, files)
            with self._transaction() as db:
                if max_queued is not None and self._queued(db) >= max_queued:
                    raise QueueFull()
                balance = self._balance(db, owner) if owner and cost > 0 else None
                if balance is None:
                    cost = 0
                elif balance < cost:
                    raise InsufficientBalance(balance, cost)
                else:
                    db.execute("UPDATE credits SET balance_units = balance_units - ? WHERE owner = ?", (cost, owner))
                fields["cost"] = cost
                row = db.execute(
                    # created_at is taken inside the write lock, so it grows in the order jobs are accepted.
                    f"INSERT INTO jobs ({', '.join(COLUMNS[name] for name in fields)}, created_at)"
                    f" VALUES ({', '.join('?' * len(fields))}, (julianday('now') - 2440587.5) * 86400.0)"
                    f" RETURNING {JOB}",
                    tuple(fields.values()),
                ).fetchone()
                self._write_files(db, job_id, files)
        except BaseException:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            raise
        job = self._job(row)
        assert job is not None
        if job.input_ready:
            self.events.work_available()
        return job

    def open_account(self, owner: str, granted: int) -> None:
        """A metered key's account. A new one starts at `granted`; an existing one keeps its balance
        across restarts and moves by the change in the grant, so raising a key's credits tops it up."""
        self._execute(
            "INSERT INTO credits (owner, granted_units, balance_units) VALUES (?, ?, ?) ON CONFLICT (owner) DO UPDATE"
            " SET balance_units = balance_units + excluded.granted_units - COALESCE(granted_units,"
            " excluded.granted_units), granted_units = excluded.granted_units",
            (owner, granted, granted),
        )

    @staticmethod
    def _balance(db: sqlite3.Connection, owner: str) -> int | None:
        row = db.execute("SELECT balance_units FROM credits WHERE owner = ?", (owner,)).fetchone()
        return None if row is None else int(row[0])

    def balance(self, owner: str) -> int | None:
        with self._errors():
            return self._balance(self._db(), owner)

    # -- the read side ----------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        job = self._job(self._execute(f"SELECT {JOB} FROM jobs WHERE id = ?", (job_id,)).fetchone())
        return None if job is None or expired(job.expires_at, time.time()) else job

    def state(self, job_id: str) -> JobState | None:
        row = self._execute(f"SELECT {STATE} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        state = None if row is None else state_from_fields(dict(row))
        return None if state is None or expired(state.expires_at, time.time()) else state

    def queue_position(self, seq: int) -> int:
        # Jobs handed to the worker but not started yet are still waiting: they count as queued.
        row = self._execute(
            "SELECT COUNT(*) FROM jobs WHERE seq < ? AND (status = ? OR (status = ? AND started_at IS NULL))",
            (seq, JobStatus.QUEUED.value, JobStatus.PROCESSING.value),
        ).fetchone()
        return int(row[0])

    def list_jobs(
        self, owner: str | None, *, status: JobStatus | None = None, limit: int = 20, before: int | None = None
    ) -> list[Job]:
        """The owner's jobs (None: those submitted without a key), newest first, below seq `before`."""
        where, args = ["owner IS ?", "(expires_at IS NULL OR expires_at > ?)"], [owner, time.time()]
        if status is not None:
            where.append("status = ?")
            args.append(status.value)
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        rows = self._execute(
            f"SELECT {JOB} FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?", (*args, limit)
        ).fetchall()
        return [job for job in map(self._job, rows) if job is not None]

    def webhook_jobs(self) -> list[Job]:
        """Unexpired jobs with a webhook_url in their delivery, oldest first."""
        rows = self._execute(
            f"SELECT {JOB} FROM jobs WHERE json_extract(delivery, '$.webhook_url') IS NOT NULL"
            " AND (expires_at IS NULL OR expires_at > ?) ORDER BY seq",
            (time.time(),),
        ).fetchall()
        return [job for job in map(self._job, rows) if job is not None]

    @staticmethod
    def _queued(db: sqlite3.Connection) -> int:
        # Jobs handed to the worker ahead of their turn are still waiting: the bound counts them.
        return int(
            db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = ? OR (status = ? AND started_at IS NULL)",
                (JobStatus.QUEUED.value, JobStatus.PROCESSING.value),
            ).fetchone()[0]
        )

    def queued_count(self) -> int:
        with self._errors():
            return self._queued(self._db())

    def read_file(self, job_id: str, name: str) -> bytes:
        row = self._execute("SELECT data FROM files WHERE job_id = ? AND name = ?", (job_id, name)).fetchone()
        if row is not None:
            return row[0]
        try:
            return (self.job_dir(job_id) / name).read_bytes()
        except FileNotFoundError:
            raise FileGone(name) from None

    def has_file(self, job_id: str, name: str) -> bool:
        row = self._execute("SELECT 1 FROM files WHERE job_id = ? AND name = ?", (job_id, name)).fetchone()
        return row is not None or (self.job_dir(job_id) / name).is_file()

    def put_file(self, job_id: str, name: str, data: bytes) -> None:
        """A file beside a job that is still kept (its preview); nothing once the job is gone."""
        if self._execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
            return
        self._write_large(job_id, {name: data})
        with self._transaction() as db:
            self._write_files(db, job_id, {name: data})

    def health(self) -> str | None:
        """None when the store works; else what is wrong, in words for /health."""
        try:
            self._execute("SELECT 1").fetchone()
        except (StoreUnavailable, DiskFull) as exc:
            return str(exc)
        return None

    # -- the input stage ---------------------------------------------------------------------------

    def awaiting_input(self) -> list[Job]:
        rows = self._execute(
            f"SELECT {JOB} FROM jobs WHERE status = ? AND input_ready = 0 ORDER BY seq", (JobStatus.QUEUED.value,)
        ).fetchall()
        return [job for job in map(self._job, rows) if job is not None]

    def lease_input(self, job_id: str) -> bool:
        """One node, so no lease to take: True while the job waits for its input."""
        waiting = "SELECT 1 FROM jobs WHERE id = ? AND status = ? AND input_ready = 0"
        return self._execute(waiting, (job_id, JobStatus.QUEUED.value)).fetchone() is not None

    def attach_input(self, job_id: str, image: bytes) -> bool:
        """The fetched input of a URL job: it becomes ready to run. False if the job ended meanwhile; True
        and nothing written if its input is there already (stored by an earlier fetch)."""
        files = {INPUT_NAME: image}
        queued = (job_id, JobStatus.QUEUED.value)
        if self._execute("SELECT 1 FROM jobs WHERE id = ? AND status = ? AND input_ready = 0", queued).fetchone():
            self._write_large(job_id, files)
        with self._transaction() as db:
            row = db.execute("SELECT input_ready FROM jobs WHERE id = ? AND status = ?", queued).fetchone()
            if row is not None and not row["input_ready"]:
                db.execute("UPDATE jobs SET input_ready = 1 WHERE id = ?", (job_id,))
                self._write_files(db, job_id, files)
        if row is not None and not row["input_ready"]:
            self.events.work_available()
        return row is not None

    # -- the worker side ---------------------------------------------------------------------------

    def claim_next(self) -> Job | None:
        row = self._execute(
            "UPDATE jobs SET status = ?, attempts = attempts + 1, progress = 0"
            " WHERE seq = (SELECT seq FROM jobs WHERE status = ? AND input_ready = 1 ORDER BY seq LIMIT 1)"
            f" AND status = ? RETURNING {JOB}",
            (JobStatus.PROCESSING.value, JobStatus.QUEUED.value, JobStatus.QUEUED.value),
        ).fetchone()
        job = self._job(row)
        if job is not None:
            self.events.job_changed(job.id, running=True)
        return job

    def mark_started(self, job_id: str, attempt: int) -> bool:
        return self._touch(job_id, attempt, "started_at", time.time())

    def set_progress(self, job_id: str, attempt: int, progress: float) -> bool:
        return self._touch(job_id, attempt, "progress", progress)

    def _touch(self, job_id: str, attempt: int, column: str, value: float) -> bool:
        """A running attempt's write; True when its worker should stop (cancelled, or not its job now)."""
        row = self._execute(
            f"UPDATE jobs SET {column} = ? WHERE id = ? AND attempts = ? AND status = ? RETURNING cancel_requested",
            (value, job_id, attempt, JobStatus.PROCESSING.value),
        ).fetchone()
        self.events.job_changed(job_id, running=row is not None)
        return row is None or bool(row[0])

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        attempt: int | None,
        files: Mapping[str, bytes] | None = None,
        staged: list[tuple[Path, Path]] | None = None,
        **columns: Any,
    ) -> bool:
        """The job ends, if it is live (and this attempt's, given one): its row, its files (the large ones
        `staged` are moved into place only then) and, when it FAILED, the refund, in one transaction."""
        now = time.time()
        columns.update(status=status.value, finished_at=now, expires_at=now + self.ttl)
        assignments = ", ".join(f"{name} = ?" for name in columns)
        # A worker's write (with its attempt) ends only the job that attempt runs; the server's own any live job.
        fence, args = (
            (" AND status IN (?, ?)", tuple(live.value for live in LIVE))
            if attempt is None
            else (" AND status = ? AND attempts = ?", (JobStatus.PROCESSING.value, attempt))
        )
        with self._transaction() as db:
            row = db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ?{fence} RETURNING {JOB}", (*columns.values(), job_id, *args)
            ).fetchone()
            if row is not None and files:
                self._write_files(db, job_id, files)
            # Before the commit: a crash between the two leaves unlisted files, never a result without them.
            self._place(staged or [], keep=row is not None)
            # Every way a job can fail passes here, once: that is where its charge is refunded.
            if row is not None and status == JobStatus.FAILED and row["cost"] > 0:
                db.execute(
                    "UPDATE credits SET balance_units = balance_units + ? WHERE owner = ?", (row["cost"], row["owner"])
                )
        self.events.job_changed(job_id, self._job(row))
        return row is not None

    def complete(self, job_id: str, attempt: int, result: JobResult, files: dict[str, bytes]) -> bool:
        """The outputs and the COMPLETED row in one transaction (large outputs written to the job's folder
        first, and moved into place only for the attempt that still holds the job)."""
        staged: list[tuple[Path, Path]] = []
        try:
            staged = self._stage_large(job_id, files)
            result_field = encode_result(result)
            return self._finish(job_id, JobStatus.COMPLETED, attempt, files, staged, result=result_field, progress=1.0)
        except DiskFull:
            self.fail(job_id, "the server's disk is full; the images could not be kept", FailureKind.ENGINE, attempt)
            raise
        finally:
            with contextlib.suppress(OSError, DiskFull, StoreUnavailable):
                self._place(staged, keep=False)  # what the transaction did not move (refused, or failed)

    def fail(self, job_id: str, error: str, kind: FailureKind, attempt: int | None = None) -> bool:
        return self._finish(job_id, JobStatus.FAILED, attempt, error=error, error_kind=kind.value)

    def release(self, job_id: str, reason: str, attempt: int) -> JobStatus:
        """A job's worker died under it: queue it again at its old place, or fail it for good. Only while
        `attempt` holds it: else (ended, or run by another attempt) nothing changes."""
        job = self.get(job_id)
        if job is None or job.status != JobStatus.PROCESSING or job.attempts != attempt:
            return job.status if job else JobStatus.FAILED
        if job.cancel_requested:
            self.fail(job_id, CANCELLED_ERROR, FailureKind.CANCELLED, attempt)
            return JobStatus.FAILED
        if job.attempts >= MAX_ATTEMPTS:
            self.fail(job_id, GAVE_UP % (reason, job.attempts), FailureKind.WORKER_DIED, attempt)
            return JobStatus.FAILED
        if not self._requeue(job_id, attempt, counts=True):
            # It changed since it was read (a cancel came in, or it ended): decided again on what it is now. A
            # cancel flag is never cleared, so this asks at most once more.
            return self.release(job_id, reason, attempt)
        return JobStatus.QUEUED

    def hand_back(self, job_id: str, attempt: int) -> bool:
        """A job the stopping worker holds (waiting or running) goes back as if never claimed: its claim's
        attempt taken back, at its old place (by its seq), to start from the first step. False when the attempt
        no longer holds it, or it is being cancelled."""
        return self._requeue(job_id, attempt, counts=False)

    def _requeue(self, job_id: str, attempt: int, *, counts: bool) -> bool:
        """A PROCESSING job held by `attempt` and not being cancelled is queued again at its old place (by its
        seq), to start from the first step; `counts`: whether that attempt stays spent (else it is taken back).
        False, and nothing changed, when the job is no longer so."""
        row = self._execute(
            "UPDATE jobs SET status = ?, attempts = attempts - ?, progress = 0, started_at = NULL WHERE id = ?"
            " AND status = ? AND attempts = ? AND cancel_requested = 0 RETURNING id",
            (JobStatus.QUEUED.value, 0 if counts else 1, job_id, JobStatus.PROCESSING.value, attempt),
        ).fetchone()
        if row is None:
            return False
        self.events.job_changed(job_id)
        self.events.work_available()
        return True

    def leave(self) -> None:
        """One node: no record of its readers to forget."""

    # One node: a dead worker's jobs are released by its own supervisor, never taken by another.
    reclaim_after: float | None = None

    def keep_alive(self, held: Mapping[str, int]) -> set[str]:
        if not held:
            return set()
        marks = ", ".join("?" * len(held))
        rows = self._execute(
            f"SELECT id, attempts FROM jobs WHERE status = ? AND id IN ({marks})",
            (JobStatus.PROCESSING.value, *held),
        ).fetchall()
        alive = {job_id for job_id, attempts in rows if held[job_id] == attempts}
        return set(held) - alive

    def processing(self) -> list[Job]:
        rows = self._execute(
            f"SELECT {JOB} FROM jobs WHERE status = ? ORDER BY seq", (JobStatus.PROCESSING.value,)
        ).fetchall()
        return [job for job in map(self._job, rows) if job is not None]

    # -- both sides --------------------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> Job | None:
        self._execute(
            "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status IN (?, ?)",
            (job_id, *(live.value for live in LIVE)),
        )
        job = self.get(job_id)
        if job is not None and not job.started:
            # Nothing runs it yet (queued, or waiting in the worker): it ends here. The supervisor
            # tells the worker to drop a waiting one, and stops a running one at its next step.
            self.fail(job_id, CANCELLED_ERROR, FailureKind.CANCELLED)
            job = self.get(job_id)
        self.events.job_changed(job_id)
        return job

    def purge_expired(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        ids = [r[0] for r in self._execute("SELECT id FROM jobs WHERE expires_at <= ?", (now,)).fetchall()]
        for job_id in ids:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            with self._transaction() as db:
                db.execute("DELETE FROM files WHERE job_id = ?", (job_id,))
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return len(ids)
