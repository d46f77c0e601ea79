"""The extensions of the hosted API through real servers on loopback: webhooks, output formats, listing.

Two servers serve the module: `hooked` (a webhook secret, no keys: restarted by the last test) and `keyed`
(two API keys, no secret: the configuration of today's API). Webhook receivers are loopback HTTP servers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from standardwebhooks import Webhook, WebhookVerificationError

from models.canvas import SEAM_BAND
from tests.helpers import ImageServer, ServerProcess, noise_image, request_body, serve_expecting_exit

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
KEY_A, KEY_B = "sk-integrations-a-0123456789", "sk-integrations-b-0123456789"
# The keys of a v2 result body and of its `parameters` before the extensions: a request without them sees these.
RESULT_KEYS = {
    "status", "request_id", "created_at", "started_at", "parameters", "output", "outputs", "seeds", "width", "height",
    "completed_at", "expires_at", "metrics", "prompts", "styles", "notes", "working_size",
}  # fmt: skip
PARAMETER_KEYS = {
    "prompt", "negative_prompt", "steps", "samples", "styles", "seed", "guidance_scale", "scheduler", "sampler",
    "left", "right", "top", "bottom",
}  # fmt: skip


class Receiver:
    """A webhook receiver on 127.0.0.1: answers each POST with the next status of `script`, then 200."""

    def __init__(self, script: list[int] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.arrived:
                    status = receiver.script.pop(0) if receiver.script else 200
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    receiver.arrived.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook?token=abc"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def wait(self, count: int, timeout: float = 90.0) -> list[tuple[dict[str, str], bytes]]:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.requests) >= count, timeout):
                raise TimeoutError(f"{len(self.requests)} webhook requests arrived, not {count}")
            return list(self.requests)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


def receiver(made: list[Receiver], script: list[int] | None = None) -> Receiver:
    made.append(Receiver(script))
    return made[-1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Both servers, started side by side (each start is mostly waiting on imports and the model)."""
    hooked = ServerProcess(tmp_path_factory.mktemp("hooked"), env={"BEYOND_WEBHOOK_SECRET": SECRET})
    keyed = ServerProcess(tmp_path_factory.mktemp("keyed"), env={"BEYOND_API_KEYS": f"{KEY_A},{KEY_B}"})
    try:
        hooked.start(), keyed.start()
        yield hooked.wait_ready(), keyed.wait_ready()
    finally:
        hooked.stop()
        keyed.stop()


@pytest.fixture(scope="module")
def hooked(servers: tuple[ServerProcess, ServerProcess]) -> ServerProcess:
    """A webhook secret, no keys; restarted by the last test."""
    return servers[0]


@pytest.fixture(scope="module")
def keyed(servers: tuple[ServerProcess, ServerProcess]) -> ServerProcess:
    """Two API keys and no webhook secret: the configuration of today's API."""
    return servers[1]


def post(server: ServerProcess, key: str | None = None, **fields: Any) -> httpx.Response:
    headers = {"x-api-key": key} if key else {}
    return httpx.post(f"{server.url}/v2/seg-beyond", json=request_body(**fields), headers=headers, timeout=30)


def submit(server: ServerProcess, key: str | None = None, **fields: Any) -> str:
    response = post(server, key, **fields)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def result(server: ServerProcess, request_id: str, key: str | None = None) -> httpx.Response:
    headers = {"x-api-key": key} if key else {}
    return httpx.get(f"{server.url}/v2/requests/{request_id}", headers=headers, timeout=30)


def wait_result(
    server: ServerProcess, request_id: str, key: str | None = None, timeout: float = 120.0
) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = result(server, request_id, key)
        if response.json().get("status") in ("COMPLETED", "FAILED"):
            return response
        time.sleep(0.1)
    raise TimeoutError(f"{request_id} did not finish: {response.text}")


def wait_webhook(server: ServerProcess, request_id: str, attempts: int, timeout: float = 60.0) -> dict:
    """The result's `webhook` once `attempts` attempts are recorded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        webhook = result(server, request_id).json()["webhook"]
        if webhook["attempts"] >= attempts:
            return webhook
        time.sleep(0.1)
    raise TimeoutError(f"{request_id}: webhook {webhook}")


def verified(headers: dict[str, str], body: bytes) -> dict:
    """The body, once its signature checks out with the server's secret (and fails with another)."""
    other = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)
    return Webhook(SECRET).verify(body, headers)


def without_webhook(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "webhook"}


# -- webhooks -----------------------------------------------------------------------------------------


def test_a_completed_request_is_posted_signed_with_its_result_body(hooked: ServerProcess, receivers) -> None:
    hook = receiver(receivers)
    request_id = submit(hooked, webhook_url=hook.url, seed=7)
    [(headers, body)] = hook.wait(1)
    payload = verified(headers, body)
    assert headers["content-type"] == "application/json" and headers["webhook-id"] == f"msg_{request_id}"
    webhook = wait_webhook(hooked, request_id, 1)
    assert webhook == {"delivered": True, "attempts": 1, "last_status": 200, "error": None}
    answer = result(hooked, request_id)
    # The body GET answers, less the delivery's own status; its output URLs are absolute and serve the image.
    assert payload == without_webhook(answer.json()) and payload["status"] == "COMPLETED"
    assert payload["output"].startswith(f"{hooked.url}/v2/requests/{request_id}/outputs/0.jpg")
    assert httpx.get(payload["output"], timeout=30).headers["content-type"] == "image/jpeg"
    assert "webhook_url" not in payload["parameters"] and set(payload["parameters"]) == PARAMETER_KEYS
    assert SECRET.removeprefix("whsec_") not in hooked.log_path.read_text()


def test_failed_requests_are_posted_with_the_422_body(hooked: ServerProcess, receivers, images: ImageServer) -> None:
    hook = receiver(receivers)
    # Failed by the input stage: the URL passes the guard at submission, then answers 404.
    by_input = submit(hooked, webhook_url=hook.url, input_image=images.url + "/nothing-here.png")
    # A long request runs while a second waits behind it; both are cancelled, the queued one at once.
    running = submit(hooked, webhook_url=hook.url, steps=100, samples=4)
    queued = submit(hooked, webhook_url=hook.url)
    for request_id in (queued, running):
        assert httpx.post(f"{hooked.url}/v2/requests/{request_id}/cancel", timeout=30).status_code == 200
    bodies = {}
    for headers, body in hook.wait(3):
        payload = verified(headers, body)
        bodies[payload["request_id"]] = payload
    assert set(bodies) == {by_input, running, queued}
    assert "input_image" in bodies[by_input]["error"] and "404" in bodies[by_input]["error"]
    assert bodies[queued]["error"] == bodies[running]["error"] == "cancelled"
    for request_id, payload in bodies.items():
        wait_webhook(hooked, request_id, 1)
        answer = result(hooked, request_id)
        assert answer.status_code == 422
        assert answer.json()["webhook"]["delivered"] is True
        assert payload == without_webhook(answer.json()) == {"status": "FAILED", "request_id": request_id,
                                                              "error": payload["error"]}  # fmt: skip


def test_a_receiver_that_fails_once_gets_the_same_message_again(hooked: ServerProcess, receivers) -> None:
    hook = receiver(receivers, script=[500])
    request_id = submit(hooked, webhook_url=hook.url)
    assert wait_webhook(hooked, request_id, 1) == {
        "delivered": False, "attempts": 1, "last_status": 500, "error": "HTTP 500"
    }  # fmt: skip
    (first_headers, first), (second_headers, second) = hook.wait(2, timeout=60)
    assert first_headers["webhook-id"] == second_headers["webhook-id"] == f"msg_{request_id}"
    assert verified(second_headers, second) == verified(first_headers, first)
    assert wait_webhook(hooked, request_id, 2) == {"delivered": True, "attempts": 2, "last_status": 200, "error": None}


def test_webhook_urls_are_checked_at_submission(hooked: ServerProcess, keyed: ServerProcess) -> None:
    before = httpx.get(f"{hooked.url}/v2/requests?limit=100", timeout=30).json()["requests"]
    refusals = {
        # Link-local (cloud metadata) is refused even with BEYOND_ALLOW_PRIVATE_URLS=1; no connection is made.
        "http://169.254.169.254/hook": "forbidden address",
        "ftp://127.0.0.1/hook": "only http and https",
        "javascript:alert(1)": "only http and https",
    }
    for url, reason in refusals.items():
        response = post(hooked, webhook_url=url)
        assert response.status_code == 400, url
        assert response.json()["error"].startswith("webhook_url: ") and reason in response.json()["error"], url
    # Nothing was queued for them.
    assert httpx.get(f"{hooked.url}/v2/requests?limit=100", timeout=30).json()["requests"] == before
    # Without a secret the server cannot sign: a webhook_url is refused, saying so.
    response = post(keyed, KEY_A, webhook_url="http://127.0.0.1:9/hook")
    assert response.status_code == 400 and response.json()["error"].startswith("webhook_url: ")
    assert "BEYOND_WEBHOOK_SECRET" in response.json()["error"]


def test_a_malformed_secret_stops_the_start_without_showing_it(tmp_path) -> None:
    secret = "whsec_" + "not base64!" * 3
    done = serve_expecting_exit(tmp_path / "data", {"BEYOND_WEBHOOK_SECRET": secret})
    assert done.returncode == 2
    assert "webhook secret" in done.stderr and "not base64" not in done.stdout + done.stderr


# -- output formats -----------------------------------------------------------------------------------


def test_png_keeps_the_original_pixels_outside_the_seam(hooked: ServerProcess) -> None:
    original = noise_image(96, 64, seed=3)  # noise: any re-encoding or resampling would show
    request_id = submit(hooked, image=original, output_format="png", left=40, top=24, bottom=8, seed=11)
    body = wait_result(hooked, request_id).json()
    assert body["output"].endswith("/outputs/0.png")
    response = httpx.get(body["output"], timeout=30)
    assert response.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.format == "PNG" and picture.size == (96 + 40, 64 + 24 + 8)
    pixels = np.asarray(picture.convert("RGB"))
    # Padded: left, top, bottom. SEAM_BAND pixels in from each of them the output is the input, bit for bit.
    kept = pixels[24 + SEAM_BAND : 24 + 64 - SEAM_BAND, 40 + SEAM_BAND : 40 + 96]
    assert np.array_equal(kept, np.asarray(original)[SEAM_BAND : 64 - SEAM_BAND, SEAM_BAND:])
    # The JPEG extension's URL is no output of this request.
    assert httpx.get(body["output"].replace(".png", ".jpg"), timeout=30).status_code == 404


def test_webp_decodes_and_v1_answers_its_type(hooked: ServerProcess) -> None:
    request_id = submit(hooked, output_format="webp", output_quality=80, seed=2)
    body = wait_result(hooked, request_id).json()
    assert body["output"].endswith("/outputs/0.webp") and "output_format" not in body["parameters"]
    response = httpx.get(body["output"], timeout=30)
    assert response.headers["content-type"] == "image/webp"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.format == "WEBP" and picture.size == (96 + 32, 64)
    picture.load()
    sync = httpx.post(f"{hooked.url}/v1/seg-beyond", json=request_body(output_format="webp", seed=2), timeout=120)
    assert sync.status_code == 200 and sync.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(sync.content)).format == "WEBP"


@pytest.mark.parametrize(
    ("field", "value"),
    [("output_format", "gif"), ("output_format", "JPEG"), ("output_quality", 0), ("output_quality", 101),
     ("output_quality", "95"), ("webhook_url", 5)],
)  # fmt: skip
def test_bad_extension_values_are_400s_naming_the_field(keyed: ServerProcess, field: str, value: object) -> None:
    response = post(keyed, KEY_A, **{field: value})
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"{field}: ")


def test_a_request_without_extensions_is_served_as_before(keyed: ServerProcess) -> None:
    plain = submit(keyed, KEY_A, seed=42)
    explicit = submit(
        keyed, KEY_A, seed=42, output_format="jpeg", output_quality=95, seam_width=16, color_match=False, loras=[]
    )
    bodies = [wait_result(keyed, request_id, KEY_A).json() for request_id in (plain, explicit)]
    for body in bodies:
        assert set(body) == RESULT_KEYS and set(body["parameters"]) == PARAMETER_KEYS
        assert body["output"].endswith("/outputs/0.jpg")
    images = [httpx.get(body["output"], timeout=30) for body in bodies]
    assert images[0].headers["content-type"] == "image/jpeg"
    assert images[0].content == images[1].content and images[0].content[:3] == b"\xff\xd8\xff"
    # A different quality is a different file: the comparison above can fail.
    other = wait_result(keyed, submit(keyed, KEY_A, seed=42, output_quality=60), KEY_A).json()
    assert httpx.get(other["output"], timeout=30).content != images[0].content
    assert bodies[0]["parameters"] == bodies[1]["parameters"] == other["parameters"]


def test_the_extensions_are_documented_in_the_openapi_schema(keyed: ServerProcess) -> None:
    schema = httpx.get(f"{keyed.url}/openapi.json", timeout=30).json()
    request = schema["components"]["schemas"]["SegBeyondRequest"]["properties"]
    for name in ("output_format", "output_quality", "webhook_url", "seam_width", "color_match", "loras"):
        assert request[name]["description"].startswith("Extension of the hosted API:"), name
    assert schema["paths"]["/v1/loras"]["get"]["description"].startswith("Extension of the hosted API:")
    result_fields = schema["components"]["schemas"]["ResultResponse"]["properties"]
    assert result_fields["webhook"]["description"].startswith("Extension of the hosted API:")
    listing = schema["paths"]["/v2/requests"]["get"]
    assert listing["description"].startswith("Extension of the hosted API:")
    assert {p["name"] for p in listing["parameters"]} == {"limit", "status", "cursor"}


# -- listing ------------------------------------------------------------------------------------------


def listing(server: ServerProcess, key: str | None = None, **query: Any) -> httpx.Response:
    headers = {"x-api-key": key} if key else {}
    return httpx.get(f"{server.url}/v2/requests", params=query, headers=headers, timeout=30)


def test_listing_shows_only_the_callers_requests_newest_first(keyed: ServerProcess) -> None:
    mine = [submit(keyed, KEY_A, seed=s) for s in (1, 2)]
    theirs = submit(keyed, KEY_B, seed=4)
    for request_id in mine:
        wait_result(keyed, request_id, KEY_A)
    everything_a = listing(keyed, KEY_A, limit=100).json()["requests"]
    ids_a = [item["request_id"] for item in everything_a]
    assert ids_a[:2] == mine[::-1] and theirs not in ids_a
    ids_b = [item["request_id"] for item in listing(keyed, KEY_B, limit=100).json()["requests"]]
    assert theirs in ids_b and not set(ids_a) & set(ids_b)
    # Paged by the cursor, one at a time: the same order, nothing twice.
    pages, cursor = [], None
    while True:
        page = listing(keyed, KEY_A, limit=1, **({"cursor": cursor} if cursor else {})).json()
        assert len(page["requests"]) == 1
        pages.extend(item["request_id"] for item in page["requests"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == ids_a
    # Finished items say when, and where their images are.
    item = next(item for item in everything_a if item["request_id"] == mine[0])
    assert item["status"] == "COMPLETED" and item["created_at"] <= item["completed_at"]
    assert httpx.get(item["outputs"][0], timeout=30).headers["content-type"] == "image/jpeg"
    completed = listing(keyed, KEY_A, status="COMPLETED", limit=100).json()["requests"]
    assert completed and all(item["status"] == "COMPLETED" for item in completed)
    assert listing(keyed).status_code == 401
    # A cursor handed to one key shows another key nothing of the first key's.
    cursor_a = listing(keyed, KEY_A, limit=1).json()["next_cursor"]
    assert cursor_a is not None
    assert not {i["request_id"] for i in listing(keyed, KEY_B, cursor=cursor_a).json()["requests"]} & set(ids_a)


@pytest.mark.parametrize(
    ("name", "value"), [("limit", "0"), ("limit", "101"), ("limit", "ten"), ("status", "DONE"), ("cursor", "!!"),
                        ("cursor", base64.urlsafe_b64encode(b"seq:-3").decode()), ("cursor", "c2VxOng")],
)  # fmt: skip
def test_bad_listing_parameters_are_400s_naming_them(keyed: ServerProcess, name: str, value: str) -> None:
    response = listing(keyed, KEY_A, **{name: value})
    assert response.status_code == 400 and response.json()["error"].startswith(f"{name}: ")


def test_without_keys_the_listing_holds_the_requests_made_without_one(hooked: ServerProcess) -> None:
    request_id = submit(hooked, seed=5)
    ids = [item["request_id"] for item in listing(hooked, limit=100).json()["requests"]]
    assert ids[0] == request_id
    queued = listing(hooked, status="queued", limit=100).json()["requests"]
    assert all(item["status"] == "QUEUED" for item in queued)


# -- durability (last: it restarts the hooked server) --------------------------------------------------


def test_deliveries_survive_a_restart(hooked: ServerProcess, receivers) -> None:
    retried = receiver(receivers, script=[500])
    lost = receiver(receivers)
    first = submit(hooked, webhook_url=retried.url, seed=8)
    assert wait_webhook(hooked, first, 1)["last_status"] == 500  # the retry is due 10 s later
    second = submit(hooked, webhook_url=lost.url, seed=9)
    [(lost_headers, _)] = lost.wait(1)
    wait_webhook(hooked, second, 1)
    hooked.kill()
    # As if the process had died between the job's end and its enqueue: the start-up scan queues it again.
    with sqlite3.connect(hooked.data_dir / "webhooks.sqlite3") as db:
        assert db.execute("DELETE FROM webhooks WHERE job_id = ?", (second,)).rowcount == 1
    hooked.start().wait_ready()
    (_, _), (headers, body) = retried.wait(2, timeout=60)
    assert headers["webhook-id"] == f"msg_{first}" and verified(headers, body)["request_id"] == first
    (_, _), (again_headers, again) = lost.wait(2, timeout=60)
    assert again_headers["webhook-id"] == lost_headers["webhook-id"]
    payload = verified(again_headers, again)
    assert payload == json.loads(again) and payload["request_id"] == second and payload["status"] == "COMPLETED"
    assert wait_webhook(hooked, first, 2) == {"delivered": True, "attempts": 2, "last_status": 200, "error": None}
