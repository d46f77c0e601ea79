"""The JSON bodies byte for byte: key order, absent and null members, number and text formatting.

A client that sends no extension reads exactly the bytes it read before the bodies were produced through
their models. In-process (no worker: the test moves the jobs through the store itself), on a real store.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path

import httpx
from pydantic import SecretStr

from models.styles import default_registry
from server.http.app import create_app
from server.http.results import webhook_body
from server.jobs.contract import PREVIEW_NAME, JobResult
from server.settings import Settings
from tests.helpers import ServerProcess, b64, encode, request_body, smooth_image
from tests.lora_helpers import write_kohya

BASE = "http://testserver"
IMAGE = b64(encode(smooth_image(16, 16)))
# A syntactically valid secret (Standard Webhooks' whsec_ and base64); nothing is delivered in these tests.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def iso(ts: float | None) -> str:
    return "null" if ts is None else json.dumps(datetime.fromtimestamp(ts, timezone.utc).isoformat())


async def client_of(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        yield client, app.state.services


def run(test: Callable[[httpx.AsyncClient, object], Awaitable[None]], settings: Settings) -> None:
    async def main() -> None:
        async for client, services in client_of(settings):
            await test(client, services)

    asyncio.run(main())


def test_v2_bodies_through_a_jobs_life(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient, services: object) -> None:
        store = services.store  # type: ignore[attr-defined]

        async def body(method: str, path: str, status: int = 200, **kwargs: object) -> bytes:
            response = await client.request(method, path, **kwargs)
            assert response.status_code == status, response.text
            assert response.headers["content-type"] == "application/json"
            return response.content

        fields = {"input_image": IMAGE, "left": 8, "steps": 20}
        first = {**fields, "prompt": 'a café ✓ "q"', "seed": 7, "styles": "Enhance"}
        submitted = await body("POST", "/v2/seg-beyond", json=first)
        a = json.loads(submitted)["request_id"]
        assert (
            submitted
            == (
                f'{{"request_id":"{a}","status":"QUEUED","status_url":"{BASE}/v2/requests/{a}/status",'
                f'"response_url":"{BASE}/v2/requests/{a}"}}'
            ).encode()
        )
        inline = {**fields, "prompt": "b", "seed": 8, "base64": True, "negative_prompt": "n", "guidance_scale": 7.5}
        second = await body("POST", "/v2/seg-beyond", json=inline)
        b = json.loads(second)["request_id"]
        assert await body("GET", f"/v2/requests/{b}/status") == (
            f'{{"status":"QUEUED","request_id":"{b}","queue_position":1}}'.encode()
        )
        job_b = store.get(b)
        parameters_b = (
            '{"prompt":"b","negative_prompt":"n","steps":20,"samples":1,"styles":["V2","Enhance","Sharp"],"seed":8,'
            '"guidance_scale":7.5,"scheduler":"karras","sampler":"dpmpp_2m_sde_gpu","left":8,"right":0,"top":0,'
            '"bottom":0}'
        )
        assert (
            await body("GET", f"/v2/requests/{b}")
            == (
                f'{{"status":"QUEUED","request_id":"{b}","created_at":{iso(job_b.created_at)},"started_at":null,'
                f'"parameters":{parameters_b}}}'
            ).encode()
        )

        assert store.claim_next().id == a
        store.mark_started(a, 1)
        store.set_progress(a, 1, 0.456789)
        assert await body("GET", f"/v2/requests/{a}/status") == (
            f'{{"status":"PROCESSING","request_id":"{a}","progress":0.4568}}'.encode()
        )
        store.put_file(a, PREVIEW_NAME, b"\xff\xd8")
        assert (
            await body("GET", f"/v2/requests/{a}/status")
            == (
                f'{{"status":"PROCESSING","request_id":"{a}","progress":0.4568,'
                f'"preview":"{BASE}/v2/requests/{a}/preview.jpg"}}'
            ).encode()
        )
        assert await body("GET", f"/v2/requests/{b}/status") == (
            f'{{"status":"QUEUED","request_id":"{b}","queue_position":0}}'.encode()
        )
        job_a = store.get(a)
        parameters_a = (
            '{"prompt":"a caf\u00e9 \u2713 \\"q\\"","negative_prompt":"","steps":20,"samples":1,"styles":["Enhance"],'
            '"seed":7,"guidance_scale":4.0,"scheduler":"karras","sampler":"dpmpp_2m_sde_gpu","left":8,"right":0,'
            '"top":0,"bottom":0}'
        )
        head_a = (
            f'{{"status":"PROCESSING","request_id":"{a}","created_at":{iso(job_a.created_at)},'
            f'"started_at":{iso(job_a.started_at)},"parameters":{parameters_a}'
        )
        assert await body("GET", f"/v2/requests/{a}") == (head_a + "}").encode()

        result = JobResult(
            outputs=("output-0.jpg", "output-1.jpg"),
            seeds=(7, 8),
            width=24,
            height=16,
            working_size=(384, 256),
            inference_time=1.234567,
            positive_prompts=("a café", "a café"),
            negative_prompts=("x", "x"),
            styles=("Enhance",),
            notes={"expansion": "skipped: no expansion model"},
        )
        store.complete(a, 1, result, {"output-0.jpg": b"\xff\xd8a", "output-1.jpg": b"\xff\xd8b"})
        assert await body("GET", f"/v2/requests/{a}/status") == (
            f'{{"status":"COMPLETED","request_id":"{a}"}}'.encode()
        )
        job_a = store.get(a)
        urls = [f"{BASE}/v2/requests/{a}/outputs/{i}.jpg" for i in range(2)]
        queue_time = round(job_a.started_at - job_a.created_at, 4)
        total_time = round(job_a.finished_at - job_a.created_at, 4)
        completed_a = (
            head_a.replace('"PROCESSING"', '"COMPLETED"', 1)
            + f',"output":"{urls[0]}","outputs":["{urls[0]}","{urls[1]}"],"seeds":[7,8],"width":24,"height":16,'
            f'"completed_at":{iso(job_a.finished_at)},"expires_at":{iso(job_a.expires_at)},'
            f'"metrics":{{"inference_time":1.2346,"queue_time":{queue_time!r},"total_time":{total_time!r}}},'
            '"prompts":{"positive":["a caf\u00e9","a caf\u00e9"],"negative":["x","x"]},"styles":["Enhance"],'
            '"notes":{"expansion":"skipped: no expansion model"},"working_size":[384,256]}'
        )
        assert await body("GET", f"/v2/requests/{a}") == completed_a.encode()
        # The event stream's data is the same body in json.dumps' default form (spaces, ASCII escapes).
        events = await client.get(f"/v2/requests/{a}/events")
        assert events.content == f"event: result\r\ndata: {json.dumps(json.loads(completed_a))}\r\n\r\n".encode()

        assert store.claim_next().id == b
        store.mark_started(b, 1)
        small = JobResult(
            outputs=("output-0.jpg",), seeds=(8,), width=24, height=16, working_size=(384, 256), inference_time=0.5
        )
        store.complete(b, 1, small, {"output-0.jpg": b"\xff\xd8c"})
        job_b = store.get(b)
        time_b = round(job_b.finished_at - job_b.created_at, 4)
        queue_b = round(job_b.started_at - job_b.created_at, 4)
        assert (
            await body("GET", f"/v2/requests/{b}")
            == (
                f'{{"status":"COMPLETED","request_id":"{b}","created_at":{iso(job_b.created_at)},'
                f'"started_at":{iso(job_b.started_at)},"parameters":{parameters_b},"output":"/9hj","outputs":["/9hj"],'
                f'"seeds":[8],"width":24,"height":16,"completed_at":{iso(job_b.finished_at)},'
                f'"expires_at":{iso(job_b.expires_at)},'
                f'"metrics":{{"inference_time":0.5,"queue_time":{queue_b!r},"total_time":{time_b!r}}},'
                '"prompts":{"positive":[],"negative":[]},"styles":[],"notes":{},"working_size":[384,256]}'
            ).encode()
        )

        listed_b = (
            f'{{"request_id":"{b}","status":"COMPLETED","created_at":{iso(job_b.created_at)},'
            f'"completed_at":{iso(job_b.finished_at)},"outputs":["{BASE}/v2/requests/{b}/outputs/0.jpg"]}}'
        )
        listed_a = (
            f'{{"request_id":"{a}","status":"COMPLETED","created_at":{iso(job_a.created_at)},'
            f'"completed_at":{iso(job_a.finished_at)},"outputs":["{urls[0]}","{urls[1]}"]}}'
        )
        page = await body("GET", "/v2/requests?limit=1")
        cursor = json.loads(page)["next_cursor"]
        assert page == f'{{"requests":[{listed_b}],"next_cursor":"{cursor}"}}'.encode()
        assert await body("GET", f"/v2/requests?limit=1&cursor={cursor}") == (
            f'{{"requests":[{listed_a}],"next_cursor":null}}'.encode()
        )
        assert await body("POST", f"/v2/requests/{a}/cancel", 409) == (
            b'{"status":"COMPLETED","error":"request already COMPLETED"}'
        )

        hook = {**fields, "prompt": "c", "webhook_url": "http://127.0.0.1:9/hook"}
        hooked = await body("POST", "/v2/seg-beyond", json=hook)
        d = json.loads(hooked)["request_id"]
        assert await body("POST", f"/v2/requests/{d}/cancel") == (
            f'{{"request_id":"{d}","status":"FAILED","cancel_requested":true,"error":"cancelled"}}'.encode()
        )
        failed = f'{{"status":"FAILED","request_id":"{d}","error":"cancelled"}}'
        assert await body("GET", f"/v2/requests/{d}/status", 422) == failed.encode()
        assert (
            await body("GET", f"/v2/requests/{d}", 422)
            == (
                f'{{"status":"FAILED","request_id":"{d}","webhook":{{"delivered":false,"attempts":0,"last_status":null,'
                f'"error":null}},"error":"cancelled"}}'
            ).encode()
        )
        events = await client.get(f"/v2/requests/{d}/events")
        assert events.content == f"event: result\r\ndata: {json.dumps(json.loads(failed))}\r\n\r\n".encode()
        # A webhook carries the body GET answers, less the `webhook` member.
        assert webhook_body(services, store.get(d)) == failed.encode()  # type: ignore[arg-type]
        job_d = store.get(d)
        listed_d = (
            f'{{"request_id":"{d}","status":"FAILED","created_at":{iso(job_d.created_at)},'
            f'"completed_at":{iso(job_d.finished_at)},"error":"cancelled"}}'
        )
        everything = await body("GET", "/v2/requests")
        assert everything == f'{{"requests":[{listed_d},{listed_b},{listed_a}],"next_cursor":null}}'.encode()

        # A running job's cancel answers its state as it is (no error yet: null, not absent).
        running = json.loads(await body("POST", "/v2/seg-beyond", json={**fields, "prompt": "e"}))["request_id"]
        store.claim_next()
        store.mark_started(running, 1)
        assert await body("POST", f"/v2/requests/{running}/cancel") == (
            f'{{"request_id":"{running}","status":"PROCESSING","cancel_requested":true,"error":null}}'.encode()
        )

        assert (
            await body("GET", "/v2/requests/nope", 404)
            == b'{"error":"request \'nope\' not found (unknown, or expired)"}'
        )
        assert await body("POST", "/v2/seg-beyond", 400, json={"input_image": IMAGE}) == (
            b'{"error":"prompt: Field required"}'
        )
        assert await body("GET", "/v2/requests?status=nope", 400) == (
            b'{"error":"status: must be one of QUEUED, PROCESSING, COMPLETED, FAILED"}'
        )

    settings = Settings(
        data_dir=tmp_path, model="random:tiny", allow_private_urls=True, webhook_secret=SecretStr(SECRET)
    )
    run(check, settings)


def test_error_bodies_with_keys_and_the_styles_list(tmp_path: Path) -> None:
    async def check(client: httpx.AsyncClient, services: object) -> None:
        missing = await client.get("/v2/requests/x/status")
        assert missing.status_code == 401
        assert missing.content == b'{"error":"missing API key: send it in the x-api-key header"}'
        bearer = await client.get("/v2/requests", headers={"authorization": "Bearer k"})
        assert bearer.content == b'{"error":"the API key goes in the x-api-key header, not in Authorization"}'
        styles = await client.get("/v1/styles")
        assert styles.headers["content-type"] == "application/json"
        expected = {"styles": default_registry().describe()}
        assert styles.content == json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode()

    run(check, Settings(data_dir=tmp_path, model="random:tiny", api_keys=SecretStr("k")))


def test_v1_json_is_the_v2_result_with_the_images_appended(server: ServerProcess) -> None:
    fields = request_body(smooth_image(16, 16), left=8, samples=2, base64=True)
    response = httpx.post(f"{server.url}/v1/seg-beyond", json=fields, timeout=120)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    stored = httpx.get(f"{server.url}/v2/requests/{response.headers['x-request-id']}", timeout=30)
    images = stored.json()["outputs"]
    appended = f',"image":{json.dumps(images[0])},"images":{json.dumps(images, separators=(",", ":"))}}}'
    assert response.content == stored.content[:-1] + appended.encode()


def test_extension_parameters_follow_the_hosted_ones_only_when_set(tmp_path: Path) -> None:
    loras = tmp_path / "loras"
    loras.mkdir()
    write_kohya(loras / "style.safetensors")

    async def check(client: httpx.AsyncClient, services: object) -> None:
        async def parameters(**extensions: object) -> bytes:
            body = {"input_image": IMAGE, "prompt": "x", "seed": 9, "steps": 20, "left": 8, **extensions}
            submitted = await client.post("/v2/seg-beyond", json=body)
            assert submitted.status_code == 200, submitted.text
            result = await client.get(f"/v2/requests/{submitted.json()['request_id']}")
            assert result.status_code == 200, result.text
            return result.content.partition(b'"parameters":')[2]

        hosted = (
            b'{"prompt":"x","negative_prompt":"","steps":20,"samples":1,"styles":["V2","Enhance","Sharp"],"seed":9,'
            b'"guidance_scale":4.0,"scheduler":"karras","sampler":"dpmpp_2m_sde_gpu","left":8,"right":0,"top":0,'
            b'"bottom":0'
        )
        assert await parameters() == hosted + b"}}"
        # Sent with their defaults, they read as not sent.
        assert await parameters(seam_width=16, color_match=False, loras=[]) == hosted + b"}}"
        used = await parameters(seam_width=8, color_match=True, loras=[{"name": "style", "scale": 0.5}])
        assert used == hosted + b',"seam_width":8,"color_match":true,"loras":[{"name":"style","scale":0.5}]}}'

        listed = await client.get("/v1/loras")
        assert listed.status_code == 200 and listed.headers["content-type"] == "application/json"
        (item,) = json.loads(listed.content)["loras"]
        assert list(item) == ["name", "size", "format", "parts", "error"] and item["error"] is None
        assert listed.content == json.dumps({"loras": [item]}, separators=(",", ":")).encode()

    run(check, Settings(data_dir=tmp_path / "data", model="random:tiny", lora_dir=loras))
