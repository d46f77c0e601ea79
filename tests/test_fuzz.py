"""Fuzz passes: no malformed request may get a 5xx, and schemathesis finds nothing wrong in the OpenAPI
document (bounded, loopback only)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.http.routes.responses import SUBMITTED_LINKS
from tests.helpers import KEYS, ROOT, ServerProcess, b64, encode, smooth_image

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
            "http://" + "a" * 64 + ".localhost/x.png",
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


# -- schemathesis: the OpenAPI document against the server ---------------------------------------------

# Per operation and phase; the two runs below take about 20 s of CPU each on a 2-core VM (server included).
EXAMPLES = 20


def schemathesis_run(server: ServerProcess, folder: Path, key: str | None = None) -> str:
    """`st run --checks all` against the document the server publishes, every phase (examples, coverage,
    fuzzing, stateful through the document's links). Its output; every check passed."""
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
        "--no-color", "run", f"{server.url}/openapi.json", "--checks", "all", "--max-examples", str(EXAMPLES),
        "--workers", "1", *(["-H", f"x-api-key: {key}"] if key else []),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-30000:]
    # It reached what it is here for: the example request ran, and the links led to real requests.
    assert re.search(r"Examples \(in [\d.]+s\)\s+✅\s+2 passed", output), output[-5000:]
    links = re.search(r"API Links:\s+(\d+) covered", output)
    assert links and int(links.group(1)) >= len(SUBMITTED_LINKS) - 1, output[-5000:]  # the preview: gone too soon
    return output


def test_schemathesis_finds_nothing_without_keys(server: ServerProcess, tmp_path: Path) -> None:
    schemathesis_run(server, tmp_path)


def test_schemathesis_finds_nothing_with_keys(server_with_keys: ServerProcess, tmp_path: Path) -> None:
    schemathesis_run(server_with_keys, tmp_path, KEYS["full"])


def test_the_hooks_let_no_url_through_and_give_valid_requests_a_real_image() -> None:
    from schemathesis import GenerationMode

    from tests import fuzz_hooks

    def case(mode: GenerationMode, body: object, phase: str = "fuzzing") -> SimpleNamespace:
        meta = SimpleNamespace(components={"body": SimpleNamespace(mode=mode)}, phase=SimpleNamespace(name=phase))
        return SimpleNamespace(body=body, query=None, meta=meta, operation=SimpleNamespace(path="/v2/seg-beyond"))

    urls = ["http://127.0.0.1/x.png", " HTTPS://example.com", "\thttp:", "hTtP://[::1]/"]
    for mode in GenerationMode:
        for url in urls:
            body = {"input_image": url, "webhook_url": url, "prompt": "p", "left": 9}
            fuzz_hooks.before_call(None, case(mode, body), {})
            assert not any(str(body[f]).strip().lower().startswith("http") for f in ("input_image", "webhook_url"))
    valid = {"input_image": "not an image", "prompt": "p", "left": 512, "top": 3}
    fuzz_hooks.before_call(None, case(GenerationMode.POSITIVE, valid), {})
    assert valid == {"input_image": fuzz_hooks.IMAGE, "prompt": "p", "left": 0, "top": 0}
    example = {"input_image": "x", "prompt": "p", "left": 8}
    fuzz_hooks.before_call(None, case(GenerationMode.POSITIVE, example, "examples"), {})
    assert example["left"] == 8 and example["input_image"] == fuzz_hooks.IMAGE
    invalid = {"input_image": "x", "prompt": 5, "left": 512}
    fuzz_hooks.before_call(None, case(GenerationMode.NEGATIVE, invalid), {})
    assert invalid == {"input_image": "x", "prompt": 5, "left": 512}
