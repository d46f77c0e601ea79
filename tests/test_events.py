"""GET /v2/requests/{id}/events through a real server, read with httpx's streaming (no browser)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from server.http.app import create_app
from server.http.routes import events as events_route
from server.jobs.contract import ImageSource, JobParams
from server.jobs.events import JobEvents
from server.settings import Settings
from tests.helpers import LONG_JOB, ImageServer, ServerProcess, request_body

KEYS = "SG_aaaaaaaaaaaaaaaa,SG_bbbbbbbbbbbbbbbb"


def submit(server: ServerProcess, key: str | None = None, **fields: object) -> str:
    headers = {"x-api-key": key} if key else {}
    response = httpx.post(f"{server.url}/v2/seg-beyond", json=request_body(**fields), headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """(event name, parsed data) per event; comments (keep-alives) and ids are skipped."""
    name, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)


def read_stream(server: ServerProcess, request_id: str, key: str | None = None) -> list[tuple[str, dict]]:
    headers = {"x-api-key": key} if key else {}
    url = f"{server.url}/v2/requests/{request_id}/events"
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(30, read=60)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        # iter_lines ends only when the server closes the stream: reaching the end of this loop is the check.
        return list(sse_events(response.iter_lines()))


def get_result(server: ServerProcess, request_id: str, key: str | None = None) -> httpx.Response:
    headers = {"x-api-key": key} if key else {}
    return httpx.get(f"{server.url}/v2/requests/{request_id}", headers=headers, timeout=30)


def test_a_queued_job_streams_its_position_then_progress_then_its_result(server: ServerProcess) -> None:
    first = submit(server, steps=20)
    second = submit(server, steps=30)
    events = read_stream(server, second)
    names = [name for name, _ in events]
    assert names[-1] == "result" and set(names[:-1]) == {"status"}, names
    statuses = [body for name, body in events if name == "status"]
    assert statuses[0]["status"] == "QUEUED" and statuses[0]["queue_position"] >= 0
    assert all(body["request_id"] == second for body in statuses)
    queued = [body for body in statuses if body["status"] == "QUEUED"]
    processing = [body for body in statuses if body["status"] == "PROCESSING"]
    assert statuses == queued + processing  # QUEUED events come first, then PROCESSING ones
    positions = [body["queue_position"] for body in queued]
    assert positions == sorted(positions, reverse=True) and len(set(positions)) == len(positions)
    progress = [body["progress"] for body in processing]
    # Each event says something new: its progress moved, or a preview appeared with the same progress.
    assert len(progress) >= 2 and progress == sorted(progress)
    assert len({json.dumps(body, sort_keys=True) for body in processing}) == len(processing)
    assert progress[0] >= 0 and progress[-1] <= 1 and any(0 < p < 1 for p in progress)
    final = events[-1][1]
    response = get_result(server, second)
    assert response.status_code == 200 and final == response.json()
    assert final["status"] == "COMPLETED" and len(final["outputs"]) == 1
    # The first job's stream, opened after it finished, is its result alone.
    while get_result(server, first).json()["status"] != "COMPLETED":
        time.sleep(0.1)
    assert read_stream(server, first) == [("result", get_result(server, first).json())]


def test_a_failed_job_ends_with_the_422_body(server: ServerProcess, images: ImageServer) -> None:
    request_id = submit(server, input_image=images.url + "/gone.png")
    events = read_stream(server, request_id)
    assert events[-1][0] == "result"
    response = get_result(server, request_id)
    assert response.status_code == 422
    assert events[-1][1] == response.json()
    assert set(events[-1][1]) == {"status", "request_id", "error"} and events[-1][1]["status"] == "FAILED"


def test_an_unknown_id_is_a_json_404_before_any_stream(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/v2/requests/0123456789abcdef/events", timeout=30)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert set(response.json()) == {"error"}


def test_a_client_that_goes_away_ends_the_stream(server: ServerProcess) -> None:
    blocker = submit(server, **LONG_JOB)
    waiting = submit(server, **LONG_JOB)
    url = f"{server.url}/v2/requests/{waiting}/events"
    with httpx.stream("GET", url, timeout=30) as response:
        first = next(sse_events(response.iter_lines()))
    assert first[0] == "status" and first[1]["status"] == "QUEUED"
    closed = f"events stream for {waiting} closed"
    deadline = time.monotonic() + 10
    while closed not in server.log_tail(400) and time.monotonic() < deadline:
        time.sleep(0.1)
    still = httpx.get(f"{server.url}/v2/requests/{waiting}/status", timeout=30).json()
    try:
        assert closed in server.log_tail(400)
        assert still["status"] in ("QUEUED", "PROCESSING")  # ended by the disconnect, not by the job
    finally:
        for request_id in (waiting, blocker):
            httpx.post(f"{server.url}/v2/requests/{request_id}/cancel", timeout=30)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("keyed"), env={"BEYOND_API_KEYS": KEYS}).start()
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_with_keys_only_the_owner_sees_the_events(keyed_server: ServerProcess) -> None:
    owner, other = KEYS.split(",")
    request_id = submit(keyed_server, key=owner)
    url = f"{keyed_server.url}/v2/requests/{request_id}/events"
    stranger = httpx.get(url, headers={"x-api-key": other}, timeout=30)
    assert stranger.status_code == 404 and set(stranger.json()) == {"error"}
    assert httpx.get(url, timeout=30).status_code == 401
    events = read_stream(keyed_server, request_id, key=owner)
    assert events[-1] == ("result", get_result(keyed_server, request_id, key=owner).json())


def test_keep_alive_comments_flow_while_nothing_changes_and_a_disconnect_ends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In-process, with no worker started: the job stays QUEUED, so only keep-alives can follow its first event.
    monkeypatch.setattr(events_route, "PING", 0.3)
    app = create_app(Settings(data_dir=tmp_path, model="random:tiny"))
    job = app.state.services.store.create(
        JobParams(prompt="x", steps=20),
        ImageSource(url="http://127.0.0.1:9/x.png"),
        image=None,
        base64=False,
        owner=None,
    )
    path = f"/v2/requests/{job.id}/events"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }

    async def drive() -> tuple[list[dict], float]:
        sent: list[dict] = []
        gone = asyncio.Event()
        requested = False

        async def receive() -> dict:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        task = asyncio.create_task(app(scope, receive, send))
        await asyncio.sleep(1.2)
        gone.set()
        started = time.monotonic()
        await asyncio.wait_for(task, 10)
        return sent, time.monotonic() - started

    sent, ending = asyncio.run(drive())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    blocks = [block for block in text.replace("\r\n", "\n").split("\n\n") if block]
    assert blocks[0].startswith("event: status\ndata: ")
    first = json.loads(blocks[0].split("data: ", 1)[1])
    assert first == {"status": "QUEUED", "request_id": job.id, "queue_position": 0}
    pings = [block for block in blocks[1:] if block.startswith(":")]
    assert len(pings) >= 2 and pings == blocks[1:]  # keep-alives only: nothing changed
    assert ending < 2  # the disconnect ended the stream (the app returned) at once


class InProcessStreams:
    """Event streams served in this process by an app whose worker is not started: its jobs wait in the queue
    until the test claims, starts or cancels them through the store."""

    def __init__(self, tmp_path: Path) -> None:
        self.app = create_app(Settings(data_dir=tmp_path, model="random:tiny"))
        self.store = self.app.state.services.store
        self.image = encode_png()
        self.streams: list[tuple[asyncio.Task, list[dict], asyncio.Event]] = []

    def submit(self) -> str:
        params = JobParams(prompt="x", steps=20, left=8)
        return self.store.create(params, ImageSource(), image=self.image, base64=False, owner=None).id

    def open(self, job_id: str) -> list[dict]:
        """Starts a stream of `job_id`'s events; returns the list its status bodies arrive in."""
        path = f"/v2/requests/{job_id}/events"
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
        }
        bodies: list[dict] = []
        gone = asyncio.Event()
        requested = False

        async def receive() -> dict:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            text = message.get("body", b"").decode()
            for block in text.replace("\r\n", "\n").split("\n\n"):
                if block.startswith("event: "):
                    bodies.append(json.loads(block.split("data: ", 1)[1]))

        self.streams.append((asyncio.create_task(self.app(scope, receive, send)), bodies, gone))
        return bodies

    async def close(self) -> None:
        for _, _, gone in self.streams:
            gone.set()
        await asyncio.wait_for(asyncio.gather(*(task for task, _, _ in self.streams)), 10)


def encode_png() -> bytes:
    from tests.helpers import encode, smooth_image

    return encode(smooth_image(16, 16))


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.02)


def test_waiting_streams_cost_no_reads_while_the_queue_stands_still(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_route, "QUEUE_LOOK", 0.25)
    streams = InProcessStreams(tmp_path)
    reads = {"state": 0, "queue_position": 0}
    for name in reads:
        read = getattr(streams.store, name)

        def counted(*args: object, _read: Callable[..., object] = read, _name: str = name) -> object:
            reads[_name] += 1
            return _read(*args)

        monkeypatch.setattr(streams.store, name, counted)
    jobs = [streams.submit() for _ in range(5)]

    async def drive() -> dict[str, int]:
        seen = [streams.open(jobs[i % len(jobs)]) for i in range(50)]
        await until(lambda: all(seen))
        await asyncio.sleep(0.3)  # the streams are all waiting now
        before = dict(reads)
        await asyncio.sleep(2.0)  # eight looks at the queue
        during = {name: reads[name] - before[name] for name in reads}
        assert all(len(bodies) == 1 for bodies in seen)  # nothing changed: nothing was sent
        await streams.close()
        return during

    during = asyncio.run(drive())
    # One look a quarter second for all 50 streams, not two reads per stream and look (400 + 400 here before).
    assert during["state"] == 0 and during["queue_position"] <= 10, during


def test_waiting_streams_hear_of_a_start_and_a_cancel_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_route, "QUEUE_LOOK", 0.2)
    streams = InProcessStreams(tmp_path)
    first, second, third = (streams.submit() for _ in range(3))

    async def drive() -> tuple[list[dict], list[dict]]:
        of_second, of_third = streams.open(second), streams.open(third)
        await until(lambda: of_second and of_third)
        await asyncio.sleep(0.5)
        # The first job starts: only a running job's change, which the waiting ones' own watches do not hear.
        claimed = streams.store.claim_next()
        assert claimed is not None and claimed.id == first
        streams.store.mark_started(first, claimed.attempts)
        await until(lambda: len(of_second) == 2 and len(of_third) == 2)
        # The second is cancelled while it waits: the third moves up.
        streams.store.request_cancel(second)
        await until(lambda: len(of_third) == 3)
        await streams.close()
        return of_second, of_third

    of_second, of_third = asyncio.run(drive())
    assert [body.get("queue_position") for body in of_second[:2]] == [1, 0]
    assert of_second[2]["status"] == "FAILED" and of_second[2]["error"] == "cancelled"
    assert [body["queue_position"] for body in of_third] == [2, 1, 0]


def test_the_queue_look_sees_a_job_put_back_while_another_starts() -> None:
    # Both ahead of the last watched job: the count of waiting jobs below it is the same, the positions of
    # the jobs between them are not. The store's count of settling changes (the put-back) tells the look.
    class Store:
        def __init__(self) -> None:
            self.events = JobEvents()
            self.below = 4

        def queue_position(self, seq: int) -> int:
            return self.below

    store = Store()
    look = events_route.QueueLook()
    look.waiting[object()] = 9  # type: ignore[index]
    assert not look._moved(store)  # type: ignore[arg-type]
    assert not look._moved(store)  # type: ignore[arg-type]
    store.events.job_changed("put-back")  # released: not a running job's change
    assert look._moved(store)  # type: ignore[arg-type]
    store.events.job_changed("started", running=True)
    assert not look._moved(store)  # type: ignore[arg-type]
    store.below = 3
    assert look._moved(store)  # type: ignore[arg-type]
