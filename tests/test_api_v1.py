"""POST /v1/seg-beyond against a real server process, with httpx and the official SDK."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import segmind
from PIL import Image

from tests.helpers import ServerProcess, b64, encode, jpeg, noise_image, request_body, smooth_image

V1 = "/v1/seg-beyond"


def post(server: ServerProcess, body: object, **kwargs: object) -> httpx.Response:
    return httpx.post(server.url + V1, json=body, timeout=120, **kwargs)


def test_sdk_run_sync_returns_the_outpainted_jpeg(server: ServerProcess) -> None:
    client = segmind.SegmindClient(api_key="SG_0123456789abcdef", base_url=f"{server.url}/v1")
    image = smooth_image(96, 64)
    response = client.run_sync(
        "seg-beyond", input_image=b64(encode(image)), prompt="a beach", steps=20, left=40, right=8, top=16, bottom=24
    )
    assert response.headers["content-type"] == "image/jpeg"
    out = jpeg(response.content)
    assert out.size == (96 + 40 + 8, 64 + 16 + 24)
    assert response.headers["x-request-id"]
    assert int(response.headers["x-seeds"]) >= 0


def test_original_pixels_survive_outside_the_seam(server: ServerProcess) -> None:
    image = smooth_image(128, 96)
    out = np.asarray(jpeg(post(server, request_body(image, left=64, top=32)).content), dtype=np.float32)
    inner = out[32 + 16 : 32 + 96, 64 + 16 : 64 + 128]  # 16 px seam band on the padded sides
    original = np.asarray(image, dtype=np.float32)[16:, 16:]
    # JPEG at quality 95 moves a smooth gradient by a level or two, noise images would not compare.
    assert np.abs(inner - original).mean() < 2.0
    # The new area is not the original's edge copied nor black: it was generated.
    assert out[:, :48].std() > 1.0 and out[:, :48].mean() > 5.0


def test_same_seed_same_bytes_and_seed_minus_one_varies(server: ServerProcess) -> None:
    body = request_body(noise_image(), seed=1234)
    first, second = post(server, body), post(server, body)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert first.headers["x-seeds"] == "1234"
    other = post(server, request_body(noise_image(), seed=1235))
    assert other.content != first.content
    random_a = post(server, request_body(noise_image(), seed=-1))
    random_b = post(server, request_body(noise_image(), seed=-1))
    assert random_a.headers["x-seeds"] != random_b.headers["x-seeds"]
    assert random_a.content != random_b.content


def test_base64_returns_every_sample_with_consecutive_seeds(server: ServerProcess) -> None:
    response = post(server, request_body(samples=3, seed=50, base64=True))
    assert response.status_code == 200
    body = response.json()
    assert body["seeds"] == [50, 51, 52]
    assert len(body["images"]) == 3 and body["image"] == body["images"][0]
    import base64

    pictures = [jpeg(base64.b64decode(item)) for item in body["images"]]
    assert all(p.size == (96 + 32, 64) for p in pictures)
    assert len({p.tobytes() for p in pictures}) == 3
    assert response.headers["x-seeds"] == "50,51,52"


def test_seeds_wrap_to_zero_and_every_reported_seed_gives_its_image_again(server: ServerProcess) -> None:
    import base64

    def pictures(response: httpx.Response) -> list[np.ndarray]:
        assert response.status_code == 200, response.text
        return [
            np.asarray(Image.open(io.BytesIO(base64.b64decode(item))), dtype=int) for item in response.json()["images"]
        ]

    fields = {"output_format": "png", "base64": True}
    batch = post(server, request_body(noise_image(), seed=999999999999999, samples=2, **fields))
    assert batch.headers["x-seeds"] == "999999999999999,0"
    assert batch.json()["seeds"] == [999999999999999, 0]
    for seed, picture in zip(batch.json()["seeds"], pictures(batch), strict=True):
        (alone,) = pictures(post(server, request_body(noise_image(), seed=seed, **fields)))
        # The same image, up to the float rounding of a batch of two (tests/test_engine.py).
        assert np.abs(alone - picture).max() <= 2


def test_unknown_fields_are_ignored(server: ServerProcess) -> None:
    assert post(server, request_body(seed=7, webhook="http://x", extra={"a": 1})).status_code == 200


def test_input_from_a_url_and_from_a_data_url(server: ServerProcess, images) -> None:
    png = encode(smooth_image(80, 48))
    url = images.add("/pic.png", png)
    by_url = post(server, request_body(input_image=url, seed=9))
    by_data = post(server, request_body(input_image="data:image/png;base64," + b64(png), seed=9))
    by_b64 = post(server, request_body(input_image=b64(png), seed=9))
    assert by_url.status_code == by_data.status_code == by_b64.status_code == 200
    assert by_url.content == by_data.content == by_b64.content
    assert jpeg(by_url.content).size == (80 + 32, 48)


def test_zero_padding_returns_the_input(server: ServerProcess) -> None:
    image = smooth_image(64, 64)
    out = jpeg(post(server, request_body(image, left=0)).content)
    assert out.size == (64, 64)
    assert np.abs(np.asarray(out, dtype=np.float32) - np.asarray(image, dtype=np.float32)).mean() < 2.0


INVALID = [
    ({"steps": 19}, "steps"),
    ({"steps": 101}, "steps"),
    ({"steps": "30"}, "steps"),
    ({"steps": 30.5}, "steps"),
    ({"samples": 0}, "samples"),
    ({"samples": 5}, "samples"),
    ({"seed": -2}, "seed"),
    ({"seed": 1_000_000_000_000_000}, "seed"),
    ({"guidance_scale": 0.5}, "guidance_scale"),
    ({"guidance_scale": 25.5}, "guidance_scale"),
    ({"guidance_scale": "high"}, "guidance_scale"),
    ({"scheduler": "linear"}, "scheduler"),
    ({"sampler": "dpmpp_4m"}, "sampler"),
    ({"styles": "V2,Nope"}, "styles"),
    ({"left": -1}, "left"),
    ({"right": 1025}, "right"),
    ({"top": True}, "top"),
    ({"bottom": None}, "bottom"),
    ({"base64": "yes"}, "base64"),
    ({"prompt": None}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"negative_prompt": 3}, "negative_prompt"),
    ({"input_image": ""}, "input_image"),
]


@pytest.mark.parametrize(("change", "field"), INVALID, ids=[f"{f}={c[f]!r}" for c, f in INVALID])
def test_each_invalid_field_is_a_400_naming_it(server: ServerProcess, change: dict, field: str) -> None:
    response = post(server, request_body(**change))
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}: ")


@pytest.mark.parametrize("missing", ["input_image", "prompt"])
def test_missing_required_field(server: ServerProcess, missing: str) -> None:
    body = request_body()
    del body[missing]
    response = post(server, body)
    assert response.status_code == 400
    assert response.json() == {"error": f"{missing}: Field required"}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"{not json", "body: not valid JSON"),
        (b"[1, 2]", "body: must be a JSON object"),
        (b"", "body: not valid JSON"),
        (b'"text"', "body: must be a JSON object"),
    ],
)
def test_malformed_bodies(server: ServerProcess, content: bytes, expected: str) -> None:
    response = httpx.post(server.url + V1, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert response.json() == {"error": expected}


def test_sdk_error_carries_the_400_message(server: ServerProcess) -> None:
    client = segmind.SegmindClient(api_key="SG_0123456789abcdef", base_url=f"{server.url}/v1")
    with pytest.raises(segmind.SegmindError) as caught:
        client.run_sync("seg-beyond", **request_body(steps=5))
    assert caught.value.status == 400
    assert caught.value.detail.startswith("steps: ")


def test_unknown_model_slug_is_404(server: ServerProcess) -> None:
    response = httpx.post(server.url + "/v1/sdxl-turbo", json=request_body(), timeout=30)
    assert response.status_code == 404
    assert "sdxl-turbo" in response.json()["error"]


def bomb_png() -> bytes:
    # 20000 x 20000 single-colour PNG: a few hundred kB on the wire, 400 MP once decoded.
    image = Image.new("1", (20000, 20000))
    return encode(image, optimize=True)


BAD_IMAGES = {
    "corrupt_png": encode(smooth_image())[:200],
    "not_an_image": b"hello, this is text and not a picture",
    "bomb": bomb_png(),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_are_400_and_the_server_keeps_serving(server: ServerProcess, name: str) -> None:
    response = post(server, request_body(input_image=b64(BAD_IMAGES[name])))
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("input_image: ")
    assert post(server, request_body(seed=1)).status_code == 200


def test_invalid_base64_is_400(server: ServerProcess) -> None:
    response = post(server, request_body(input_image="@@@ not base64 @@@"))
    assert response.status_code == 400
    assert response.json()["error"].startswith("input_image: ")


def test_a_url_that_answers_404_is_400(server: ServerProcess, images) -> None:
    response = post(server, request_body(input_image=images.url + "/missing.png"))
    assert response.status_code == 400
    assert "404" in response.json()["error"]
    assert response.json()["error"].startswith("input_image: ")
    assert post(server, request_body(seed=2)).status_code == 200


def test_a_corrupt_image_behind_a_url_is_400(server: ServerProcess, images) -> None:
    url = images.add("/corrupt.png", BAD_IMAGES["corrupt_png"])
    response = post(server, request_body(input_image=url))
    assert response.status_code == 400
    assert response.json()["error"].startswith("input_image: ")


def test_health_reports_the_engine(server: ServerProcess) -> None:
    body = httpx.get(server.url + "/health").json()
    assert body["state"] == "ready"
    assert body["model"] == "random:tiny"
    assert body["device"] == "cpu"
    assert body["dtype"] == "float32"


def test_jpeg_quality_is_high(server: ServerProcess) -> None:
    data = post(server, request_body(seed=3)).content
    image = Image.open(io.BytesIO(data))
    # libjpeg scales its base luminance table (largest entry 121) to 20% at quality 90.
    assert max(image.quantization[0]) <= 121 * 0.2
