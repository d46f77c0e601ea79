"""The /v2 queue through a real server: the SDK's run / submit_async / wait, states, outputs, cancel.

Every test runs on the shared SQLite server and on a server whose job store is Redis."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import segmind
from segmind.v2 import InferenceFailed

from tests.helpers import LONG_JOB, ServerProcess, jpeg, request_body, smooth_image
from tests.redis_helpers import RedisServer


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def server(request: pytest.FixtureRequest, server: ServerProcess, tmp_path_factory: pytest.TempPathFactory):
    """The session's SQLite server, then one on its own redis-server."""
    if request.param == "sqlite":
        yield server
        return
    yield from redis_backed_server(tmp_path_factory)


def redis_backed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    redis_server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    proc = ServerProcess(tmp_path_factory.mktemp("server-redis"), env={"BEYOND_REDIS_URL": redis_server.url})
    try:
        yield proc.start().wait_ready()
    finally:
        proc.stop()
        redis_server.stop()


def sdk(server: ServerProcess) -> segmind.SegmindClient:
    return segmind.SegmindClient(api_key="SG_0123456789abcdef", base_url=f"{server.url}/v1")


def submit(server: ServerProcess, **fields: object) -> dict:
    response = httpx.post(f"{server.url}/v2/seg-beyond", json=request_body(**fields), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def status(server: ServerProcess, request_id: str) -> httpx.Response:
    return httpx.get(f"{server.url}/v2/requests/{request_id}/status", timeout=30)


def wait_for(server: ServerProcess, request_id: str, predicate, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = status(server, request_id).json()
        if predicate(body):
            return body
        time.sleep(0.05)
    raise TimeoutError(f"{request_id}: last status {body}")


def finished(body: dict) -> bool:
    return body.get("status") in ("COMPLETED", "FAILED")


def result(server: ServerProcess, request_id: str) -> httpx.Response:
    return httpx.get(f"{server.url}/v2/requests/{request_id}", timeout=30)


def test_sdk_run_returns_a_result_whose_output_url_serves_the_image(server: ServerProcess) -> None:
    body = sdk(server).run("seg-beyond", **request_body(smooth_image(96, 64), left=40, top=8, seed=21))
    assert body["status"] == "COMPLETED"
    assert body["metrics"]["inference_time"] > 0
    assert body["metrics"]["total_time"] >= body["metrics"]["inference_time"]
    assert body["metrics"]["queue_time"] >= 0
    assert body["seeds"] == [21]
    assert body["parameters"]["left"] == 40 and "input_image" not in body["parameters"]
    assert body["output"].startswith(server.url + "/v2/requests/")
    image = jpeg(httpx.get(body["output"], timeout=30).content)
    assert image.size == (96 + 40, 64 + 8)


def test_submit_async_and_wait(server: ServerProcess) -> None:
    job = sdk(server).submit_async("seg-beyond", **request_body(samples=4, seed=5))
    assert job.status_url.startswith(server.url) and job.response_url.startswith(server.url)
    body = job.wait(timeout=120, interval=0.2)
    assert len(body["outputs"]) == 4 and body["seeds"] == [5, 6, 7, 8]
    sizes = {jpeg(httpx.get(url, timeout=30).content).size for url in body["outputs"]}
    assert sizes == {(96 + 32, 64)}
    assert body["prompts"]["positive"] and len(body["prompts"]["negative"]) == 4


def test_a_job_that_fails_at_processing_time(server: ServerProcess, images) -> None:
    # The URL is checked at submission (it is allowed) but answers 404 when the job runs.
    job = sdk(server).submit_async("seg-beyond", **request_body(input_image=images.url + "/gone.png"))
    with pytest.raises(InferenceFailed) as caught:
        job.wait(timeout=120, interval=0.2)
    assert "input_image" in caught.value.detail and "404" in caught.value.detail
    for response in (status(server, job.request_id), result(server, job.request_id)):
        assert response.status_code == 422
        body = response.json()
        assert body["status"] == "FAILED" and body["error"] == caught.value.detail


def test_unknown_request_ids_are_404(server: ServerProcess) -> None:
    for path in ("/status", "", "/outputs/0.jpg"):
        response = httpx.get(f"{server.url}/v2/requests/0123456789abcdef{path}", timeout=30)
        assert response.status_code == 404
        assert "error" in response.json()
    assert httpx.post(f"{server.url}/v2/requests/nope/cancel", timeout=30).status_code == 404
    assert httpx.post(f"{server.url}/v2/other-model", json=request_body(), timeout=30).status_code == 404


def test_submission_is_validated_synchronously(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v2/seg-beyond", json=request_body(samples=9), timeout=30)
    assert response.status_code == 400 and response.json()["error"].startswith("samples: ")
    with pytest.raises(segmind.SegmindError) as caught:
        sdk(server).submit_async("seg-beyond", **request_body(sampler="nope"))
    assert caught.value.status == 400 and caught.value.detail.startswith("sampler: ")


def test_base64_results_are_inline(server: ServerProcess) -> None:
    job = submit(server, base64=True, samples=2, seed=3)
    wait_for(server, job["request_id"], finished)
    body = result(server, job["request_id"]).json()
    assert len(body["outputs"]) == 2 and body["output"] == body["outputs"][0]
    assert jpeg(base64.b64decode(body["output"])).size == (96 + 32, 64)


def test_v1_requests_are_readable_through_v2(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v1/seg-beyond", json=request_body(seed=77), timeout=120)
    request_id = response.headers["x-request-id"]
    body = result(server, request_id).json()
    assert body["status"] == "COMPLETED" and body["seeds"] == [77]
    assert httpx.get(body["output"], timeout=30).content == response.content


def test_queue_position_progress_and_one_order_for_v1_and_v2(server: ServerProcess) -> None:
    long_job = submit(server, steps=100)
    second = submit(server, steps=20)
    body = status(server, second["request_id"]).json()
    assert body["status"] == "QUEUED" and body["queue_position"] >= 0
    running = wait_for(server, long_job["request_id"], lambda b: b.get("progress", 0) > 0)
    assert running["status"] == "PROCESSING" and 0 < running["progress"] < 1
    v1 = httpx.post(f"{server.url}/v1/seg-beyond", json=request_body(seed=4), timeout=300)
    assert v1.status_code == 200
    first_done = result(server, long_job["request_id"]).json()
    v1_body = result(server, v1.headers["x-request-id"]).json()
    second_done = result(server, second["request_id"]).json()
    # The v1 request waited its turn behind both v2 jobs. (It may start before the second one's
    # images are encoded and stored: the worker finishes one job while it denoises the next.)
    assert first_done["started_at"] <= second_done["started_at"] <= v1_body["started_at"]
    assert first_done["completed_at"] <= second_done["completed_at"] <= v1_body["completed_at"]


def test_cancel_a_queued_and_a_running_job(server: ServerProcess) -> None:
    running = submit(server, **LONG_JOB)
    queued = submit(server, **LONG_JOB)
    cancelled = httpx.post(f"{server.url}/v2/requests/{queued['request_id']}/cancel", timeout=30)
    assert cancelled.status_code == 200
    response = status(server, queued["request_id"])
    assert response.status_code == 422 and response.json() == {
        "status": "FAILED",
        "request_id": queued["request_id"],
        "error": "cancelled",
    }
    wait_for(server, running["request_id"], lambda b: b.get("progress", 0) > 0.05)
    httpx.post(f"{server.url}/v2/requests/{running['request_id']}/cancel", timeout=30)
    started = time.monotonic()
    final = wait_for(server, running["request_id"], finished, timeout=30)
    assert final == {"status": "FAILED", "request_id": running["request_id"], "error": "cancelled"}
    assert time.monotonic() - started < 10  # stopped at its next step, not after 100
    # The worker goes on serving.
    assert httpx.post(f"{server.url}/v1/seg-beyond", json=request_body(seed=8), timeout=120).status_code == 200
    done = submit(server)
    wait_for(server, done["request_id"], finished)
    again = httpx.post(f"{server.url}/v2/requests/{done['request_id']}/cancel", timeout=30)
    assert again.status_code == 409


def test_twenty_concurrent_submissions_all_complete_in_order(server: ServerProcess) -> None:
    def one(i: int) -> dict:
        return submit(server, seed=i, guidance_scale=1.0, image=smooth_image(48, 48), left=16)

    with ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(one, range(20)))
    bodies = []
    for job in jobs:
        wait_for(server, job["request_id"], finished, timeout=300)
        bodies.append(result(server, job["request_id"]).json())
    assert all(b["status"] == "COMPLETED" for b in bodies)
    # Acceptance times come from the store's write lock (millisecond ticks: ties are possible).
    by_arrival = sorted(bodies, key=lambda b: (b["created_at"], b["started_at"]))
    assert [b["request_id"] for b in by_arrival] == [
        b["request_id"] for b in sorted(bodies, key=lambda b: b["started_at"])
    ]
    completions = [b["completed_at"] for b in by_arrival]
    assert completions == sorted(completions)
