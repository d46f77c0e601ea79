"""Webhook delivery: a durable SQLite outbox and an asyncio dispatcher that POSTs signed results.

Delivery is at-least-once: a delivery is written before it is attempted and marked delivered only after a 2xx
answer, so a restart in the middle of an attempt sends it again, with the same `webhook-id` (receivers dedupe on it).
Signatures follow the Standard Webhooks scheme (https://www.standardwebhooks.com), made by its own package.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr
from standardwebhooks import Webhook

from server.guard.images import ImageLimits, InputImageError, check_url, pinned_request
from server.jobs.contract import Job
from server.jobs.events import Watch
from server.jobs.store import JobStore, StoreError

log = logging.getLogger("beyond.webhooks")
T = TypeVar("T")

# Delay before each attempt, the first counted from enqueue and each next one from the attempt before it:
# five attempts within about ten minutes.
DEFAULT_SCHEDULE: tuple[float, ...] = (0.0, 10.0, 30.0, 120.0, 420.0)
DEFAULT_TIMEOUT = 10.0
DEFAULT_CONCURRENCY = 8
USER_AGENT = "beyond-webhooks/1"
RECORD_FAILURE_HOLD = 30.0

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


def load_secret(secret: str) -> Webhook:
    """The signer for a `whsec_<base64>` secret; raises ValueError (without the secret in it) when malformed.

    standardwebhooks decodes leniently and would sign with whatever garbage it got, so check first.
    """
    key = secret.strip()
    key = key[len("whsec_") :] if key.startswith("whsec_") else key
    try:
        raw = base64.b64decode(key + "=" * (-len(key) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("webhook secret: must be whsec_ followed by base64") from None
    if len(raw) < 16:
        raise ValueError("webhook secret: must decode to at least 16 bytes")
    return Webhook(raw)


def sign_headers(secret: str | Webhook, msg_id: str, timestamp: float, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt of a message."""
    signer = secret if isinstance(secret, Webhook) else load_secret(secret)
    moment = datetime.fromtimestamp(int(timestamp), tz=timezone.utc)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": signer.sign(msg_id, moment, body.decode("utf-8")),
    }


@dataclass(frozen=True)
class Delivery:
    job_id: str
    url: str
    msg_id: str
    body: bytes
    attempts: int


class WebhookOutbox:
    """The `webhooks` table of a SQLite file; safe to call from any thread (one connection per thread).

    Blocking: from async code call it through asyncio.to_thread. Close it only once nothing uses it any more.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
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
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._listeners:
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
        with self._lock:
            listeners = list(self._listeners)
        for callback in listeners:
            callback()
        return True

    def due(self, now: float, limit: int, exclude: Collection[str] = ()) -> list[Delivery]:
        """Undelivered deliveries whose next attempt is due, the oldest first, leaving out `exclude` (in flight)."""
        if limit <= 0:
            return []
        marks = ",".join("?" * len(exclude))
        rows = self._db().execute(
            "SELECT job_id, url, msg_id, body, attempts FROM webhooks WHERE next_at IS NOT NULL AND next_at <= ?"
            f" AND job_id NOT IN ({marks}) ORDER BY next_at LIMIT ?",
            (now, *exclude, limit),
        )
        return [Delivery(r["job_id"], r["url"], r["msg_id"], bytes(r["body"]), r["attempts"]) for r in rows]

    def next_due(self, exclude: Collection[str] = ()) -> float | None:
        """When the earliest pending attempt (outside `exclude`) is due; None when nothing is pending."""
        marks = ",".join("?" * len(exclude))
        row = self._db().execute(
            f"SELECT MIN(next_at) FROM webhooks WHERE next_at IS NOT NULL AND job_id NOT IN ({marks})", tuple(exclude)
        ).fetchone()
        return row[0]

    def record(self, job_id: str, ok: bool, status: int | None, error: str | None, next_at: float | None) -> None:
        """One attempt's outcome; `next_at` None means no further attempt (delivered, or given up)."""
        self._db().execute(
            "UPDATE webhooks SET attempts = attempts + 1, delivered = ?, last_status = ?, error = ?, next_at = ?"
            " WHERE job_id = ?",
            (int(ok), status, None if ok else error, None if ok else next_at, job_id),
        )

    def status(self, job_id: str) -> dict[str, Any] | None:
        row = self._db().execute(
            "SELECT delivered, attempts, last_status, error FROM webhooks WHERE job_id = ?", (job_id,)
        ).fetchone()
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
        cursor = self._db().execute(
            "DELETE FROM webhooks WHERE created_at < ? AND next_at IS NULL", (older_than,)
        )
        return cursor.rowcount


def describe(exc: httpx.HTTPError) -> str:
    """Our wording for a failed attempt: never the exception text, which may carry addresses or URLs."""
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, ConnectionRefusedError):
                return "connection refused"
            cause = cause.__cause__ or cause.__context__
        return "could not connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "bad HTTP answer"
    return f"request failed ({type(exc).__name__})"


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    """asyncio.to_thread, except that a cancelled caller still waits for the thread to finish: a thread cannot be
    interrupted, and the outbox must not be closed under a query that is still running."""
    future = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved, so asyncio does not report it as lost
        raise


class WebhookDispatcher:
    """Delivers the outbox from an asyncio task: wakes on enqueue or when the next retry is due.

    `schedule[i]` is the delay before attempt i + 1; its length is the number of attempts.
    """

    def __init__(
        self,
        outbox: WebhookOutbox,
        secret: str | SecretStr,
        limits: ImageLimits,
        schedule: Sequence[float] = DEFAULT_SCHEDULE,
        timeout: float = DEFAULT_TIMEOUT,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        if not schedule or any(delay < 0 for delay in schedule):
            raise ValueError("webhook schedule: needs at least one delay, none negative")
        if timeout <= 0 or concurrency < 1:
            raise ValueError("webhook timeout and concurrency must be positive")
        self.outbox = outbox
        plain = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        self._signer = load_secret(plain)  # only the signer is kept, so no repr or log line can show the secret
        self.limits = limits
        self.schedule = tuple(schedule)
        self.timeout = timeout
        self.concurrency = concurrency
        self._wake: Watch | None = None
        self._runner: asyncio.Task[None] | None = None
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._held: dict[str, float] = {}  # job_id -> time: attempts whose outcome could not be written
        self._transport: httpx.AsyncHTTPTransport | None = None

    def wake(self) -> None:
        """Look at the outbox now; safe from any thread (for enqueues the outbox did not announce). After a
        stop nothing is lost: the next start reads the outbox anyway."""
        wake = self._wake
        if wake is not None:
            wake.set()

    async def start(self) -> None:
        if self._runner is not None:
            return
        self._wake = Watch()
        # No keep-alive: connections are pinned to checked addresses, and a pooled one must not serve another host.
        # The transport is used without a Client, whose INFO line would log each URL (and any token in its query).
        self._transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=0), retries=0
        )
        self.outbox.add_listener(self.wake)
        self._runner = asyncio.create_task(self._run(), name="webhook-dispatcher")

    async def stop(self) -> None:
        """Stop at once; an attempt cut off here is not recorded and is sent again after the next start."""
        self.outbox.remove_listener(self.wake)
        tasks = [t for t in (self._runner, *self._inflight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runner = None
        self._inflight.clear()
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None
        self._wake = None

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            try:
                wait = await self._dispatch_due()
            except Exception:
                log.exception("webhook outbox unreadable; trying again in 5 s")
                wait = 5.0
            await self._wake.wait(wait)

    async def _dispatch_due(self) -> float | None:
        """Start the attempts that are due; how long to sleep before looking again (None: until woken)."""
        now = time.time()
        self._held = {job_id: until for job_id, until in self._held.items() if until > now}
        free = self.concurrency - len(self._inflight)
        for delivery in await in_thread(self.outbox.due, now, free, [*self._inflight, *self._held]):
            task = asyncio.create_task(self._attempt(delivery), name=f"webhook-{delivery.job_id}")
            self._inflight[delivery.job_id] = task
        if len(self._inflight) >= self.concurrency:
            return None  # a finishing attempt wakes the loop
        next_at = await in_thread(self.outbox.next_due, [*self._inflight, *self._held])
        next_at = min([*self._held.values(), *([] if next_at is None else [next_at])], default=None)
        return None if next_at is None else max(0.0, next_at - time.time())

    async def _attempt(self, delivery: Delivery) -> None:
        try:
            try:
                status, error, final = await self._send(delivery)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook attempt for job %s broke", delivery.job_id)
                status, error, final = None, "internal error", False
            ok = status is not None and 200 <= status < 300
            attempt = delivery.attempts + 1
            retry = not ok and not final and attempt < len(self.schedule)
            next_at = time.time() + self.schedule[attempt] if retry else None
            # Logged before the write, which a stop may cut short (the write itself still completes).
            host = urlsplit(delivery.url).hostname  # never the whole URL: its query may hold the receiver's token
            if ok:
                log.info("webhook for job %s delivered to %s (attempt %d)", delivery.job_id, host, attempt)
            else:
                then = f"retrying in {self.schedule[attempt]:g} s" if retry else "giving up"
                log.warning("webhook for job %s to %s failed (%s), attempt %d; %s", delivery.job_id, host, error,
                            attempt, then)
            await in_thread(self.outbox.record, delivery.job_id, ok, status, error, next_at)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Left due in the outbox: without this hold it would be sent again at once, and again.
            self._held[delivery.job_id] = time.time() + RECORD_FAILURE_HOLD
            log.exception("webhook attempt for job %s could not be recorded", delivery.job_id)
        finally:
            self._inflight.pop(delivery.job_id, None)
            if self._wake is not None:
                self._wake.set()

    async def _send(self, delivery: Delivery) -> tuple[int | None, str | None, bool]:
        """(HTTP status or None, error wording or None, whether this ends delivery regardless)."""
        assert self._transport is not None
        try:
            # Checked at each attempt: DNS may have changed since the request was accepted.
            addresses = await asyncio.to_thread(check_url, delivery.url, self.limits)
            target, headers, extensions = pinned_request(delivery.url, addresses[0])
        except InputImageError as exc:
            return None, "webhook_url refused: " + str(exc).split(": ", 1)[-1], True
        except (httpx.InvalidURL, ValueError):
            return None, "webhook_url refused: not a valid URL", True
        headers.update(sign_headers(self._signer, delivery.msg_id, time.time(), delivery.body))
        headers.update({"Content-Type": "application/json", "User-Agent": USER_AGENT})
        extensions = {**extensions, "timeout": httpx.Timeout(self.timeout).as_dict()}
        request = httpx.Request("POST", target, content=delivery.body, headers=headers, extensions=extensions)
        try:
            # httpx's timeout bounds each wait; this bounds the whole attempt, against a receiver dripping bytes.
            response = await asyncio.wait_for(self._transport.handle_async_request(request), timeout=self.timeout)
            await response.aclose()  # only the status matters: never read what the receiver sends back
        except asyncio.TimeoutError:
            return None, "timeout", False
        except httpx.HTTPError as exc:
            return None, describe(exc), False
        if 200 <= response.status_code < 300:
            return response.status_code, None, False
        return response.status_code, f"HTTP {response.status_code}", False


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
    `render(job)` makes the body: the JSON GET /v2/requests/{id} answers for the job.
    """

    def __init__(
        self,
        store: JobStore,
        outbox: WebhookOutbox,
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
        purged = time.monotonic()
        while True:
            await self._wake.wait(PURGE_EVERY)
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
            if time.monotonic() - purged > PURGE_EVERY:
                purged = time.monotonic()
                with contextlib.suppress(Exception):
                    await in_thread(self.outbox.purge, time.time() - self.keep)

    def _recover(self) -> None:
        """At start: deliveries for jobs that ended without one; the live jobs tracked again."""
        for job in self.store.webhook_jobs():
            if job.finished:
                if self.outbox.status(job.id) is None:
                    log.info("queueing the webhook of job %s, which ended without one", job.id)
                    self._enqueue(job)
            else:
                self.track(job)

    def _settle(self, job_id: str) -> None:
        state = self.store.state(job_id)
        if state is not None and not state.finished:
            return  # still live: the change was progress
        job = self.store.get(job_id) if state is not None else None
        if job is not None and job.delivery.webhook_url:
            self._enqueue(job)
        with self._lock:
            self._tracked.discard(job_id)

    def _enqueue(self, job: Job) -> None:
        assert job.delivery.webhook_url is not None
        # The webhook-id follows from the job, so a delivery queued twice still dedupes at the receiver.
        self.outbox.enqueue(job.id, job.delivery.webhook_url, self.render(job), msg_id=f"msg_{job.id}")
