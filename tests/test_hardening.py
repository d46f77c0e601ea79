"""Faults found when the server was attacked as a user and as a failing machine would: each one here.

Every test talks to a real `beyond serve` on loopback, except where the fault is inside one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.helpers import (
    LONG_JOB,
    ROOT,
    ServerProcess,
    drop_sqlite_files,
    request_body,
    serve_expecting_exit,
    smooth_image,
    sqlite_files,
    wait_until_nothing_waits,
)
from tests.test_queue import finished, status, submit, wait_for


class Dribble(BaseHTTPRequestHandler):
    """Answers one byte a second, headers included: only a whole-download deadline ends it."""

    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        try:
            for byte in b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n" + b"\x89PNG" * 100:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(1.0)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def dribble() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Dribble)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/slow.png"
    finally:
        httpd.shutdown()


@pytest.fixture
def tight(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with an 8 s fetch deadline and a queue of 4."""
    server = ServerProcess(tmp_path, env={"BEYOND_FETCH_TIMEOUT": "8", "BEYOND_MAX_QUEUE": "4"}).start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_a_slow_input_url_delays_only_its_own_job(tight: ServerProcess, dribble: str) -> None:
    slow = submit(tight, input_image=dribble)
    started = time.monotonic()
    quick = submit(tight, image=smooth_image(48, 48), seed=3)
    body = wait_for(tight, quick["request_id"], finished, timeout=60)
    assert body["status"] == "COMPLETED"
    assert status(tight, slow["request_id"]).json()["status"] == "QUEUED"  # still fetching, off the worker
    final = wait_for(tight, slow["request_id"], finished, timeout=30)
    assert final["status"] == "FAILED" and final["error"] == "input_image: fetching the URL took longer than 8 s"
    assert time.monotonic() - started < 15


def test_the_queue_bound_holds_under_concurrent_submits(tight: ServerProcess) -> None:
    running = submit(tight, **LONG_JOB)
    wait_for(tight, running["request_id"], lambda b: b["status"] == "PROCESSING")
    wait_until_nothing_waits(tight)  # PROCESSING is also a job handed to the worker but not started

    def one(i: int) -> int:
        response = httpx.post(f"{tight.url}/v2/seg-beyond", json=request_body(seed=i, steps=100), timeout=60)
        return response.status_code

    with ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(one, range(40)))
    assert codes.count(200) == 4 and codes.count(429) == 36
    health = httpx.get(f"{tight.url}/health", timeout=10).json()
    assert health["queued"] == 4


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (DEEP.encode(), "body"),
        (json.dumps({**request_body(), "prompt": "x"})[:-1].encode() + b', "deep": ' + DEEP.encode() + b"}", "body"),
        (json.dumps(request_body()).replace('"a quiet beach"', '{"a": ' + DEEP + "}").encode(), "body"),
        (json.dumps(request_body()).replace('"a quiet beach"', '"\\ud800 cat"').encode(), "prompt"),
        (json.dumps(request_body(negative_prompt="x")).replace('"x"', '"\\udfff"').encode(), "negative_prompt"),
        (json.dumps(request_body(input_image="http://[::1/")).encode(), "input_image"),
        (json.dumps(request_body(input_image=f"http://{'a' * 64}.localhost/x.png")).encode(), "input_image"),
    ],
    ids=[
        "deep-body",
        "deep-extra-field",
        "deep-prompt",
        "surrogate-prompt",
        "surrogate-negative",
        "bad-ipv6",
        "long-label",
    ],
)
def test_hostile_bodies_are_400_naming_the_field(server: ServerProcess, content: bytes, field: str) -> None:
    for path in ("/v2/seg-beyond", "/v1/seg-beyond"):
        response = httpx.post(
            server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"].startswith(f"{field}: ")


def test_a_stored_file_that_is_gone_is_404_and_the_connection_stays_usable(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        jobs = [
            client.post("/v2/seg-beyond", json=request_body(seed=s, base64=b)).json()
            for s, b in ((1, False), (2, True))
        ]
        for job in jobs:
            wait_for(server, job["request_id"], finished)
        output = client.get(f"/v2/requests/{jobs[0]['request_id']}").json()["output"]
        for job in jobs:
            assert drop_sqlite_files(server.data_dir, job["request_id"], "output-") == 1
        for path in (output, f"/v2/requests/{jobs[1]['request_id']}"):
            gone = client.get(path)
            assert gone.status_code == 404 and "no longer stored" in gone.json()["error"]
            # The same connection answers the next request.
            assert client.get(f"/v2/requests/{jobs[0]['request_id']}/status").status_code == 200


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB file system of its own (tmpfs): the data directory can really fill up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_507_reported_and_recovered_from(small_disk: Path, tmp_path: Path) -> None:
    data = small_disk / "data"
    server = ServerProcess(data, env={"BEYOND_MIN_FREE_BYTES": str(256 * 1024)}).start()
    server.log_path = tmp_path / "server.log"  # the log must not fill the disk under test
    try:
        server.wait_ready()
        ballast = small_disk / "ballast"
        with contextlib.suppress(OSError), open(ballast, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
        before = sorted(p.name for p in (data / "jobs").iterdir()), sqlite_files(data)
        response = httpx.post(f"{server.url}/v2/seg-beyond", json=request_body(), timeout=60)
        assert response.status_code == 507 and "disk is full" in response.json()["error"]
        # Nothing left behind
        assert (sorted(p.name for p in (data / "jobs").iterdir()), sqlite_files(data)) == before
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert health.status_code == 503 and "disk is full" in health.json()["error"]
        ballast.unlink()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        job = submit(server, image=smooth_image(48, 48))
        assert wait_for(server, job["request_id"], finished)["status"] == "COMPLETED"
    finally:
        server.stop()


def test_serve_on_a_corrupt_store_exits_2_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "jobs.sqlite3").write_bytes(b"this is not a database, and it is long enough to look like one" * 100)
    out = serve_expecting_exit(tmp_path, {})
    assert out.returncode == 2
    assert str(tmp_path / "jobs.sqlite3") in out.stderr and "Move it aside" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_a_deleted_store_is_not_silently_replaced_by_an_empty_one(tmp_path: Path) -> None:
    from server.jobs.contract import ImageSource, JobParams
    from server.jobs.sqlite_store import INLINE_MAX, SqliteJobStore

    store = SqliteJobStore(tmp_path)
    # A small input is kept in the database, a large one in its job's folder.
    for image in (b"x", b"x" * (INLINE_MAX + 1)):
        store.create(JobParams(prompt="p"), ImageSource(), image=image, base64=False, owner=None)
    kept = sorted(tmp_path.joinpath("jobs").iterdir())
    for file in tmp_path.glob("jobs.sqlite3*"):
        file.unlink()
    out = serve_expecting_exit(tmp_path, {})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"the job store {tmp_path / 'jobs.sqlite3'} is missing" in out.stderr and "Put it back" in out.stderr
    assert sorted(tmp_path.joinpath("jobs").iterdir()) == kept and len(kept) == 2  # nothing was thrown away


def test_a_deleted_store_of_small_requests_only_is_not_replaced_either(tmp_path: Path) -> None:
    from server.jobs.contract import ImageSource, JobParams
    from server.jobs.sqlite_store import SqliteJobStore

    # Every file of these jobs is in the database: only the store's mark in its folder says it was here.
    SqliteJobStore(tmp_path).create(JobParams(prompt="p"), ImageSource(), image=b"x", base64=False, owner=None)
    assert sqlite_files(tmp_path) and not [p for p in tmp_path.joinpath("jobs").iterdir() if p.is_dir()]
    for file in tmp_path.glob("jobs.sqlite3*"):
        file.unlink()
    out = serve_expecting_exit(tmp_path, {})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"the job store {tmp_path / 'jobs.sqlite3'} is missing" in out.stderr and "Put it back" in out.stderr


def test_a_store_replaced_under_a_running_server_is_503(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path).start()
    try:
        server.wait_ready()
        store = tmp_path / "jobs.sqlite3"
        replacement = tmp_path / "other.sqlite3"
        sqlite3.connect(replacement).close()
        os.replace(replacement, store)
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert health.status_code == 503 and "replaced" in health.json()["store"]
        response = httpx.post(f"{server.url}/v2/seg-beyond", json=request_body(), timeout=30)
        assert response.status_code == 503 and set(response.json()) == {"error"}
        assert str(tmp_path) not in response.text
        time.sleep(2.5)  # the supervisor meets the broken store many times a second; it says so once
        assert server.log_tail(400).count("the job store failed") <= 2
    finally:
        server.stop()


def test_keys_in_the_query_string_never_reach_the_log_and_every_line_is_json(tmp_path: Path) -> None:
    secret = "SG_querystringsecret1"
    server = ServerProcess(tmp_path, env={"BEYOND_API_KEYS": secret, "BEYOND_LOG_FORMAT": "json"}).start()
    try:
        server.wait_ready()
        for path in (f"/v2/requests/abc/status?x-api-key={secret}", f"/health?token={secret}"):
            httpx.get(server.url + path, timeout=10)
        time.sleep(0.5)
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert secret not in log
    lines = [line for line in log.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # uvicorn's and the worker's lines too
    access = [r for r in records if r.get("event") == "request"]
    assert {r["route"] for r in access} >= {"/v2/requests/{request_id}/status", "/health"}
    assert all("seconds" in r and "status" in r for r in access)
    assert not any(r["logger"] == "uvicorn.access" for r in records)


def accepted(server: ServerProcess) -> list[str]:
    """The ids of the requests the server accepted, in order, from its log."""
    return [line.rsplit(" ", 1)[-1] for line in server.log_tail(100_000).splitlines() if "accepted request" in line]


def next_accepted(server: ServerProcess, before: int, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = accepted(server)
        if len(ids) > before:
            return ids[before]
        time.sleep(0.05)
    raise TimeoutError("no request accepted")


def test_a_v1_client_that_leaves_gets_its_job_cancelled(server: ServerProcess) -> None:
    before = len(accepted(server))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/seg-beyond", json=request_body(seed=91, **LONG_JOB), timeout=3)
    left = time.monotonic()
    # A client that gave up never heard the request id: the server's log has it.
    job_id = next_accepted(server, before)
    body = wait_for(server, job_id, finished, timeout=30)
    assert body == {"status": "FAILED", "request_id": job_id, "error": "cancelled"}
    assert time.monotonic() - left < 5


def test_a_v1_request_cancelled_through_v2_is_409(server: ServerProcess) -> None:
    answer: dict = {}

    def run() -> None:
        answer["response"] = httpx.post(f"{server.url}/v1/seg-beyond", json=request_body(**LONG_JOB), timeout=120)

    before = len(accepted(server))
    thread = threading.Thread(target=run)
    thread.start()
    job_id = next_accepted(server, before)
    wait_for(server, job_id, lambda b: b.get("progress", 0) > 0)
    httpx.post(f"{server.url}/v2/requests/{job_id}/cancel", timeout=30)
    thread.join(60)
    response = answer["response"]
    assert response.status_code == 409 and "cancelled" in response.json()["error"]
    assert "internal server error" not in server.log_tail(200)


def test_a_device_that_is_not_there_stops_startup(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.commands.cli",
            "serve",
            "--model",
            "random:tiny",
            "--data-dir",
            str(tmp_path),
            "--device",
            "cuda",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "CUDA is not available" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"BEYOND_RATE_LIMIT": "lots/fortnight"}, "rate_limit"),
        ({"BEYOND_DEVICE": "gpu0"}, "device"),
        ({"BEYOND_MAX_QUEUE": "0"}, "max_queue"),
        ({"BEYOND_ALLOWED_HOSTS": "https://gpu.example.com"}, "allowed_hosts"),
        ({"BEYOND_FORWARDED_ALLOW_IPS": "proxy.internal"}, "forwarded_allow_ips"),
    ],
)
def test_bad_settings_stop_startup(tmp_path: Path, env: dict[str, str], words: str) -> None:
    out = serve_expecting_exit(tmp_path, env)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr


def test_sigterm_while_the_model_loads_stops_within_2_s(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path).start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            response = server.health()
            if response is not None and response.json()["state"] == "loading":
                break
            time.sleep(0.05)
        assert server.proc is not None
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(10)
        assert time.monotonic() - sent < 2.0
    finally:
        server.stop()


def test_worker_failures_reach_clients_in_our_words() -> None:
    from models.errors import NonFiniteOutput, OutOfMemory
    from server.jobs.contract import JobParams
    from server.jobs.engine_process import UNKNOWN_FAILURE, Worker
    from server.jobs.messages import JobFailed, RunJob
    from tests.helpers import encode, tiny_worker_config

    class Broken:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def run(self, *args: object) -> None:
            raise self.exc

    class Pipe:
        def send(self, message: object) -> None:
            pass

    worker = Worker(Pipe(), tiny_worker_config())  # type: ignore[arg-type]
    job = RunJob("j", 1, JobParams(prompt="p", left=8), encode(smooth_image(16, 16)))
    cases = {
        RuntimeError("/srv/secret/path <object at 0x7f>"): ("engine", UNKNOWN_FAILURE),
        OutOfMemory("cuda:0", 4, (2048, 2048), "tried to allocate 8 GiB"): ("out_of_memory", "out of memory; try"),
        NonFiniteOutput("float16"): ("non_finite", "the model produced NaN or infinite values in float16"),
    }
    for exc, (kind, words) in cases.items():
        worker.engine = Broken(exc)
        answer = worker.run(job)
        assert isinstance(answer, JobFailed) and answer.kind == kind and answer.error.startswith(words)
        assert "0x" not in answer.error and "/srv" not in answer.error


def test_the_data_dir_keeps_no_folder_without_a_row(tmp_path: Path) -> None:
    from server.jobs.sqlite_store import SqliteJobStore

    SqliteJobStore(tmp_path)
    orphan = tmp_path / "jobs" / "0123abcd"
    orphan.mkdir()
    (orphan / "input").write_bytes(b"x")
    SqliteJobStore(tmp_path)  # a restart removes what a crash between file and row left behind
    assert not orphan.exists()
    shutil.rmtree(tmp_path / "jobs")
