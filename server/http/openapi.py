"""The OpenAPI document: FastAPI's, made exact for this server.

What FastAPI cannot know is added here: the request body (parsed by server/http/deps.py, not by FastAPI)
with what this server accepts (its styles, its prompt limit, whether it takes webhooks and LoRAs) and an
example that runs; the API key, required where the server has keys and optional where it has none; the 400
of a Host that BEYOND_ALLOWED_HOSTS does not name; and no FastAPI 422 validation bodies (every error is
{"error"}, and 422 means a FAILED request).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from PIL import Image

from models.styles import StyleRegistry, style_key
from server.guard.auth import API_KEY_SCHEME
from server.guard.hosts import ANY_HOST_PATHS
from server.http.deps import Services
from server.http.schemas import ErrorBody, SegBeyondRequest, SyncResult

COMPONENTS = "#/components/schemas/{model}"
# Characters whose lower case is a single other character that is neither their upper nor their title case
# (found by scanning every code point): a style name matches them too, since names are compared in lower case.
UNCASED_CAPITALS = "\u03f4\u1e9e\u2126\u212a\u212b"
# Every character Python's str.isspace() takes lies below U+3001.
WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())
REGEX_SYNTAX = set("^$\\.*+?()[]{}|/-")


def _char(c: str) -> str:
    """One character as a regular expression in the common ground of ECMA 262 (JSON Schema's), Python's and
    Rust's: printable ASCII as itself (escaped where it is syntax), anything else as a \\u escape."""
    if c in REGEX_SYNTAX:
        return "\\" + c
    if c.isascii() and c.isprintable():
        return c
    return f"\\u{ord(c):04x}"


def _any_case(c: str) -> str:
    """What matches `c` once lowered, as style_key lowers names: `c` itself and every capital of it."""
    capitals = {x for x in (c.upper(), c.title(), *UNCASED_CAPITALS) if len(x) == 1 and x != c and x.lower() == c}
    if not capitals:
        return _char(c)
    return _one_of({c, *capitals})


def _one_of(chars: Iterable[str]) -> str:
    """A character class, runs of consecutive code points as ranges."""
    points = sorted(set(map(ord, chars)))
    runs: list[list[int]] = []
    for point in points:
        if runs and point == runs[-1][1] + 1:
            runs[-1][1] = point
        else:
            runs.append([point, point])
    parts = (_char(chr(a)) if a == b else f"{_char(chr(a))}-{_char(chr(b))}" for a, b in runs)
    return "[" + "".join(parts) + "]"


def styles_pattern(registry: StyleRegistry) -> str:
    """The `styles` values the registry accepts, as one regular expression: comma-separated tokens, each
    blank or a known name, compared as models/styles.py's style_key compares them (any case; runs of
    whitespace, '-' and '_' are one space; ends trimmed)."""
    separator = _one_of(WHITESPACE + "_-")
    names = []
    keys = {style_key(label) for style in registry.describe() for label in (style["name"], *style["aliases"])}
    for key in sorted(keys, key=lambda k: (-len(k), k)):  # longest first: "fooocus v2" before "v2"
        words = ["".join(_any_case(c) for c in word) for word in key.split(" ")]
        names.append(f"{separator}+".join(words))
    token = f"(?:{separator}*(?:{'|'.join(names)}){separator}*|{_one_of(WHITESPACE)}*)"
    return f"^{token}(?:,{token})*$"


def example_image() -> str:
    """A 16x16 gradient, as base64 of its PNG bytes: the example request outpaints it in well under a second."""
    image = Image.new("RGB", (16, 16))
    image.putdata([(16 * x, 16 * y, 128) for y in range(16) for x in range(16)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def request_schema(services: Services) -> dict[str, Any]:
    """SegBeyondRequest's JSON schema with what this server accepts; its $defs, and the model's."""
    schema = SegBeyondRequest.model_json_schema(ref_template=COMPONENTS)
    fields = schema["properties"]
    fields["styles"]["pattern"] = styles_pattern(services.styles)
    fields["styles"]["description"] += "; any case, and spaces, '-' and '_' alike (GET /v1/styles lists them)"
    limit = services.settings.max_prompt_chars
    fields["prompt"]["maxLength"] = limit
    fields["negative_prompt"]["anyOf"][0]["maxLength"] = limit
    if services.webhooks is None:
        # This server refuses every webhook_url: null (or none) is all it takes.
        fields["webhook_url"] = {
            "type": "null",
            "default": None,
            "description": fields["webhook_url"]["description"] + " (this server has none: it takes no webhook_url)",
        }
    else:
        fields["webhook_url"]["anyOf"][0]["pattern"] = "^\\s*[Hh][Tt][Tt][Pp][Ss]?://"
    if not services.loras.configured:
        # No LoRA folder: only an empty list (or none) is taken.
        fields["loras"]["maxItems"] = 0
        fields["loras"]["description"] += " (this server has no LoRA folder: it takes none)"
    return schema


def example_request() -> dict[str, Any]:
    return {
        "small": {
            "summary": "outpaint 8 px to the left of a 16x16 image",
            "value": {"input_image": example_image(), "prompt": "a quiet beach at dusk", "steps": 20, "left": 8},
        }
    }


def wrong_host(schema: dict[str, Any]) -> None:
    """With BEYOND_ALLOWED_HOSTS, every path but the health check and the scrape may answer 400 for the Host."""
    for path, operations in schema.get("paths", {}).items():
        if path in ANY_HOST_PATHS:
            continue
        for operation in operations.values():
            answers = operation.setdefault("responses", {})
            if "400" in answers:
                answers["400"]["description"] += "; or the Host header is not a name of this server (host: ...)"
            else:
                answers["400"] = {
                    "description": "the Host header is not a name of this server (BEYOND_ALLOWED_HOSTS)",
                    "content": {"application/json": {"schema": {"$ref": COMPONENTS.format(model=ErrorBody.__name__)}}},
                }


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is not None:
        return app.openapi_schema
    services: Services = app.state.services
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            answers = operation.get("responses", {})
            if "HTTPValidationError" in str(answers.get("422", {})):
                del answers["422"]
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)

    request = request_schema(services)
    components.update(request.pop("$defs", {}))
    components[SegBeyondRequest.__name__] = request
    examples = example_request()
    for path in ("/v1/seg-beyond", "/v2/seg-beyond"):
        schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"] = examples
    # v1's JSON answer is documented by reference (the route also answers images): its model is added here.
    answer = SyncResult.model_json_schema(ref_template=COMPONENTS, mode="serialization")
    for name, part in answer.pop("$defs", {}).items():
        components.setdefault(name, part)  # the result's parts, already there as FastAPI wrote them
    components[SyncResult.__name__] = answer

    # Every route that takes a key says so: required where the server has keys, optional where it has none
    # (a key is then ignored). The output images and previews are open (their URL is the key).
    schema["components"]["securitySchemes"] = API_KEY_SCHEME
    security = [{name: []} for name in API_KEY_SCHEME]
    if services.keys.open:
        security.insert(0, {})
    for path, operations in schema.get("paths", {}).items():
        keyed = path.startswith(("/v1/seg-beyond", "/v1/loras", "/v2/"))
        if keyed and "/outputs/" not in path and "preview" not in path:
            for operation in operations.values():
                operation["security"] = security
    if services.settings.allowed_hosts:
        wrong_host(schema)
    app.openapi_schema = schema
    return schema
