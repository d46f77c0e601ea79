"""The API's own description: complete, in the contract's error shape, and browsable offline."""

from __future__ import annotations

import re

import httpx

from models.names import SAMPLERS, SCHEDULERS
from tests.helpers import ServerProcess

ERRORS = {"400", "401", "403", "404", "406", "413", "422", "429", "502", "503", "504"}


def schema(server: ServerProcess) -> dict:
    response = httpx.get(f"{server.url}/openapi.json", timeout=30)
    assert response.status_code == 200
    return response.json()


def test_every_request_field_has_a_description_a_default_and_its_range(server: ServerProcess) -> None:
    components = schema(server)["components"]["schemas"]
    request = components["SegBeyondRequest"]
    assert set(request["required"]) == {"input_image", "prompt"}
    for name, field in request["properties"].items():
        assert field.get("description"), name
        if name not in request["required"]:
            assert "default" in field, name
    numbers = {"steps": (20, 100), "samples": (1, 4), "guidance_scale": (1, 25), "left": (0, 1024)}
    for name, (low, high) in numbers.items():
        field = request["properties"][name]
        assert (field["minimum"], field["maximum"]) == (low, high), name
    assert components["Sampler"]["enum"] == list(SAMPLERS)
    assert components["Scheduler"]["enum"] == list(SCHEDULERS)


def test_errors_are_documented_in_the_contracts_shape_and_fastapis_422_appears_nowhere(server: ServerProcess) -> None:
    document = schema(server)
    text = str(document)
    assert "HTTPValidationError" not in text and "ValidationError" not in text
    documented: set[str] = set()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for code, answer in operation["responses"].items():
                if code.startswith(("4", "5")):
                    documented.add(code)
                    ref = answer["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/FailedBody" if code == "422" else "/ErrorBody"), (method, path, code)
    assert documented >= ERRORS
    assert document["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    for operation in ("/v2/seg-beyond", "/v2/requests/{request_id}/status", "/v2/requests/{request_id}"):
        answer = next(iter(document["paths"][operation].values()))["responses"]["200"]
        assert "$ref" in answer["content"]["application/json"]["schema"], operation


def test_the_api_key_is_a_security_scheme(server: ServerProcess) -> None:
    document = schema(server)
    schemes = document["components"]["securitySchemes"]
    assert any(s == {**s, "type": "apiKey", "in": "header", "name": "x-api-key"} for s in schemes.values())
    assert document["paths"]["/v2/seg-beyond"]["post"]["security"]


def test_docs_and_redoc_load_everything_from_this_server(server: ServerProcess) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(server.url + page, timeout=30)
        assert html.status_code == 200
        sources = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
        sources += re.findall(r"""url: ?['"]([^'"]+)['"]""", html.text)
        assert sources, page
        for source in sources:
            assert not source.startswith(("http:", "https:", "//")), (page, source)
            assert httpx.get(server.url + source, timeout=30).status_code == 200, (page, source)
