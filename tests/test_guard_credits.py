"""Per-key settings from a (TOML) keys file: endpoints (403), per-key rate limits, /metrics behind a
key, credits (charge, refund, 406, x-remaining-credits, restart), and v1 while the worker is down."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import ImageServer, ServerProcess, request_body, serve_expecting_exit, smooth_image
from tests.redis_helpers import RedisServer

METERED, V2_ONLY, MONITOR = "SG_cccccccccccccccc", "SG_dddddddddddddddd", "SG_eeeeeeeeeeeeeeee"
COST = round(20 / 30, 4)  # samples 1 x 20 steps / 30 x 1 megapixel (a 64x48 canvas counts as 1)
# A URL input is priced as 1024x1024 before it is fetched: with left=16, 1040x1024 = 1.065 MP.
URL_COST = round(20 / 30 * 1040 * 1024 / 1e6, 4)


def keys_toml(credits: float) -> str:
    monitor = hashlib.sha256(MONITOR.encode()).hexdigest()
    return f"""
[[keys]]
key = "{METERED}"
name = "team-a"
credits = {credits}

[[keys]]
key = "{V2_ONLY}"
name = "scripts"
endpoints = ["v2"]
rate_limit = "3/minute"

[[keys]]
sha256 = "{monitor}"  # only the digest is on disk
name = "monitoring"
endpoints = ["metrics"]
"""


@dataclass
class Metered:
    server: ServerProcess
    keys: Path
    env: dict[str, str]


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def metered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metered]:
    """A server with metered keys, on each store in turn: the ledger is the store's."""
    folder = tmp_path_factory.mktemp("metered")
    keys = folder / "keys.toml"
    keys.write_text(keys_toml(3))
    env = {"BEYOND_API_KEYS_FILE": str(keys), "BEYOND_METRICS_REQUIRE_KEY": "1"}
    redis_server = RedisServer(folder / "redis").start() if request.param == "redis" else None
    if redis_server is not None:
        request.addfinalizer(redis_server.stop)
        env["BEYOND_REDIS_URL"] = redis_server.url
    server = ServerProcess(folder / "data", env=env).start()
    try:
        yield Metered(server.wait_ready(), keys, env)
    finally:
        server.stop()


def post(server: ServerProcess, key: str, version: str = "v2", **fields: object) -> httpx.Response:
    body = request_body(image=smooth_image(48, 48), **{"left": 16, "guidance_scale": 1.0, **fields})
    return httpx.post(f"{server.url}/{version}/seg-beyond", json=body, headers={"x-api-key": key}, timeout=120)


def get(server: ServerProcess, path: str, key: str | None) -> httpx.Response:
    return httpx.get(server.url + path, headers={"x-api-key": key} if key else {}, timeout=30)


def wait_done(server: ServerProcess, key: str, request_id: str) -> httpx.Response:
    deadline = time.monotonic() + 120
    while True:
        response = get(server, f"/v2/requests/{request_id}/status", key)
        if response.status_code == 422 or response.json()["status"] == "COMPLETED":
            return response
        assert time.monotonic() < deadline
        time.sleep(0.1)


def balance(response: httpx.Response) -> float:
    return float(response.headers["x-remaining-credits"])


def test_endpoints_per_key(metered: Metered) -> None:
    server = metered.server
    forbidden = post(server, V2_ONLY, "v1")
    assert forbidden.status_code == 403 and forbidden.json() == {"error": "this key may not use /v1"}
    assert post(server, MONITOR).status_code == 403
    unmetered = post(server, V2_ONLY, seed=5)
    assert unmetered.status_code == 200 and "x-remaining-credits" not in unmetered.headers
    # Its own rate limit, announced on every submission.
    assert unmetered.headers["X-RateLimit-Limit"] == "3" and unmetered.headers["X-RateLimit-Remaining"] == "2"
    assert int(unmetered.headers["X-RateLimit-Reset"]) >= time.time()


def test_metrics_can_require_a_key(metered: Metered) -> None:
    server = metered.server
    assert get(server, "/metrics", None).status_code == 401
    assert get(server, "/metrics", V2_ONLY).status_code == 403
    scraped = get(server, "/metrics", MONITOR)
    assert scraped.status_code == 200 and "beyond_queue_depth" in scraped.text
    assert get(server, "/health", None).status_code == 200


def test_a_key_has_its_own_rate_limit(metered: Metered) -> None:
    statuses = []
    for _ in range(4):
        response = post(metered.server, V2_ONLY, steps=5)  # invalid, but counted before the body is read
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) == {400}
    assert response.headers["X-RateLimit-Limit"] == "3" and response.headers["X-RateLimit-Remaining"] == "0"
    assert int(response.headers["Retry-After"]) >= 1
    # The server has no limit of its own: the metered key is not held back.
    assert post(metered.server, METERED, steps=5).status_code == 400


def test_credits_are_charged_refunded_and_checked_before_queueing(metered: Metered, images: ImageServer) -> None:
    server = metered.server
    first = post(server, METERED, seed=1)
    assert first.status_code == 200 and balance(first) == pytest.approx(3 - COST, abs=1e-4)
    done = wait_done(server, METERED, first.json()["request_id"])
    assert done.json()["status"] == "COMPLETED" and balance(done) == pytest.approx(3 - COST, abs=1e-4)

    # A job that fails (its URL answers 404 when the worker fetches it) is refunded.
    failing = post(server, METERED, input_image=images.url + "/nothing-here.png")
    assert failing.status_code == 200 and balance(failing) == pytest.approx(3 - COST - URL_COST, abs=1e-4)
    failed = wait_done(server, METERED, failing.json()["request_id"])
    assert failed.status_code == 422 and balance(failed) == pytest.approx(3 - COST, abs=1e-4)

    # Too expensive: 406 before queueing, nothing charged.
    queued_before = get(server, "/health", None).json()["queued"]
    dear = post(server, METERED, samples=4, steps=100)
    assert dear.status_code == 406 and "insufficient credits" in dear.json()["error"]
    assert balance(dear) == pytest.approx(3 - COST, abs=1e-4)
    assert get(server, "/health", None).json()["queued"] == queued_before
    # Errors carry the header too.
    assert balance(post(server, METERED, steps=5)) == pytest.approx(3 - COST, abs=1e-4)


def test_v1_while_the_worker_is_down_is_502_at_once(metered: Metered) -> None:
    server = metered.server
    os.kill(server.worker_pid(), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while get(server, "/health", None).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    down = post(server, METERED, "v1", seed=2)
    assert down.status_code == 502 and "the engine is not available" in down.json()["error"]
    assert time.monotonic() - started < 10
    assert balance(down) == pytest.approx(3 - COST, abs=1e-4)  # nothing charged
    server.wait_ready()
    up = post(server, METERED, "v1", seed=2)
    assert up.status_code == 200 and up.headers["content-type"] == "image/jpeg"
    assert balance(up) == pytest.approx(3 - 2 * COST, abs=1e-4)


def test_the_ledger_survives_a_kill_and_a_raised_grant_tops_it_up(metered: Metered) -> None:
    before = balance(get(metered.server, "/v2/requests/none/status", METERED))
    assert before == pytest.approx(3 - 2 * COST, abs=1e-4)
    metered.server.kill()
    metered.keys.write_text(keys_toml(5))  # 2 more credits granted
    again = ServerProcess(metered.server.data_dir, env=metered.env).start()
    try:
        again.wait_ready()
        response = get(again, "/v2/requests/none/status", METERED)
        assert response.status_code == 404 and balance(response) == pytest.approx(before + 2, abs=1e-4)
    finally:
        again.stop()


def test_a_malformed_keys_file_stops_startup_without_echoing_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"name": "no key here", "credits": "SG_secretsecret12"}]}')
    done = serve_expecting_exit(tmp_path / "d", {"BEYOND_API_KEYS_FILE": str(keys)})
    assert done.returncode == 2 and "keys.json" in done.stderr
    assert "SG_secretsecret12" not in done.stderr
