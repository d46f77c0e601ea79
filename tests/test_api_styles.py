"""Styles, V2 expansion and long prompts through the API of a real server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, build_tiny_gpt2, request_body, serve_expecting_exit
from tests.test_queue import finished, result, submit, wait_for


def test_the_style_listing(server: ServerProcess) -> None:
    styles = httpx.get(f"{server.url}/v1/styles", timeout=10).json()["styles"]
    names = [s["name"] for s in styles]
    assert {"V2", "Enhance", "Sharp"} <= set(names)
    assert len(names) >= 23


def test_an_unknown_style_is_a_400_that_says_where_to_look(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v1/seg-beyond", json=request_body(styles="Sharp, Nope"), timeout=30)
    assert response.status_code == 400
    assert response.json() == {"error": "styles: unknown style 'Nope'; GET /v1/styles lists the known ones"}


def test_the_result_shows_the_encoded_prompts_and_applied_styles(server: ServerProcess) -> None:
    job = submit(server, prompt="a lighthouse", negative_prompt="people", styles=" fooocus sharp,ENHANCE, v2,Sharp ")
    wait_for(server, job["request_id"], finished)
    body = result(server, job["request_id"]).json()
    sharp = next(s for s in httpx.get(f"{server.url}/v1/styles").json()["styles"] if s["name"] == "Sharp")
    assert body["parameters"]["styles"] == ["Sharp", "Enhance", "V2"]
    # Without an expansion model V2 is skipped (and said so), the other two are applied.
    assert body["styles"] == ["Sharp", "Enhance"]
    assert "skipped" in body["notes"]["expansion"]
    positive, negative = body["prompts"]["positive"][0], body["prompts"]["negative"][0]
    assert positive == sharp["positive"].replace("{prompt}", "a lighthouse")
    assert negative.endswith("people") and negative != "people"


def test_a_prompt_longer_than_77_tokens_is_kept_whole(server: ServerProcess) -> None:
    long_prompt = ", ".join(f"detail number {i}" for i in range(60))
    job = submit(server, prompt=long_prompt, styles="", seed=4)
    wait_for(server, job["request_id"], finished)
    body = result(server, job["request_id"]).json()
    assert body["status"] == "COMPLETED"
    assert body["prompts"]["positive"] == [long_prompt]


def test_operator_styles_and_v2_expansion(tmp_path: Path) -> None:
    styles_dir = tmp_path / "styles"
    styles_dir.mkdir()
    (styles_dir / "house.json").write_text(
        json.dumps([{"name": "House Look", "positive": "{prompt}, in the house look", "negative": "off-brand"}])
    )
    model = build_tiny_gpt2(tmp_path / "gpt2")
    server = ServerProcess(
        tmp_path / "data", env={"BEYOND_STYLES_DIR": str(styles_dir), "BEYOND_EXPANSION_MODEL": str(model)}
    ).start()
    try:
        server.wait_ready()
        job = submit(server, prompt="a boat", styles="house look,V2", samples=2, seed=40)
        wait_for(server, job["request_id"], finished)
        body = result(server, job["request_id"]).json()
        assert body["styles"] == ["House Look", "V2"]
        assert body["notes"]["expansion"] == "applied"
        first, second = body["prompts"]["positive"]
        assert first.startswith("a boat, in the house look") and len(first) > len("a boat, in the house look")
        assert body["prompts"]["negative"][0].startswith("off-brand")
        # Same seed, same expansion; sample i uses seed + i.
        again = submit(server, prompt="a boat", styles="house look,V2", samples=1, seed=41)
        wait_for(server, again["request_id"], finished)
        assert result(server, again["request_id"]).json()["prompts"]["positive"] == [second]
    finally:
        server.stop()


@pytest.mark.parametrize("content", ["{not json", json.dumps([{"positive": "no name"}])])
def test_a_malformed_styles_file_stops_startup_naming_it(tmp_path: Path, content: str) -> None:
    (tmp_path / "broken.json").write_text(content)
    done = serve_expecting_exit(tmp_path / "d", {"BEYOND_STYLES_DIR": str(tmp_path)})
    assert done.returncode == 2
    assert "broken.json" in done.stderr
