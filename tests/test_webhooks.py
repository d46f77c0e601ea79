"""Webhook delivery against real HTTP receivers on 127.0.0.1: signatures, retries, timeouts, restarts, the guard."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from server.guard.images import ImageLimits
from server.webhooks import SqliteOutbox, WebhookDispatcher, load_secret, sign_headers

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
LOOPBACK = ImageLimits(allow_private_urls=True)
FAST = (0.0, 0.2, 0.2)
BODY = json.dumps({"id": "job-1", "status": "COMPLETED", "output": ["http://127.0.0.1/x.png"]}).encode()


class Receiver:
    """A loopback webhook receiver; `script` gives (status, delay) for each request in turn, then 200 at once."""

    def __init__(self, script: list[tuple[int, float]] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.active = 0
        self.max_active = 0
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with lock:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    status, delay = receiver.script.pop(0) if receiver.script else (200, 0.0)
                    receiver.active += 1
                    receiver.max_active = max(receiver.max_active, receiver.active)
                try:
                    time.sleep(delay)
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the sender gave up waiting
                    pass
                finally:
                    with lock:
                        receiver.active -= 1

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(script: list[tuple[int, float]] | None = None) -> Receiver:
        made.append(Receiver(script))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """A tripwire: any connection these tests open to somewhere other than loopback fails and is recorded."""
    outside: list[object] = []
    real = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1"):
            outside.append(address)
            raise ConnectionRefusedError("test tripwire: not loopback")
        real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return outside


@asynccontextmanager
async def dispatching(path: Path, **options: Any) -> AsyncIterator[tuple[SqliteOutbox, WebhookDispatcher]]:
    outbox = SqliteOutbox(path)
    options.setdefault("limits", LOOPBACK)
    options.setdefault("schedule", FAST)
    dispatcher = WebhookDispatcher(outbox, SECRET, **options)
    await dispatcher.start()
    try:
        yield outbox, dispatcher
    finally:
        await dispatcher.stop()
        outbox.close()


async def wait_for(outbox: SqliteOutbox, job_id: str, done: Callable[[dict], bool], limit: float = 10.0) -> dict:
    deadline = time.monotonic() + limit
    while True:
        status = await asyncio.to_thread(outbox.status, job_id)
        if status is not None and done(status):
            return status
        assert time.monotonic() < deadline, f"gave up waiting; last status {status}"
        await asyncio.sleep(0.02)


def delivered(status: dict) -> bool:
    return status["delivered"]


def test_delivery_is_signed_and_verifies(tmp_path: Path, receiver_factory: Callable[..., Receiver]) -> None:
    receiver = receiver_factory()

    async def scenario() -> dict:
        async with dispatching(tmp_path / "hooks.sqlite3") as (outbox, _):
            assert await asyncio.to_thread(outbox.enqueue, "job-1", receiver.url, BODY)
            return await wait_for(outbox, "job-1", delivered)

    status = asyncio.run(scenario())
    assert status == {"delivered": True, "attempts": 1, "last_status": 200, "error": None}
    [(headers, body)] = receiver.requests
    assert body == BODY
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"].startswith("msg_")
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert Webhook(SECRET).verify(body, headers) == json.loads(BODY)
    other = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"COMPLETED", b"FAILED"), headers)


def test_server_error_is_retried_with_the_same_id(tmp_path: Path, receiver_factory: Callable[..., Receiver]) -> None:
    receiver = receiver_factory([(500, 0.0)])

    async def scenario() -> tuple[dict, dict]:
        async with dispatching(tmp_path / "hooks.sqlite3") as (outbox, _):
            await asyncio.to_thread(outbox.enqueue, "job-1", receiver.url, BODY)
            first = await wait_for(outbox, "job-1", lambda s: s["attempts"] >= 1)
            return first, await wait_for(outbox, "job-1", delivered)

    first, final = asyncio.run(scenario())
    assert first == {"delivered": False, "attempts": 1, "last_status": 500, "error": "HTTP 500"}
    assert final == {"delivered": True, "attempts": 2, "last_status": 200, "error": None}
    assert len(receiver.requests) == 2
    ids = {headers["webhook-id"] for headers, _ in receiver.requests}
    assert len(ids) == 1
    for headers, body in receiver.requests:
        Webhook(SECRET).verify(body, headers)


def test_timeout_is_retried(tmp_path: Path, receiver_factory: Callable[..., Receiver]) -> None:
    receiver = receiver_factory([(200, 3.0)])

    async def scenario() -> tuple[dict, dict, float]:
        async with dispatching(tmp_path / "hooks.sqlite3", timeout=0.5) as (outbox, _):
            start = time.monotonic()
            await asyncio.to_thread(outbox.enqueue, "job-1", receiver.url, BODY)
            first = await wait_for(outbox, "job-1", lambda s: s["attempts"] >= 1)
            took = time.monotonic() - start
            return first, await wait_for(outbox, "job-1", delivered), took

    first, final, took = asyncio.run(scenario())
    assert first == {"delivered": False, "attempts": 1, "last_status": None, "error": "timeout"}
    assert took < 2.5  # the attempt was cut off at the timeout, not at the receiver's answer 3 s later
    assert final == {"delivered": True, "attempts": 2, "last_status": 200, "error": None}
    assert len({headers["webhook-id"] for headers, _ in receiver.requests}) == 1


def test_delivery_survives_a_restart(tmp_path: Path, receiver_factory: Callable[..., Receiver]) -> None:
    receiver = receiver_factory([(503, 0.0)])
    path = tmp_path / "hooks.sqlite3"

    async def before() -> dict:
        async with dispatching(path, schedule=(0.0, 1.0)) as (outbox, _):
            await asyncio.to_thread(outbox.enqueue, "job-1", receiver.url, BODY)
            return await wait_for(outbox, "job-1", lambda s: s["attempts"] >= 1)

    async def after() -> dict:
        async with dispatching(path, schedule=(0.0, 1.0)) as (outbox, _):
            return await wait_for(outbox, "job-1", delivered)

    # Separate event loops, outboxes and connections: only the file is shared, as across a server restart.
    assert asyncio.run(before()) == {"delivered": False, "attempts": 1, "last_status": 503, "error": "HTTP 503"}
    assert len(receiver.requests) == 1
    assert asyncio.run(after()) == {"delivered": True, "attempts": 2, "last_status": 200, "error": None}
    assert len(receiver.requests) == 2
    assert receiver.requests[0][0]["webhook-id"] == receiver.requests[1][0]["webhook-id"]
    Webhook(SECRET).verify(receiver.requests[1][1], receiver.requests[1][0])


def test_pending_delivery_enqueued_while_stopped_goes_out_on_start(
    tmp_path: Path, receiver_factory: Callable[..., Receiver]
) -> None:
    receiver = receiver_factory()
    path = tmp_path / "hooks.sqlite3"
    outbox = SqliteOutbox(path)
    assert outbox.enqueue("job-1", receiver.url, BODY)
    outbox.close()

    async def scenario() -> dict:
        async with dispatching(path) as (outbox, _):
            return await wait_for(outbox, "job-1", delivered)

    assert asyncio.run(scenario())["attempts"] == 1
    assert len(receiver.requests) == 1


def test_refused_address_ends_delivery_without_sending(
    tmp_path: Path,
    receiver_factory: Callable[..., Receiver],
    monkeypatch: pytest.MonkeyPatch,
    loopback_only: list[object],
) -> None:
    receiver = receiver_factory()
    real = socket.getaddrinfo
    lookups: list[str] = []

    def fake(host: str, port: object, *args: object, **kwargs: object) -> list:
        if host == "hooks.example.test":
            lookups.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port or 0))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)

    async def scenario() -> dict:
        async with dispatching(tmp_path / "hooks.sqlite3", schedule=(0.0, 0.05, 0.05)) as (outbox, _):
            await asyncio.to_thread(outbox.enqueue, "job-1", f"http://hooks.example.test:{receiver.port}/hook", BODY)
            status = await wait_for(outbox, "job-1", lambda s: s["attempts"] >= 1)
            await asyncio.sleep(0.4)  # past every retry the schedule would allow
            assert await asyncio.to_thread(outbox.status, "job-1") == status
            return status

    status = asyncio.run(scenario())
    assert status["delivered"] is False
    assert status["attempts"] == 1
    assert status["last_status"] is None
    assert status["error"].startswith("webhook_url refused: ")
    assert "forbidden address" in status["error"]
    assert lookups == ["hooks.example.test"]
    assert receiver.requests == []
    assert loopback_only == []


def test_private_address_refused_unless_allowed(tmp_path: Path, receiver_factory: Callable[..., Receiver]) -> None:
    receiver = receiver_factory()

    async def scenario() -> dict:
        async with dispatching(tmp_path / "hooks.sqlite3", limits=ImageLimits(allow_private_urls=False)) as (outbox, _):
            await asyncio.to_thread(outbox.enqueue, "job-1", receiver.url, BODY)
            return await wait_for(outbox, "job-1", lambda s: s["attempts"] >= 1)

    status = asyncio.run(scenario())
    assert status["attempts"] == 1 and not status["delivered"]
    assert "private or loopback" in status["error"]
    assert receiver.requests == []


def test_gives_up_after_the_schedule(tmp_path: Path, receiver_factory: Callable[..., Receiver]) -> None:
    receiver = receiver_factory([(500, 0.0)] * 10)

    async def scenario() -> dict:
        async with dispatching(tmp_path / "hooks.sqlite3", schedule=(0.0, 0.05, 0.05)) as (outbox, _):
            await asyncio.to_thread(outbox.enqueue, "job-1", receiver.url, BODY)
            await wait_for(outbox, "job-1", lambda s: s["attempts"] >= 3)
            await asyncio.sleep(0.4)
            return await asyncio.to_thread(outbox.status, "job-1")

    assert asyncio.run(scenario()) == {"delivered": False, "attempts": 3, "last_status": 500, "error": "HTTP 500"}
    assert len(receiver.requests) == 3


def test_connection_refused_is_worded_and_retried(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before use: nothing listens there

    async def scenario() -> dict:
        async with dispatching(tmp_path / "hooks.sqlite3", schedule=(0.0, 0.05)) as (outbox, _):
            await asyncio.to_thread(outbox.enqueue, "job-1", f"http://127.0.0.1:{port}/hook", BODY)
            return await wait_for(outbox, "job-1", lambda s: s["attempts"] >= 2)

    assert asyncio.run(scenario()) == {
        "delivered": False,
        "attempts": 2,
        "last_status": None,
        "error": "connection refused",
    }


def test_enqueue_from_another_thread_wakes_the_idle_dispatcher(
    tmp_path: Path, receiver_factory: Callable[..., Receiver]
) -> None:
    receiver = receiver_factory()

    async def scenario() -> float:
        async with dispatching(tmp_path / "hooks.sqlite3") as (outbox, _):
            await asyncio.sleep(0.3)  # idle: nothing pending, so the dispatcher sleeps with no deadline
            start = time.monotonic()
            thread = threading.Thread(target=outbox.enqueue, args=("job-1", receiver.url, BODY))
            thread.start()
            await wait_for(outbox, "job-1", delivered)
            thread.join()
            return time.monotonic() - start

    assert asyncio.run(scenario()) < 2.0
    assert len(receiver.requests) == 1


def test_deliveries_run_concurrently_within_the_bound(
    tmp_path: Path, receiver_factory: Callable[..., Receiver]
) -> None:
    receiver = receiver_factory([(200, 0.4)] * 6)

    async def scenario() -> None:
        async with dispatching(tmp_path / "hooks.sqlite3", concurrency=3) as (outbox, _):
            for index in range(6):
                await asyncio.to_thread(outbox.enqueue, f"job-{index}", receiver.url, BODY)
            for index in range(6):
                await wait_for(outbox, f"job-{index}", delivered)

    asyncio.run(scenario())
    assert receiver.max_active == 3  # more than one at a time, and never more than the bound
    assert len(receiver.requests) == 6


def test_enqueue_is_once_per_job(tmp_path: Path, receiver_factory: Callable[..., Receiver]) -> None:
    receiver = receiver_factory()
    outbox = SqliteOutbox(tmp_path / "hooks.sqlite3")
    assert outbox.enqueue("job-1", receiver.url, BODY)
    assert not outbox.enqueue("job-1", receiver.url, b'{"other": 1}')
    assert outbox.status("job-1") == {"delivered": False, "attempts": 0, "last_status": None, "error": None}
    assert outbox.status("job-2") is None
    with pytest.raises(UnicodeDecodeError):
        outbox.enqueue("job-3", receiver.url, b"\xff\xfe")
    outbox.close()


def test_purge_forgets_finished_deliveries_only(tmp_path: Path) -> None:
    outbox = SqliteOutbox(tmp_path / "hooks.sqlite3")
    for job_id in ("done", "failed", "pending", "recent"):
        outbox.enqueue(job_id, "http://127.0.0.1:9/hook", BODY, now=1000.0 if job_id != "recent" else 5000.0)
    outbox.record("done", True, 200, None, None)
    outbox.record("failed", False, 500, "HTTP 500", None)
    outbox.record("pending", False, 500, "HTTP 500", 1010.0)
    outbox.record("recent", True, 200, None, None)
    assert outbox.purge(older_than=2000.0) == 2
    assert outbox.status("done") is None and outbox.status("failed") is None
    assert outbox.status("pending") is not None and outbox.status("recent") is not None
    assert [d.job_id for d in outbox.due(now=1020.0, limit=10)] == ["pending"]
    outbox.close()


def test_sign_headers_and_secret_checks() -> None:
    headers = sign_headers(SECRET, "msg_1", time.time(), BODY)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(BODY, headers) == json.loads(BODY)
    for bad in ("whsec_not base64!", "whsec_", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError) as caught:
            load_secret(bad)
        assert bad not in str(caught.value)


def test_secret_never_reaches_the_logs(
    tmp_path: Path, receiver_factory: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver = receiver_factory([(500, 0.0)])
    url = receiver.url + "?token=receiver-private-token"

    async def scenario() -> None:
        async with dispatching(tmp_path / "hooks.sqlite3") as (outbox, dispatcher):
            assert SECRET not in repr(dispatcher) and SECRET not in repr(vars(dispatcher))
            await asyncio.to_thread(outbox.enqueue, "job-1", url, BODY)
            await wait_for(outbox, "job-1", delivered)

    asyncio.run(scenario())
    assert len(receiver.requests) == 2
    webhook_lines = [r.getMessage() for r in caplog.records if r.name == "beyond.webhooks"]
    assert any("failed (HTTP 500)" in line for line in webhook_lines)
    assert any("delivered" in line for line in webhook_lines)
    key = SECRET.removeprefix("whsec_")
    assert key not in caplog.text
    assert "receiver-private-token" not in caplog.text
    for _, body in receiver.requests:
        assert key.encode() not in body


def test_unrecordable_attempt_is_not_resent_in_a_loop(
    tmp_path: Path, receiver_factory: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    """A write that fails (a full disk) leaves the delivery due: it must be held back, not flood the receiver."""
    receiver = receiver_factory()

    class FullDisk(SqliteOutbox):
        def record(self, *args: Any) -> None:
            raise sqlite3.OperationalError("database or disk is full")

    async def scenario() -> None:
        outbox = FullDisk(tmp_path / "hooks.sqlite3")
        dispatcher = WebhookDispatcher(outbox, SECRET, LOOPBACK, schedule=FAST)
        await dispatcher.start()
        try:
            await asyncio.to_thread(outbox.enqueue, "job-1", receiver.url, BODY)
            await asyncio.sleep(0.8)
        finally:
            await dispatcher.stop()
            outbox.close()

    asyncio.run(scenario())
    assert len(receiver.requests) == 1
    assert "could not be recorded" in caplog.text
