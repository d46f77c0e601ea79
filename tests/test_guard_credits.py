"""Per-key settings from a keys file: endpoints (403) and credits (charge, refund, 406, restart)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, request_body, serve_expecting_exit, smooth_image

METERED, V2_ONLY = "SG_cccccccccccccccc", "SG_dddddddddddddddd"
COST = round(20 / 30, 4)  # samples 1 x 20 steps / 30 x 1 megapixel


def post(server: ServerProcess, key: str, version: str = "v2", **fields: object) -> httpx.Response:
    body = request_body(image=smooth_image(48, 48), **{"left": 16, "guidance_scale": 1.0, **fields})
    return httpx.post(f"{server.url}/{version}/seg-beyond", json=body, headers={"x-api-key": key}, timeout=120)


def wait_done(server: ServerProcess, key: str, request_id: str) -> dict:
    deadline = time.monotonic() + 120
    while True:
        body = httpx.get(f"{server.url}/v2/requests/{request_id}/status", headers={"x-api-key": key}).json()
        if body["status"] in ("COMPLETED", "FAILED"):
            return body
        assert time.monotonic() < deadline
        time.sleep(0.1)


def balance(response: httpx.Response) -> float:
    return float(response.headers["x-remaining-credits"])


def test_endpoints_and_credits_from_the_keys_file(tmp_path: Path, images) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {"key": METERED, "name": "team-a", "credits": 3},
                    {"key": V2_ONLY, "name": "scripts", "endpoints": ["v2"]},
                ]
            }
        )
    )
    env = {"BEYOND_API_KEYS_FILE": str(keys)}
    server = ServerProcess(tmp_path / "data", env=env).start().wait_ready()
    try:
        # Endpoints: a v2-only key gets 403 on v1 and works on v2, with no credits header.
        assert post(server, V2_ONLY, "v1").status_code == 403
        unmetered = post(server, V2_ONLY)
        assert unmetered.status_code == 200 and "x-remaining-credits" not in unmetered.headers

        # Charged at submission: samples 1 x 20 steps / 30 x 1 MP.
        first = post(server, METERED, seed=1)
        assert first.status_code == 200 and balance(first) == pytest.approx(3 - COST, abs=1e-4)
        assert wait_done(server, METERED, first.json()["request_id"])["status"] == "COMPLETED"

        # A job that fails is refunded.
        failing = post(server, METERED, input_image=images.url + "/nothing-here.png")
        assert balance(failing) == pytest.approx(3 - 2 * COST, abs=1e-4)
        wait_done(server, METERED, failing.json()["request_id"])
        status = httpx.get(
            f"{server.url}/v2/requests/{failing.json()['request_id']}/status", headers={"x-api-key": METERED}
        )
        assert status.status_code == 422 and balance(status) == pytest.approx(3 - COST, abs=1e-4)

        # Too expensive: 406 before queueing, nothing charged.
        queued_before = httpx.get(f"{server.url}/health").json()["queued"]
        dear = post(server, METERED, samples=4, steps=100)
        assert dear.status_code == 406 and "insufficient credits" in dear.json()["error"]
        assert balance(dear) == pytest.approx(3 - COST, abs=1e-4)
        assert httpx.get(f"{server.url}/health").json()["queued"] == queued_before
    finally:
        server.kill()

    # The ledger lives in the job store: a restart keeps it (and does not reset it to 3).
    again = ServerProcess(tmp_path / "data", env=env).start().wait_ready()
    try:
        response = httpx.get(f"{again.url}/v2/requests/{first.json()['request_id']}", headers={"x-api-key": METERED})
        assert response.status_code == 200 and balance(response) == pytest.approx(3 - COST, abs=1e-4)
    finally:
        again.stop()


def test_a_malformed_keys_file_stops_startup_without_echoing_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"name": "no key here", "credits": "SG_secretsecret12"}]}')
    done = serve_expecting_exit(tmp_path / "d", {"BEYOND_API_KEYS_FILE": str(keys)})
    assert done.returncode == 2 and "keys.json" in done.stderr
    assert "SG_secretsecret12" not in done.stderr
