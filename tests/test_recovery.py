"""Nothing accepted is lost: kill -9 of the server, the worker or Redis, expiry, a model that fails to load.

The store's tests run on both stores: `backend` gives a server's environment (SQLite in its data dir, or
a redis-server of the test's own) and says whether a job's files are still kept."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from models.random_models import build_random
from tests.helpers import (
    LONG_JOB,
    ServerProcess,
    children,
    process_state,
    request_body,
    running,
    smooth_image,
    sqlite_files,
)
from tests.redis_helpers import RedisServer
from tests.test_queue import finished, result, status, submit, wait_for


class Backend:
    def __init__(self, data_dir: Path, redis_server: RedisServer | None = None) -> None:
        self.data_dir, self.redis = data_dir, redis_server
        self.env = {"BEYOND_REDIS_URL": redis_server.url} if redis_server else {}

    def server(self, **env: str) -> ServerProcess:
        return ServerProcess(self.data_dir, env={**self.env, **env})

    def has_output(self, job_id: str) -> bool:
        if self.redis is None:
            return "output-0.jpg" in sqlite_files(self.data_dir).get(job_id, set())
        client = redis.Redis.from_url(self.redis.url)
        try:
            return client.hexists(f"beyond:files:{job_id}", "output-0.jpg")
        finally:
            client.close()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend(tmp_path)
        return
    redis_server = RedisServer(tmp_path / "redis").start()
    try:
        yield Backend(tmp_path / "data", redis_server)
    finally:
        redis_server.stop()


def test_kill_minus_nine_of_the_server_loses_no_queued_job(backend: Backend) -> None:
    first = backend.server().start().wait_ready()
    try:
        jobs = [submit(first, seed=i, steps=40) for i in range(5)]
        wait_for(first, jobs[0]["request_id"], lambda b: b.get("progress", 0) > 0)
    finally:
        first.kill()
    second = backend.server().start().wait_ready()
    try:
        for job in jobs:
            body = wait_for(second, job["request_id"], finished, timeout=300)
            assert body["status"] == "COMPLETED", body
        seeds = [result(second, job["request_id"]).json()["seeds"][0] for job in jobs]
        assert seeds == list(range(5))
    finally:
        second.stop()


def test_the_engine_process_ends_within_two_seconds_of_its_server_s_kill_minus_nine(tmp_path: Path) -> None:
    """Only the API process is killed (not its process group): its engine process must notice and end at once,
    not go on computing the job (and holding its GPU memory) while a restarted server runs it again."""
    first = ServerProcess(tmp_path).start().wait_ready()
    assert first.proc is not None
    engine = first.worker_pid()
    # The engine and multiprocessing's resource tracker: nothing the server started may outlive it.
    spawned = children(first.proc.pid)
    assert engine in spawned, (engine, spawned)
    try:
        job = submit(first, seed=5, **LONG_JOB)
        wait_for(first, job["request_id"], lambda b: b["status"] == "PROCESSING" and b.get("progress", 0) > 0)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(30)
        killed = time.monotonic()
        while any(map(running, spawned)) and time.monotonic() - killed < 10:
            time.sleep(0.02)
        took = time.monotonic() - killed
        left = {pid: process_state(pid) for pid in spawned if running(pid)}
        assert took < 2.0 and not left, f"its children lived {took:.1f} s on (still running: {left})"
    finally:
        for pid in spawned:  # a failed test leaves no orphan computing on the machine
            with contextlib.suppress(ProcessLookupError):
                if running(pid):
                    os.kill(pid, signal.SIGKILL)
        first.stop()
    second = ServerProcess(tmp_path).start().wait_ready()
    try:
        body = wait_for(second, job["request_id"], finished, timeout=300)
        assert body["status"] == "COMPLETED", body
        assert result(second, job["request_id"]).json()["seeds"] == [5]
        # Claimed once by each server: the first attempt ended with its server, the second completed it.
        with contextlib.closing(sqlite3.connect(tmp_path / "jobs.sqlite3", timeout=30)) as db:
            (attempts,) = db.execute("SELECT attempts FROM jobs WHERE id = ?", (job["request_id"],)).fetchone()
        assert attempts == 2
    finally:
        second.stop()


def test_a_server_stopped_mid_job_puts_it_back_as_if_never_claimed(tmp_path: Path) -> None:
    """SIGTERM to `beyond serve` on one box (a restart, an upgrade) while a job runs: the job goes back to the
    queue at once with no attempt spent, to run from the start when the server is back (as any queued job)."""
    server = ServerProcess(tmp_path).start().wait_ready()
    try:
        job = submit(server, seed=6, **LONG_JOB)
        wait_for(server, job["request_id"], lambda b: b["status"] == "PROCESSING" and b.get("progress", 0) > 0)
    finally:
        server.stop()
    with contextlib.closing(sqlite3.connect(tmp_path / "jobs.sqlite3", timeout=30)) as db:
        row = db.execute(
            "SELECT status, attempts, progress, started_at FROM jobs WHERE id = ?", (job["request_id"],)
        ).fetchone()
    assert row == ("QUEUED", 0, 0, None)
    assert f"job {job['request_id']} on stop: handed back (running)" in server.log_tail(200)


def test_worker_killed_mid_job_is_restarted_and_the_job_retried_once(backend: Backend) -> None:
    server = backend.server().start().wait_ready()
    try:
        job = submit(server, steps=100, seed=12)
        wait_for(server, job["request_id"], lambda b: b.get("progress", 0) > 0.05)
        os.kill(server.worker_pid(), signal.SIGKILL)
        # The API keeps answering while the worker is gone.
        assert status(server, job["request_id"]).status_code == 200
        body = wait_for(server, job["request_id"], finished, timeout=300)
        assert body["status"] == "COMPLETED", body
        health = httpx.get(f"{server.url}/health", timeout=10).json()
        assert health["worker_restarts"] >= 1

        # A job that kills its worker every time is failed after its second attempt.
        doomed = submit(server, steps=100, seed=13)
        for _ in range(2):
            wait_for(server, doomed["request_id"], lambda b: b.get("progress", 0) > 0.05, timeout=300)
            os.kill(server.worker_pid(), signal.SIGKILL)
            time.sleep(0.5)
        final = wait_for(server, doomed["request_id"], finished, timeout=300)
        assert final["status"] == "FAILED" and "worker process died" in final["error"]
        # Three deaths, one failed job: the metrics count them apart.
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert "beyond_worker_deaths_total 3.0" in metrics
        assert 'beyond_job_failures_total{reason="worker_died"} 1.0' in metrics
        server.wait_ready()
        after = httpx.post(f"{server.url}/v1/seg-beyond", json=request_body(seed=1), timeout=300)
        assert after.status_code == 200
    finally:
        server.stop()


def test_results_expire_and_their_files_go(backend: Backend) -> None:
    server = backend.server(BEYOND_RESULT_TTL="2", BEYOND_PURGE_INTERVAL="0.5").start()
    try:
        server.wait_ready()
        job = submit(server, image=smooth_image(48, 48), seed=2)
        body = wait_for(server, job["request_id"], finished)
        assert body["status"] == "COMPLETED"
        output = result(server, job["request_id"]).json()["output"]
        assert httpx.get(output, timeout=10).status_code == 200
        assert backend.has_output(job["request_id"])
        time.sleep(3.5)
        assert status(server, job["request_id"]).status_code == 404
        assert result(server, job["request_id"]).status_code == 404
        assert httpx.get(output, timeout=10).status_code == 404
        assert not backend.has_output(job["request_id"])
    finally:
        server.stop()


def test_a_model_that_cannot_load_leaves_the_api_up_and_health_503(tmp_path: Path) -> None:
    # A complete folder whose UNet weights were cut short after their header: it passes the
    # CLI's pre-flight check, and fails only when the worker loads the tensors.
    broken = tmp_path / "broken-model"
    build_random("random:tiny").save(broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[: header + 16])
    server = ServerProcess(tmp_path / "data", model=str(broken)).start()
    try:
        deadline = time.monotonic() + 120
        body = None
        while time.monotonic() < deadline:
            response = server.health()
            if response is not None and response.json().get("error"):
                body = response
                break
            time.sleep(0.2)
        assert body is not None, server.log_tail()
        assert body.status_code == 503 and body.json()["state"] in ("failed", "loading")
        # v1 cannot be served now: 502 at once rather than a wait for an engine that is not there.
        v1 = httpx.post(f"{server.url}/v1/seg-beyond", json=request_body(), timeout=30)
        assert v1.status_code == 502 and "not available" in v1.json()["error"]
        # v2 work is still accepted and kept for when a worker comes up.
        job = submit(server)
        assert status(server, job["request_id"]).json()["status"] == "QUEUED"
    finally:
        server.stop()


def test_kill_minus_nine_of_redis_loses_no_queued_job(tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path / "redis").start()
    # A job whose result could not be stored while Redis was down is taken again after this long.
    server = ServerProcess(tmp_path / "data", env={"BEYOND_REDIS_URL": redis_server.url, "BEYOND_RECLAIM_AFTER": "3"})
    try:
        server.start().wait_ready()
        jobs = [submit(server, seed=i, steps=40) for i in range(4)]
        wait_for(server, jobs[0]["request_id"], lambda b: b.get("progress", 0) > 0)
        redis_server.kill()
        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 503 and "unreachable" in health.json()["store"]
        refused = httpx.post(f"{server.url}/v2/seg-beyond", json=request_body(), timeout=30)
        assert refused.status_code == 503 and set(refused.json()) == {"error"}
        time.sleep(1)
        redis_server.restart()
        for job in jobs:
            body = wait_for(server, job["request_id"], finished, timeout=300)
            assert body["status"] == "COMPLETED", body
        seeds = [result(server, job["request_id"]).json()["seeds"][0] for job in jobs]
        assert seeds == list(range(4))
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    finally:
        server.stop()
        redis_server.stop()
