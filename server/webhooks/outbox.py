"""The outbox: the durable queue of webhook deliveries, its interface and its SQLite implementation.

A delivery is written before it is attempted and marked delivered only after a 2xx answer (the dispatcher's
part), so a crash in between sends it again, with the same `webhook-id`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhooks (
    job_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL,
    delivered INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    error TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS webhooks_next_at ON webhooks (next_at) WHERE next_at IS NOT NULL;
"""


@dataclass(frozen=True)
class PendingDelivery:
    """One job's webhook as the dispatcher attempts it: where, the message id, the body, attempts so far."""

    job_id: str
    url: str
    msg_id: str
    body: bytes
    attempts: int


class Outbox(Protocol):
    """What the dispatcher and the relay ask of the outbox. Blocking: call it off the event loop.

    Times are the caller's clock (time.time()); `next_at` None means no further attempt. An outbox of one
    node (SQLite) has `lease` and `poll` None, and its renew/release/watch are no-ops: its dispatcher is the
    only one, and its relay hears every job's end itself. A shared outbox (Redis) gives each delivery to one
    node at a time, with a lease of `lease` seconds that its dispatcher renews while sending, and wants every
    node to look at it every `poll` seconds even when nothing here woke it.
    """

    lease: float | None
    poll: float | None

    def add_listener(self, callback: Callable[[], None]) -> None: ...
    def remove_listener(self, callback: Callable[[], None]) -> None: ...
    def enqueue(
        self, job_id: str, url: str, body: bytes, now: float | None = None, *, msg_id: str | None = None
    ) -> bool: ...
    # The due deliveries, taken for this node (a lease, on a shared outbox).
    def due(self, now: float, limit: int, exclude: Collection[str] = ()) -> list[PendingDelivery]: ...
    def next_due(self, exclude: Collection[str] = ()) -> float | None: ...
    def renew(self, job_ids: Collection[str]) -> set[str]: ...
    def release(self, job_ids: Collection[str]) -> None: ...
    def record(self, job_id: str, ok: bool, status: int | None, error: str | None, next_at: float | None) -> None: ...
    def status(self, job_id: str) -> dict[str, Any] | None: ...
    def purge(self, older_than: float) -> int: ...
    # Live jobs with a webhook, for any node of a fleet to settle when they end.
    def watch(self, job_id: str) -> None: ...
    def unwatch(self, job_id: str) -> None: ...
    def watched(self) -> list[str]: ...
    def close(self) -> None: ...


class EnqueueListeners:
    """The callbacks an outbox runs, in the enqueuing thread, after each new delivery it stores (the
    dispatcher's wake-up): the same for both outboxes, so it is written once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def add(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def remove(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def notify(self) -> None:
        # Called outside the lock: a callback may add or remove listeners.
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()


class SqliteOutbox:
    """The `webhooks` table of a SQLite file; safe to call from any thread (one connection per thread).

    Blocking: from async code call it through asyncio.to_thread. Close it only once nothing uses it any more.
    One node's: nothing to lease, and nothing to watch for others.
    """

    lease: float | None = None
    poll: float | None = None

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._listeners = EnqueueListeners()
        self._db().executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self._local = threading.local()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """`callback()` runs, in the enqueuing thread, after each new delivery is stored."""
        self._listeners.add(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.remove(callback)

    def enqueue(
        self, job_id: str, url: str, body: bytes, now: float | None = None, *, msg_id: str | None = None
    ) -> bool:
        """Store a delivery, due at once; False (and nothing changed) when the job already has one.

        `msg_id` is the `webhook-id` receivers dedupe on (default: a random one)."""
        body.decode("utf-8")  # signing works on text: refuse anything else here, not at each attempt
        now = time.time() if now is None else now
        cursor = self._db().execute(
            "INSERT OR IGNORE INTO webhooks (job_id, url, msg_id, body, next_at, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, url, msg_id or f"msg_{uuid.uuid4().hex}", body, now, now),
        )
        if cursor.rowcount == 0:
            return False
        self._listeners.notify()
        return True

    def due(self, now: float, limit: int, exclude: Collection[str] = ()) -> list[PendingDelivery]:
        """Undelivered deliveries whose next attempt is due, the oldest first, leaving out `exclude` (in flight)."""
        if limit <= 0:
            return []
        marks = ",".join("?" * len(exclude))
        rows = self._db().execute(
            "SELECT job_id, url, msg_id, body, attempts FROM webhooks WHERE next_at IS NOT NULL AND next_at <= ?"
            f" AND job_id NOT IN ({marks}) ORDER BY next_at LIMIT ?",
            (now, *exclude, limit),
        )
        return [PendingDelivery(r["job_id"], r["url"], r["msg_id"], bytes(r["body"]), r["attempts"]) for r in rows]

    def next_due(self, exclude: Collection[str] = ()) -> float | None:
        """When the earliest pending attempt (outside `exclude`) is due; None when nothing is pending."""
        marks = ",".join("?" * len(exclude))
        row = (
            self._db()
            .execute(
                f"SELECT MIN(next_at) FROM webhooks WHERE next_at IS NOT NULL AND job_id NOT IN ({marks})",
                tuple(exclude),
            )
            .fetchone()
        )
        return row[0]

    def record(self, job_id: str, ok: bool, status: int | None, error: str | None, next_at: float | None) -> None:
        """One attempt's outcome; `next_at` None means no further attempt (delivered, or given up)."""
        self._db().execute(
            "UPDATE webhooks SET attempts = attempts + 1, delivered = ?, last_status = ?, error = ?, next_at = ?"
            " WHERE job_id = ?",
            (int(ok), status, None if ok else error, None if ok else next_at, job_id),
        )

    def status(self, job_id: str) -> dict[str, Any] | None:
        row = (
            self._db()
            .execute("SELECT delivered, attempts, last_status, error FROM webhooks WHERE job_id = ?", (job_id,))
            .fetchone()
        )
        if row is None:
            return None
        return {
            "delivered": bool(row["delivered"]),
            "attempts": row["attempts"],
            "last_status": row["last_status"],
            "error": row["error"],
        }

    def purge(self, older_than: float) -> int:
        """Forget finished deliveries (delivered or given up) created before `older_than`; pending ones stay."""
        cursor = self._db().execute("DELETE FROM webhooks WHERE created_at < ? AND next_at IS NULL", (older_than,))
        return cursor.rowcount

    def renew(self, job_ids: Collection[str]) -> set[str]:
        return set()

    def release(self, job_ids: Collection[str]) -> None:
        pass

    def watch(self, job_id: str) -> None:
        pass

    def unwatch(self, job_id: str) -> None:
        pass

    def watched(self) -> list[str]:
        return []
