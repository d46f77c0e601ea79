"""Sending webhooks: an asyncio dispatcher that POSTs the outbox's deliveries, signed, with retries.

Signatures follow the Standard Webhooks scheme (https://www.standardwebhooks.com), made by its own package.
An attempt is recorded in the outbox only after its answer, so one cut off (a stop, a crash) is made again
with the same `webhook-id`: delivery is at least once, and receivers dedupe on the id.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr
from standardwebhooks import Webhook

from server.guard.images import ImageLimits, InputImageError, check_url, pinned_request
from server.jobs.events import Watch
from server.jobs.store import StoreError
from server.webhooks.outbox import Outbox, PendingDelivery

log = logging.getLogger("beyond.webhooks")
T = TypeVar("T")

# Delay before each attempt, the first counted from enqueue and each next one from the attempt before it:
# five attempts within about ten minutes.
DEFAULT_SCHEDULE: tuple[float, ...] = (0.0, 10.0, 30.0, 120.0, 420.0)
DEFAULT_TIMEOUT = 10.0
DEFAULT_CONCURRENCY = 8
USER_AGENT = "beyond-webhooks/1"
RECORD_FAILURE_HOLD = 30.0


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
    """Delivers the outbox from an asyncio task: wakes on enqueue or when the next retry is due, and, on a
    shared outbox, every `outbox.poll` seconds and in time to renew the leases of what it is sending.

    `schedule[i]` is the delay before attempt i + 1; its length is the number of attempts.
    """

    def __init__(
        self,
        outbox: Outbox,
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
        self._renew_at: float | None = None  # monotonic time the in-flight leases are next renewed
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
        """Stop at once; an attempt cut off here is not recorded and is sent again: after the next start, or,
        on a shared outbox, by another node at once (its lease is handed back)."""
        self.outbox.remove_listener(self.wake)
        cut = list(self._inflight)
        tasks = [t for t in (self._runner, *self._inflight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runner = None
        self._inflight.clear()
        self._renew_at = None
        if cut and self.outbox.lease is not None:
            try:
                await in_thread(self.outbox.release, cut)
            except Exception as exc:
                log.warning("webhook leases not handed back (%s); other nodes take them when they run out", exc)
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None
        self._wake = None

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            try:
                await self._renew()
                wait = await self._dispatch_due()
            except StoreError as exc:  # a shared outbox whose Redis is away: said once a try, without a trace
                log.warning("webhook outbox unreadable (%s); trying again in 5 s", exc)
                wait = 5.0
            except Exception:
                log.exception("webhook outbox unreadable; trying again in 5 s")
                wait = 5.0
            await self._wake.wait(self._cap(wait))

    def _cap(self, wait: float | None) -> float | None:
        """`wait`, shortened to look at a shared outbox every `poll` seconds and renew leases in time."""
        limits = [] if wait is None else [wait]
        if self.outbox.poll is not None:
            limits.append(self.outbox.poll)
        if self._renew_at is not None:
            limits.append(max(0.0, self._renew_at - time.monotonic()))
        return min(limits, default=None)

    async def _renew(self) -> None:
        """Keep the leases of the deliveries being sent (a shared outbox), a third of a lease apart."""
        lease = self.outbox.lease
        if lease is None or self._renew_at is None or time.monotonic() < self._renew_at:
            return
        if not self._inflight:
            self._renew_at = None
            return
        self._renew_at = time.monotonic() + lease / 3
        for job_id in await in_thread(self.outbox.renew, list(self._inflight)):
            # Its lease ran out (this node was too slow, or cut off): another node may be sending it too.
            log.warning("webhook for job %s was taken over by another node while being sent", job_id)

    async def _dispatch_due(self) -> float | None:
        """Start the attempts that are due; how long to sleep before looking again (None: until woken)."""
        now = time.time()
        self._held = {job_id: until for job_id, until in self._held.items() if until > now}
        free = self.concurrency - len(self._inflight)
        for delivery in await in_thread(self.outbox.due, now, free, [*self._inflight, *self._held]):
            task = asyncio.create_task(self._attempt(delivery), name=f"webhook-{delivery.job_id}")
            self._inflight[delivery.job_id] = task
        if self._inflight and self._renew_at is None and self.outbox.lease is not None:
            self._renew_at = time.monotonic() + self.outbox.lease / 3
        if len(self._inflight) >= self.concurrency:
            return None  # a finishing attempt wakes the loop
        next_at = await in_thread(self.outbox.next_due, [*self._inflight, *self._held])
        next_at = min([*self._held.values(), *([] if next_at is None else [next_at])], default=None)
        return None if next_at is None else max(0.0, next_at - time.time())

    async def _attempt(self, delivery: PendingDelivery) -> None:
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
                log.warning(
                    "webhook for job %s to %s failed (%s), attempt %d; %s", delivery.job_id, host, error, attempt, then
                )
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

    async def _send(self, delivery: PendingDelivery) -> tuple[int | None, str | None, bool]:
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
