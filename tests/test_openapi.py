"""The API's own description: complete, in the contract's error shape, and browsable offline."""

from __future__ import annotations

import functools
import json
import re
import string
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from models.names import SAMPLERS, SCHEDULERS
from models.styles import UnknownStyle, default_registry
from server.http.app import create_app
from server.http.openapi import styles_pattern
from server.settings import Settings
from tests.helpers import KEYS, LONG_JOB, ServerProcess, request_body, smooth_image

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
    numbers = {
        "steps": (20, 100),
        "samples": (1, 4),
        "guidance_scale": (1, 25),
        "left": (0, 1024),
        "output_quality": (1, 100),
        "seam_width": (0, 128),
    }
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


# -- every answer against the document ---------------------------------------------------------------


class Conformance:
    """A client that checks every answer against the document its server publishes: the status code is
    documented for the operation, so is the content type, and a JSON body (each event's data, for the event
    stream) validates against the schema documented for it (jsonschema, JSON Schema 2020-12)."""

    def __init__(self, server: ServerProcess, key: str | None = None) -> None:
        self.server, self.key = server, key
        self.document = schema(server)
        self.operations = [
            (method.upper(), re.compile(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(path))), path, operation)
            for path, operations in self.document["paths"].items()
            for method, operation in operations.items()
        ]
        self.seen: set[tuple[str, str, int]] = set()  # (method, path template, status)

    def validate(self, data: object, schema: dict) -> None:
        # The components go along at the root, so the document's "#/components/schemas/..." references resolve.
        validator = Draft202012Validator({**schema, "components": self.document["components"]})
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]
        assert not errors, (data, errors)

    def __call__(self, method: str, path: str, *, key: str | None = None, **kwargs: object) -> httpx.Response:
        key = key if key is not None else self.key
        headers = {"x-api-key": key} if key else {}
        response = httpx.request(method, self.server.url + path, headers=headers, timeout=120, **kwargs)  # type: ignore[arg-type]
        route = path.partition("?")[0]
        template, operation = next((t, o) for m, r, t, o in self.operations if m == method and r.fullmatch(route))
        answers = operation["responses"]
        assert str(response.status_code) in answers, (method, path, response.status_code, response.text[:300])
        documented = answers[str(response.status_code)].get("content", {})
        media_type = response.headers["content-type"].split(";")[0]
        assert media_type in documented, (method, path, media_type, list(documented))
        if media_type == "application/json":
            self.validate(response.json(), documented[media_type]["schema"])
        elif media_type == "text/event-stream":
            # OpenAPI 3.1 describes each event as an object of its fields; its data's JSON is the contentSchema
            # of the branch for its name (jsonschema reads contentSchema as an annotation: checked here).
            documented_event = documented[media_type]["schema"]
            events = [sse_fields(block) for block in response.text.replace("\r\n", "\n").split("\n\n") if block]
            events = [event for event in events if event]  # keep-alive comments are no events
            assert events and events[-1]["event"] == "result", response.text
            for event in events:
                self.validate(event, documented_event)
                branch = next(
                    b for b in documented_event["oneOf"] if b["properties"]["event"]["const"] == event["event"]
                )
                self.validate(json.loads(event["data"]), branch["properties"]["data"]["contentSchema"])
        self.seen.add((method, template, response.status_code))
        return response


def sse_fields(block: str) -> dict[str, str]:
    """One event's fields (comments left out)."""
    fields: dict[str, str] = {}
    for line in block.split("\n"):
        if not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = fields.get(name, "") + ("\n" if name in fields else "") + value.removeprefix(" ")
    return fields


def submitted(check: Conformance, **fields: object) -> str:
    response = check("POST", "/v2/seg-beyond", json=request_body(smooth_image(16, 16), **fields))
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def until(check: Conformance, path: str, predicate: object, timeout: float = 120) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = check("GET", path)
        if predicate(response):  # type: ignore[operator]
            return response
        assert time.monotonic() < deadline, response.text
        time.sleep(0.05)


def test_every_answer_without_keys_is_what_the_document_says(server: ServerProcess) -> None:
    check = Conformance(server)
    # A long job runs while a second one waits behind it: each state answers once.
    running = submitted(check, left=32, **LONG_JOB)
    waiting = submitted(check, left=8, samples=2)
    until(check, f"/v2/requests/{running}/status", lambda r: "preview" in r.json())
    check("GET", f"/v2/requests/{running}/preview.jpg")
    check("GET", f"/v2/requests/{running}")
    assert check("GET", f"/v2/requests/{waiting}/status").json()["status"] == "QUEUED"
    check("GET", f"/v2/requests/{waiting}")
    assert check("POST", f"/v2/requests/{running}/cancel").json()["error"] is None  # stopping
    until(check, f"/v2/requests/{running}/status", lambda r: r.status_code == 422)
    check("GET", f"/v2/requests/{running}")
    check("GET", f"/v2/requests/{running}/events")
    check("POST", f"/v2/requests/{running}/cancel")  # cancelled already: answered again
    done = until(check, f"/v2/requests/{waiting}", lambda r: r.json()["status"] == "COMPLETED").json()
    check("GET", f"/v2/requests/{waiting}/status")
    check("GET", f"/v2/requests/{waiting}/events")
    assert check("POST", f"/v2/requests/{waiting}/cancel").status_code == 409
    check("GET", done["outputs"][1].removeprefix(server.url))
    for bad in ("2.jpg", "0.png", "x.jpg"):
        assert check("GET", f"/v2/requests/{waiting}/outputs/{bad}").status_code in (400, 404)
    inline = submitted(check, base64=True, left=0)  # nothing to outpaint: done at once
    until(check, f"/v2/requests/{inline}", lambda r: r.json()["status"] == "COMPLETED")
    queued = submitted(check, left=8, **LONG_JOB)
    assert check("POST", f"/v2/requests/{queued}/cancel").status_code == 200
    for query in ("", "?limit=1", "?status=completed", "?status=nope", "?limit=0", "?cursor=x"):
        check("GET", "/v2/requests" + query)
    check("GET", "/v2/requests?cursor=" + check("GET", "/v2/requests?limit=1").json()["next_cursor"])
    for unknown in ("status", "", "events", "preview.jpg", "outputs/0.jpg"):
        assert check("GET", f"/v2/requests/0123/{unknown}".rstrip("/")).status_code == 404
    assert check("POST", "/v2/requests/0123/cancel").status_code == 404
    check("POST", "/v2/seg-beyond", json={"prompt": "no image"})
    check("POST", "/v1/seg-beyond", json=request_body(smooth_image(16, 16), left=8))
    check("POST", "/v1/seg-beyond", json=request_body(smooth_image(16, 16), left=0, base64=True, samples=2))
    check("POST", "/v1/seg-beyond", json={"input_image": "not base64 of an image", "prompt": "x"})
    check("GET", "/v1/styles")
    check("GET", "/v1/loras")
    # The extensions: echoed in the result's parameters when set; LoRAs refused by a server without a folder.
    extended = submitted(check, left=0, seam_width=8, color_match=True)
    result = until(check, f"/v2/requests/{extended}", lambda r: r.json()["status"] == "COMPLETED").json()
    assert (result["parameters"]["seam_width"], result["parameters"]["color_match"]) == (8, True)
    lora = check("POST", "/v2/seg-beyond", json=request_body(smooth_image(16, 16), loras=[{"name": "style"}]))
    assert lora.status_code == 400 and lora.json()["error"].startswith("loras: "), lora.text
    statuses = {(template, status) for _, template, status in check.seen}
    for template in ("/v2/requests/{request_id}/status", "/v2/requests/{request_id}"):
        assert {(template, 200), (template, 404), (template, 422)} <= statuses
    assert {("/v2/requests", 400), ("/v1/seg-beyond", 400), ("/v2/seg-beyond", 400)} <= statuses
    # Every documented operation was reached.
    assert {(m, t) for m, _, t, _ in check.operations} == {(m, t) for m, t, _ in check.seen}


def test_every_answer_with_keys_is_what_the_document_says(server_with_keys: ServerProcess) -> None:
    check = Conformance(server_with_keys, KEYS["full"])
    request_id = submitted(check, left=0)  # nothing to outpaint: done at once
    result = until(check, f"/v2/requests/{request_id}", lambda r: r.json()["status"] == "COMPLETED").json()
    for path in (f"/v2/requests/{request_id}/status", f"/v2/requests/{request_id}/events", "/v2/requests"):
        check("GET", path)
    check("GET", result["output"].removeprefix(server_with_keys.url))
    check("POST", "/v1/seg-beyond", json=request_body(smooth_image(16, 16), left=0))
    check("GET", "/v1/loras")
    assert check("GET", "/v1/loras", key="").status_code == 401
    refusals = {
        "": 401,  # no key
        "SG_ffffffffffffffff": 401,  # not one of this server's
        KEYS["v1-only"]: 403,
        KEYS["broke"]: 406,
    }
    small = request_body(smooth_image(16, 16), left=0)
    reads = [("GET", f"/v2/requests/{request_id}{end}") for end in ("/status", "", "/events")]
    reads += [("GET", "/v2/requests"), ("POST", f"/v2/requests/{request_id}/cancel")]
    for key, status in refusals.items():
        answer = check("POST", "/v2/seg-beyond", key=key, json=small)
        assert answer.status_code == status, answer.text
        for method, path in reads:
            # A key without credits may still read, but only its own requests.
            expected = 404 if status == 406 and path != "/v2/requests" else 200 if status == 406 else status
            assert check(method, path, key=key).status_code == expected, (key, method, path)
    assert check("POST", "/v1/seg-beyond", key=KEYS["broke"], json=small).status_code == 406
    assert check("POST", "/v2/seg-beyond", key=KEYS["slow"], json=small).status_code == 200
    assert check("POST", "/v2/seg-beyond", key=KEYS["slow"], json=small).status_code == 429
    # Requests without a key's header are open only where the document leaves them open.
    document = check.document
    assert "security" not in document["paths"]["/v2/requests/{request_id}/outputs/{index}.{extension}"]["get"]
    assert document["paths"]["/v2/seg-beyond"]["post"]["security"] == [{"APIKeyHeader": []}]
    assert document["paths"]["/v1/loras"]["get"]["security"] == [{"APIKeyHeader": []}]


def test_with_an_allowed_hosts_list_every_documented_path_may_answer_400_for_the_host(tmp_path: Path) -> None:
    def document_and_client(**settings: object) -> tuple[dict, TestClient]:
        app = create_app(Settings(data_dir=tmp_path / str(len(settings)), model="random:tiny", **settings))
        client = TestClient(app, base_url="http://good.example")  # no `with`: no lifespan, no engine
        return client.get("/openapi.json").json(), client

    document, client = document_and_client(allowed_hosts="good.example")
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert "400" in operation["responses"], (method, path)
    wrong = client.get("/v1/styles", headers={"host": "evil.example"})
    assert wrong.status_code == 400 and wrong.json()["error"].startswith("host: "), wrong.text
    answer = document["paths"]["/v1/styles"]["get"]["responses"]["400"]["content"]["application/json"]["schema"]
    validator = Draft202012Validator({**answer, "components": document["components"]})
    assert not list(validator.iter_errors(wrong.json()))
    # Without the list, a route that takes no input answers no 400, and the document says none.
    open_document, _ = document_and_client()
    assert "400" not in open_document["paths"]["/v1/styles"]["get"]["responses"]


# -- the request body as this server reads it --------------------------------------------------------

REGISTRY = default_registry()
LABELS = sorted({label for style in REGISTRY.describe() for label in (style["name"], *style["aliases"])})


@functools.cache
def code_points() -> tuple[str, dict[str, list[str]]]:
    """Found by scanning every code point, once (not at import: a second of CPU): the whitespace str.strip()
    trims, and what lowers to each ASCII letter."""
    whitespace = "".join(c for c in map(chr, range(0x110000)) if c.isspace())
    capitals: dict[str, list[str]] = {}
    for point in range(0x110000):
        if (lower := chr(point).lower()) in string.ascii_lowercase and lower:
            capitals.setdefault(lower, []).append(chr(point))
    return whitespace, capitals


def spellings(label: str) -> st.SearchStrategy[str]:
    """`label` as a request may spell it: any case (the Kelvin sign is a capital k), any separators."""
    whitespace, capitals = code_points()
    words = label.replace("_", " ").replace("-", " ").split()

    def cased(word: str) -> st.SearchStrategy[str]:
        letters = [st.sampled_from(sorted({c, *capitals.get(c.lower(), ())})) for c in word]
        return st.tuples(*letters).map("".join)

    gap = st.text(alphabet=whitespace + "_-", min_size=1, max_size=2)
    pad = st.text(alphabet=whitespace + "_-", max_size=2)
    parts = [cased(words[0])]
    for word in words[1:]:
        parts += [gap, cased(word)]
    return st.tuples(pad, *parts, pad).map("".join)


tokens = st.one_of(
    st.sampled_from(LABELS).flatmap(spellings),
    st.deferred(lambda: st.text(alphabet=code_points()[0], max_size=2)),
    st.text(max_size=6),
    st.sampled_from(["_", "-", "v 2", "v22", "photograph photograph", "K", "fooocus", "ſharp"]),
)


@settings(max_examples=300, deadline=None)
@given(value=st.lists(tokens, max_size=4).map(",".join))
# The corners, every run: a Kelvin sign for k, whitespace str.strip() knows and ECMA's \s does not (and the
# reverse: U+FEFF), separators only, an alias, a long s (its lower case is itself).
@example(value="Blac\u212a and White")
@example(value="\x1cV2\u0085,\u1680ink__-drawing\u3000,")
@example(value="\ufeffV2")
@example(value="_,-, , ,")
@example(value="fooocus_V2,  fooocus-sharp")
@example(value="\u017fharp")
def test_the_styles_pattern_takes_exactly_what_the_registry_takes(value: str) -> None:
    pattern = re.compile(styles_pattern(REGISTRY))
    try:
        REGISTRY.parse(value)
        accepted = True
    except UnknownStyle:
        accepted = False
    assert (pattern.fullmatch(value) is not None) == accepted, value


def test_the_example_request_runs(server: ServerProcess) -> None:
    document = schema(server)
    operation = document["paths"]["/v1/seg-beyond"]["post"]
    examples = operation["requestBody"]["content"]["application/json"]["examples"]
    for documented in examples.values():
        response = httpx.post(f"{server.url}/v1/seg-beyond", json=documented["value"], timeout=120)
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg", response.text


def test_a_whole_number_with_a_decimal_point_is_that_integer(server: ServerProcess) -> None:
    # JSON has one kind of number, and JSON Schema's "integer" (the document's) takes 20.0 as 20: so does the server.
    fields = {"steps": 20.0, "samples": 1.0, "seed": 7.0, "left": 0.0, "output_quality": 90.0}
    response = httpx.post(f"{server.url}/v2/seg-beyond", json=request_body(smooth_image(16, 16), **fields), timeout=30)
    assert response.status_code == 200, response.text
    result = httpx.get(response.json()["response_url"], timeout=30).text
    assert '"steps":20,"samples":1,' in result and '"seed":7,' in result and '"left":0,' in result
    for fraction in (20.5, 1e300):
        refused = httpx.post(f"{server.url}/v2/seg-beyond", json=request_body(steps=fraction), timeout=30)
        assert refused.status_code == 400 and refused.json()["error"].startswith("steps: "), refused.text
    # The number as written, not the float nearest to it: each of these is a fraction (of 20, 0, 0) that a
    # float cannot tell from the integer.
    for literal in ("20.0000000000000001", "1e-400", "0." + "0" * 400 + "1", "1e-99999999999999999999"):
        text = json.dumps(request_body(smooth_image(16, 16)))[:-1] + f', "left": {literal}}}'
        headers = {"content-type": "application/json"}
        refused = httpx.post(f"{server.url}/v2/seg-beyond", content=text, headers=headers, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"].startswith("left: "), (literal, refused.text)
