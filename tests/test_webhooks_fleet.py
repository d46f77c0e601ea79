"""One delivery per webhook across a fleet, on a real redis-server.

First the shared outbox in this process, as two nodes would use it: one delivery per job, leases taken over
when they run out, handed back at a stop, renewed while a slow receiver answers. Then real processes: three
API nodes (`beyond serve --no-worker`), a worker (`beyond worker`) and a loopback receiver; a node killed
with deliveries pending; a node that joins or restarts after the deliveries. The fleet is shared by those
last three tests in file order: the second kills a node, the third starts one.
"""

from __future__ import annotations

import asyncio
import base64
import os
import select
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis
from standardwebhooks import Webhook

from server.webhooks import WebhookDispatcher
from server.webhooks.redis_outbox import RedisOutbox
from tests.helpers import ServerProcess, smooth_image
from tests.redis_helpers import RedisServer
from tests.test_scale_out import Cluster, start_cluster, submit
from tests.test_webhooks import BODY, FAST, LOOPBACK
from tests.test_webhooks import Receiver as ScriptedReceiver

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
RECLAIM_AFTER = 5.0  # node_env's BEYOND_RECLAIM_AFTER
# The cheapest job: the tiny model, a small canvas, the fewest steps, one evaluation a step.
QUICK = {"image": smooth_image(48, 48), "left": 16, "steps": 20, "sampler": "euler", "guidance_scale": 1.0}
# Long enough for every node to have looked at the shared outbox twice (a node looks every RECLAIM_AFTER / 4).
SETTLE = RECLAIM_AFTER / 2


# -- the shared outbox, in this process ------------------------------------------------------------------


@pytest.fixture
def shared(redis_server: RedisServer) -> Iterator[Callable[..., RedisOutbox]]:
    """Outboxes of "nodes" on one Redis and one key prefix of this test's own."""
    prefix = f"hooks{time.monotonic_ns()}:"
    clients: list[redis.Redis] = []

    def node(lease: float = 30.0, poll: float = 30.0, keep: float = 3600.0) -> RedisOutbox:
        clients.append(redis.Redis.from_url(redis_server.url))
        return RedisOutbox(clients[-1], prefix=prefix, where="test", lease=lease, poll=poll, keep=keep)

    yield node
    for client in clients:
        client.close()


def test_a_delivery_is_enqueued_once_whichever_node_tries(shared: Callable[..., RedisOutbox]) -> None:
    one, two = shared(), shared()
    one.watch("job-1")
    assert one.watched() == two.watched() == ["job-1"]
    assert two.enqueue("job-1", "http://127.0.0.1:9/hook", BODY, msg_id="msg_job-1")
    assert not one.enqueue("job-1", "http://127.0.0.1:9/hook", b'{"other": 1}', msg_id="msg_other")
    assert one.watched() == []  # queued: no longer a live job for the fleet to settle
    one.watch("job-1")  # a late listing of a job already queued changes nothing
    assert two.watched() == []
    assert one.status("job-1") == two.status("job-1") == {
        "delivered": False, "attempts": 0, "last_status": None, "error": None
    }  # fmt: skip
    assert one.status("job-2") is None
    [delivery] = two.due(time.time(), 10)
    assert (delivery.msg_id, delivery.body, delivery.attempts) == ("msg_job-1", BODY, 0)
    with pytest.raises(UnicodeDecodeError):
        one.enqueue("job-3", "http://127.0.0.1:9/hook", b"\xff\xfe")


def test_a_lease_keeps_a_delivery_to_one_node_until_it_runs_out(shared: Callable[..., RedisOutbox]) -> None:
    one, two = shared(lease=0.5), shared(lease=0.5)
    one.enqueue("job-1", "http://127.0.0.1:9/hook", BODY)
    [taken] = one.due(time.time(), 10)
    assert two.due(time.time(), 10) == []
    assert one.renew(["job-1"]) == set()
    assert two.next_due() == pytest.approx(time.time() + 0.5, abs=0.2)  # the lease's end
    time.sleep(0.7)
    [again] = two.due(time.time(), 10)  # one went silent: two takes it over
    assert again == taken
    assert one.renew(["job-1"]) == {"job-1"}
    one.record("job-1", False, 500, "HTTP 500", time.time() + 5)  # too late: two's attempt is the one that counts
    assert one.status("job-1")["attempts"] == 0
    two.record("job-1", False, 503, "HTTP 503", time.time())
    assert one.status("job-1") == {"delivered": False, "attempts": 1, "last_status": 503, "error": "HTTP 503"}
    [retry] = one.due(time.time(), 10)
    assert retry.attempts == 1
    two.due(time.time(), 10)  # nothing: one holds it
    one.release(["job-1"])  # one stops: the delivery is due for anyone at once
    [handed] = two.due(time.time(), 10)
    assert handed.job_id == "job-1"
    one.record("job-1", True, 200, None, None)  # a success is kept even from a node that lost its lease
    two.record("job-1", False, 500, "HTTP 500", time.time())
    assert two.status("job-1") == {"delivered": True, "attempts": 2, "last_status": 200, "error": None}
    assert one.due(time.time() + 60, 10) == [] and one.next_due() is None


def test_finished_deliveries_expire_and_pending_ones_never_do(
    shared: Callable[..., RedisOutbox], redis_server: RedisServer
) -> None:
    node = shared(keep=100.0)
    for job_id in ("done", "failed", "pending"):
        node.enqueue(job_id, "http://127.0.0.1:9/hook", BODY)
    node.due(time.time(), 10)
    node.record("done", True, 200, None, None)
    node.record("failed", False, 500, "HTTP 500", None)
    node.record("pending", False, 500, "HTTP 500", time.time() + 60)
    client = redis.Redis.from_url(redis_server.url)
    ttls = {job_id: client.ttl(f"{node.prefix}webhooks:job:{job_id}") for job_id in ("done", "failed", "pending")}
    client.close()
    assert 90 < ttls["done"] <= 100 and 90 < ttls["failed"] <= 100 and ttls["pending"] == -1
    assert node.next_due() == pytest.approx(time.time() + 60, abs=2)


@asynccontextmanager
async def nodes(outboxes: list[RedisOutbox], **options: Any) -> AsyncIterator[list[WebhookDispatcher]]:
    dispatchers = [WebhookDispatcher(o, SECRET, LOOPBACK, **{"schedule": FAST, **options}) for o in outboxes]
    for dispatcher in dispatchers:
        await dispatcher.start()
    try:
        yield dispatchers
    finally:
        for dispatcher in dispatchers:
            await dispatcher.stop()


async def wait_delivered(outbox: RedisOutbox, job_ids: list[str], limit: float = 20.0) -> None:
    def done() -> bool:
        return all((outbox.status(job_id) or {}).get("delivered") for job_id in job_ids)

    deadline = time.monotonic() + limit
    while not await asyncio.to_thread(done):
        assert time.monotonic() < deadline, "not delivered in time"
        await asyncio.sleep(0.02)


def test_two_dispatchers_on_one_outbox_send_each_delivery_once(shared: Callable[..., RedisOutbox]) -> None:
    receiver = ScriptedReceiver([(500, 0.0)])
    outboxes = [shared(lease=2.0, poll=0.1), shared(lease=2.0, poll=0.1)]
    jobs = [f"job-{i}" for i in range(12)]

    async def scenario() -> None:
        async with nodes(outboxes):
            for index, job_id in enumerate(jobs):  # each node enqueues some, as API nodes would
                outbox = outboxes[index % 2]
                await asyncio.to_thread(outbox.enqueue, job_id, receiver.url, BODY, msg_id=f"msg_{job_id}")
            await wait_delivered(outboxes[0], jobs)
            await asyncio.sleep(0.5)  # time for a second send, if any

    try:
        asyncio.run(scenario())
    finally:
        receiver.close()
    ids = [headers["webhook-id"] for headers, _ in receiver.requests]
    assert len(ids) == 13 and set(ids) == {f"msg_{job_id}" for job_id in jobs}  # one retried after its 500
    for headers, body in receiver.requests:
        Webhook(SECRET).verify(body, headers)
    assert sorted(outboxes[1].status(job_id)["attempts"] for job_id in jobs) == [1] * 11 + [2]


def test_a_slow_receiver_keeps_its_sender_and_a_stop_hands_the_delivery_over(
    shared: Callable[..., RedisOutbox],
) -> None:
    """The lease is renewed while the receiver takes longer than it; a node that stops hands back at once."""
    receiver = ScriptedReceiver([(200, 1.5), (200, 5.0)])
    first, second = shared(lease=0.6, poll=0.1), shared(lease=0.6, poll=0.1)

    async def scenario() -> float:
        async with nodes([first]), nodes([second]):
            await asyncio.to_thread(first.enqueue, "slow", receiver.url, BODY)
            await wait_delivered(first, ["slow"])  # 1.5 s: the lease was renewed twice meanwhile
        lasting = shared(lease=60.0, poll=60.0)
        async with nodes([lasting]) as [stopping]:
            await asyncio.to_thread(lasting.enqueue, "cut", receiver.url, BODY)
            deadline = time.monotonic() + 10
            while len(receiver.requests) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await stopping.stop()  # mid-send: its 60 s lease is handed back
        stopped = time.monotonic()
        async with nodes([second]):
            await wait_delivered(second, ["cut"])
        return time.monotonic() - stopped

    try:
        handed_over = asyncio.run(scenario())
    finally:
        receiver.close()
    assert len(receiver.requests) == 3  # "slow" once (never taken over), "cut" twice
    assert receiver.requests[1][0]["webhook-id"] == receiver.requests[2][0]["webhook-id"]
    assert handed_over < 5.0  # not the 60 s lease


# -- a fleet of processes -----------------------------------------------------------------------------------


@dataclass
class Received:
    webhook_id: str
    payload: dict
    answer: int | None  # 200, or None: held until its sender was gone, so it delivered nothing
    at: float  # time.monotonic() of the answer


def sender_gone(connection: socket.socket) -> bool:
    """Whether the other end has closed the connection (a killed process's sockets are closed by the kernel)."""
    readable, _, _ = select.select([connection], [], [], 0.5)
    try:
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Receiver:
    """A loopback webhook receiver that answers 200. While `holding`, it keeps each request open until
    `let_go()`; then a request whose sender is gone (killed meanwhile) is dropped unanswered, the others
    get their 200."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.held = 0
        self.holding = False
        self.released = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                payload = Webhook(SECRET).verify(body, headers)  # raises for a bad signature: no 2xx then
                answer: int | None = 200
                if receiver.holding:
                    with receiver.lock:
                        receiver.held += 1
                    receiver.released.wait(120)
                    answer = None if sender_gone(self.connection) else 200
                with receiver.lock:
                    receiver.received.append(Received(headers["webhook-id"], payload, answer, time.monotonic()))
                if answer is None:
                    return
                try:
                    self.send_response(answer)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the sender gave up waiting
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def hold(self) -> None:
        self.released.clear()
        self.holding = True

    def let_go(self) -> None:
        self.holding = False
        self.released.set()

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def delivered(self) -> dict[str, int]:
        """webhook-id -> how many times it was answered 200."""
        counts: dict[str, int] = {}
        for item in self.snapshot():
            if item.answer == 200:
                counts[item.webhook_id] = counts.get(item.webhook_id, 0) + 1
        return counts

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Fleet:
    cluster: Cluster
    receiver: Receiver
    jobs: list[str]  # every job with a webhook so far, in the order submitted

    @property
    def apis(self) -> list[ServerProcess]:
        return self.cluster.apis

    def live(self) -> list[ServerProcess]:
        return [api for api in self.apis if api.proc is not None and api.proc.poll() is None]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    cluster = start_cluster(tmp_path_factory.mktemp("hooks"), 3, ("w1",), BEYOND_WEBHOOK_SECRET=SECRET)
    receiver = Receiver()
    try:
        assert float(cluster.apis[0].env["BEYOND_RECLAIM_AFTER"]) == RECLAIM_AFTER
        yield Fleet(cluster, receiver, [])
    finally:
        receiver.close()
        cluster.stop()


def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def webhook_state(api: ServerProcess, request_id: str) -> dict:
    return httpx.get(f"{api.url}/v2/requests/{request_id}", timeout=30).json()["webhook"]


def assert_every_node_says_delivered_once(fleet: Fleet) -> None:
    for request_id in fleet.jobs:
        states = {api.url: webhook_state(api, request_id) for api in fleet.live()}
        expected = {"delivered": True, "attempts": 1, "last_status": 200, "error": None}
        assert all(state == expected for state in states.values()), (request_id, states)


def scans(api: ServerProcess) -> int:
    """How many times the node's log says its webhook start-up scan is done (the log outlives restarts)."""
    return api.log_path.read_text(errors="replace").count("webhook start-up scan done")


def test_twenty_jobs_on_three_api_nodes_are_delivered_twenty_times(fleet: Fleet) -> None:
    receiver = fleet.receiver
    jobs = [submit(fleet.apis[i % 3], webhook_url=receiver.url, seed=i, **QUICK) for i in range(20)]
    fleet.jobs += jobs
    until(lambda: len(receiver.delivered()) == 20, 300, "20 deliveries")
    time.sleep(SETTLE)  # a second delivery by another node would have come by now
    received = receiver.snapshot()
    assert len(received) == 20
    assert sorted(item.webhook_id for item in received) == sorted(f"msg_{job}" for job in jobs)
    for item in received:
        assert item.payload["request_id"] == item.webhook_id.removeprefix("msg_")
        assert item.payload["status"] == "COMPLETED"
    # Each node reads the one shared state, whichever node accepted or delivered the job.
    assert_every_node_says_delivered_once(fleet)


def test_a_node_killed_with_deliveries_pending_hands_them_over(fleet: Fleet) -> None:
    receiver, victim = fleet.receiver, fleet.apis[2]
    before = len(receiver.snapshot())
    # Three deliveries in flight on the victim: their jobs ended, the receiver holds its requests open.
    receiver.hold()
    sending = [submit(victim, webhook_url=receiver.url, seed=100 + i, **QUICK) for i in range(3)]
    until(lambda: receiver.held == 3, 120, "three requests in flight")
    # Two more accepted by the victim whose jobs cannot run yet (the worker is stopped): they end after it is gone.
    worker = fleet.cluster.workers["w1"]
    assert worker.proc is not None
    os.killpg(worker.proc.pid, signal.SIGSTOP)
    try:
        waiting = [submit(victim, webhook_url=receiver.url, seed=200 + i, **QUICK) for i in range(2)]
        shared = redis.Redis.from_url(fleet.cluster.redis.url)
        # The fleet's list of live jobs with a webhook, which any node settles when they end. (On a per-node
        # outbox there is none: nothing but the victim knows of these jobs.)
        until(lambda: all(shared.zscore("beyond:webhooks:live", j) for j in waiting), 30, "the fleet to know them")
        shared.close()
        victim.kill()  # kill -9: no goodbye, its leases and its live jobs are left as they were
        killed = time.monotonic()
        receiver.let_go()
    finally:
        os.killpg(worker.proc.pid, signal.SIGCONT)
    fleet.jobs += sending + waiting
    wanted = {f"msg_{job}" for job in sending + waiting}
    until(lambda: wanted <= set(receiver.delivered()), 180, "the victim's deliveries, from other nodes")
    time.sleep(SETTLE)
    received = receiver.snapshot()[before:]
    assert receiver.delivered() == {f"msg_{job}": 1 for job in fleet.jobs}
    for job in sending:
        mine = [item for item in received if item.webhook_id == f"msg_{job}"]
        # The victim's request, dropped with the victim (its queuer holds a delivery: no other node sent it
        # meanwhile), then the one handed over.
        assert [item.answer for item in mine] == [None, 200], mine
        # Handed over within the reclaim time (the lease is half of it, and nodes look every quarter).
        assert mine[1].at - killed < RECLAIM_AFTER, mine[1].at - killed
    for job in waiting:
        assert [item.answer for item in received if item.webhook_id == f"msg_{job}"] == [200]
    assert_every_node_says_delivered_once(fleet)


def test_a_node_joining_or_restarting_resends_nothing(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> None:
    receiver, victim = fleet.receiver, fleet.apis[2]
    before = len(receiver.snapshot())
    assert before >= len(fleet.jobs) >= 20
    scanned = scans(victim)
    joining = ServerProcess(tmp_path_factory.mktemp("joining"), env=victim.env, args=("--no-worker",))
    fleet.apis.append(joining)
    joining.start(), victim.start()
    for api, done in ((joining, 0), (victim, scanned)):
        api.wait_ready()
        until(lambda api=api, done=done: scans(api) > done, 60, f"the start-up scan of {api.url}")
    time.sleep(SETTLE)
    assert len(receiver.snapshot()) == before, [item.webhook_id for item in receiver.snapshot()[before:]]
    # The new node reads the same state as every other.
    assert_every_node_says_delivered_once(fleet)
