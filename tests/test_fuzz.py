"""A fuzz pass: no malformed request may get a 5xx (bounded, loopback only)."""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import ServerProcess, b64, encode, smooth_image

FIELDS = [
    "input_image",
    "prompt",
    "negative_prompt",
    "steps",
    "samples",
    "styles",
    "seed",
    "guidance_scale",
    "scheduler",
    "sampler",
    "left",
    "right",
    "top",
    "bottom",
    "seam_width",
    "color_match",
    "loras",
    "base64",
]
TINY_PNG = b64(encode(smooth_image(16, 16)))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "karras",
            "euler",
            "V2,Sharp",
            TINY_PNG,
            "data:image/png;base64," + TINY_PNG,
            "http://",
            "https://[::1",
            "aGVsbG8=",
            "-1",
            "1e999",
            # Malformed URLs, each once a 500: a broken IPv6 literal, an over-long label, odd ports.
            "http://[::1/",
            "http://" + "a" * 64 + ".example/x.png",
            "http://127.0.0.1:99999/x.png",
            "http://[fe80::1%25eth0]/x.png",
        ]
    ),
    # Lone surrogates ("\ud800 cat" was accepted, then failed in the engine).
    st.sampled_from(["\ud800 cat", "\udfff", "a\udc00b"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=10)


def nested(depth: int, leaf: str = "x") -> str:
    return "[" * depth + json.dumps(leaf) + "]" * depth


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(depth=st.integers(min_value=1_000, max_value=200_000), field=st.sampled_from(["prompt", "styles", "extra"]))
def test_deep_nesting_is_a_400_never_a_5xx(server: ServerProcess, depth: int, field: str) -> None:
    body = json.dumps({"input_image": TINY_PNG, "prompt": "p", "left": 8})[:-1] + f', "{field}": {nested(depth)}}}'
    response = httpx.post(
        f"{server.url}/v2/seg-beyond", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"}


def cancel_if_accepted(server: ServerProcess, response: httpx.Response) -> None:
    if response.status_code == 200 and "request_id" in response.json():
        httpx.post(f"{server.url}/v2/requests/{response.json()['request_id']}/cancel", timeout=30)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_json_bodies_never_get_a_5xx(server: ServerProcess, body: dict) -> None:
    response = httpx.post(
        f"{server.url}/v2/seg-beyond",
        content=json.dumps(body),
        timeout=60,
        headers={"content-type": "application/json"},
    )
    assert response.status_code < 500, (body, response.text)
    assert "error" in response.json() or response.status_code == 200
    cancel_if_accepted(server, response)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    raw=st.binary(max_size=200), ctype=st.sampled_from(["application/json", "text/plain", "", "multipart/form-data"])
)
def test_raw_bodies_never_get_a_5xx(server: ServerProcess, raw: bytes, ctype: str) -> None:
    response = httpx.post(f"{server.url}/v1/seg-beyond", content=raw, headers={"content-type": ctype}, timeout=60)
    assert response.status_code < 500, (raw, response.text)
    assert "error" in response.json()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(request_id=st.text(max_size=40), index=st.integers(min_value=-5, max_value=10**20))
def test_request_paths_never_get_a_5xx(server: ServerProcess, request_id: str, index: int) -> None:
    segment = quote(request_id, safe="")
    for path in (
        f"/v2/requests/{segment}/status",
        f"/v2/requests/{segment}",
        f"/v2/requests/{segment}/outputs/{index}.jpg",
    ):
        response = httpx.get(server.url + path, timeout=30)
        assert response.status_code < 500, (path, response.text)
