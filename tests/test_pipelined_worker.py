"""The pipelined, batching worker through a real server (BEYOND_MAX_BATCH=2): order, cancel, previews, a kill -9."""

from __future__ import annotations

import io
import os
import re
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from tests.helpers import ServerProcess, smooth_image
from tests.test_queue import finished, result, status, submit, wait_for

SMALL = dict(image=smooth_image(48, 48), left=16, guidance_scale=1.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("pipelined"), env={"BEYOND_MAX_BATCH": "2"}).start()
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def batches(server: ServerProcess) -> list[set[str]]:
    """The batches of more than one job the worker ran, from its log."""
    found = re.findall(r"denoising \d+ jobs in one batch: ([0-9a-f ]+)", server.log_path.read_text(errors="replace"))
    return [set(ids.split()) for ids in found]


def output(server: ServerProcess, request_id: str) -> bytes:
    body = result(server, request_id).json()
    assert body["status"] == "COMPLETED", body
    response = httpx.get(body["output"], timeout=30)
    assert response.status_code == 200
    return response.content


def test_queued_jobs_are_batched_and_complete_in_fifo_order(server: ServerProcess) -> None:
    blocker = submit(server, steps=40, seed=99, **SMALL)  # the others wait in the queue behind it
    jobs = [submit(server, steps=20, seed=i, **SMALL) for i in range(5)]
    ids = [job["request_id"] for job in jobs]
    for request_id in [blocker["request_id"], *ids]:
        assert wait_for(server, request_id, finished, timeout=240)["status"] == "COMPLETED"
    bodies = [result(server, request_id).json() for request_id in ids]
    assert [b["seeds"][0] for b in bodies] == list(range(5))
    started = [b["started_at"] for b in bodies]
    completed = [b["completed_at"] for b in bodies]
    assert started == sorted(started) and completed == sorted(completed)
    # Consecutive jobs shared batches: the first two waited together behind the blocker.
    ran_together = [batch for batch in batches(server) if batch <= set(ids)]
    assert set(ids[:2]) in ran_together


def test_a_cancelled_batched_job_ends_cancelled_and_its_partner_is_as_alone(server: ServerProcess) -> None:
    blocker = submit(server, steps=40, seed=98, **SMALL)
    doomed = submit(server, steps=60, seed=5, prompt="a red barn", **SMALL)
    partner = submit(server, steps=60, seed=6, **SMALL)
    wait_for(server, doomed["request_id"], lambda b: b.get("progress", 0) > 0.05, timeout=120)
    assert {doomed["request_id"], partner["request_id"]} in batches(server)
    assert httpx.post(f"{server.url}/v2/requests/{doomed['request_id']}/cancel", timeout=30).status_code == 200
    final = wait_for(server, doomed["request_id"], finished, timeout=30)
    assert final == {"status": "FAILED", "request_id": doomed["request_id"], "error": "cancelled"}
    # Answered at once, while its partner still runs.
    assert status(server, partner["request_id"]).json()["status"] == "PROCESSING"
    assert wait_for(server, partner["request_id"], finished, timeout=240)["status"] == "COMPLETED"
    assert wait_for(server, blocker["request_id"], finished, timeout=10)["status"] == "COMPLETED"
    alone = submit(server, steps=60, seed=6, **SMALL)  # the same request, with nothing to share a batch
    assert wait_for(server, alone["request_id"], finished, timeout=240)["status"] == "COMPLETED"
    assert not any(alone["request_id"] in batch for batch in batches(server))
    assert output(server, alone["request_id"]) == output(server, partner["request_id"])


def test_a_running_job_has_a_live_jpeg_preview(server: ServerProcess) -> None:
    job = submit(server, steps=60, seed=3, **SMALL)
    request_id = job["request_id"]
    body = wait_for(server, request_id, lambda b: "preview" in b or finished(b), timeout=120)
    assert body["status"] == "PROCESSING" and body["preview"] == f"{server.url}/v2/requests/{request_id}/preview.jpg"
    response = httpx.get(body["preview"], timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.format == "JPEG" and max(picture.size) == 256
    first = response.content
    time.sleep(1.5)  # at most one new preview every 500 ms, and a few steps later it has changed
    if status(server, request_id).json()["status"] == "PROCESSING":
        assert httpx.get(body["preview"], timeout=30).content != first
    done = wait_for(server, request_id, finished, timeout=240)
    assert done["status"] == "COMPLETED" and "preview" not in done
    assert httpx.get(f"{server.url}/v2/requests/{'0' * 32}/preview.jpg", timeout=30).status_code == 404


def test_kill_minus_nine_of_the_worker_retries_every_job_it_held(server: ServerProcess) -> None:
    jobs = [submit(server, steps=100, seed=20 + i, **SMALL) for i in range(2)]
    ids = [job["request_id"] for job in jobs]
    wait_for(server, ids[0], lambda b: b.get("progress", 0) > 0.05, timeout=120)
    os.kill(server.worker_pid(), signal.SIGKILL)
    for request_id in ids:
        assert wait_for(server, request_id, finished, timeout=300)["status"] == "COMPLETED"
    log = server.log_path.read_text(errors="replace")
    for request_id in ids:
        assert f"job {request_id} after worker death: QUEUED" in log
    assert [result(server, i).json()["seeds"][0] for i in ids] == [20, 21]
