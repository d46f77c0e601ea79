"""schemathesis hooks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS by the `st` process).

Two things the OpenAPI document cannot say, and one promise of the test:

- What makes a valid request valid beyond its schema. An `input_image` must decode to a picture and a
  `cursor` must be one the server handed out; no JSON Schema can say either, so a request generated as valid
  gets a small real image (and a real cursor) in their place. Its sides become 0: nothing to outpaint, so the
  job completes at once and the fuzzer's requests cost no engine time (the example request outpaints 8 px).
- Nothing the server could take for a URL reaches it: input_image and webhook_url values that start like
  one are changed so they do not, whatever the fuzzer generated. The server fetches nothing, loopback included.
"""

from __future__ import annotations

from typing import Any

import schemathesis

from server.http.routes.v2 import encode_cursor
from tests.helpers import b64, encode, smooth_image

SUBMISSIONS = {"/v1/seg-beyond", "/v2/seg-beyond"}
IMAGE = b64(encode(smooth_image(16, 16)))
SIDES = ("left", "right", "top", "bottom")
URL_FIELDS = ("input_image", "webhook_url")


def generated_valid(case: Any, location: str) -> bool:
    """Whether the part of the request at `location` ("body", "query") was generated to fit its schema."""
    component = case.meta.components.get(location) if case.meta is not None else None
    return component is not None and component.mode.is_positive


def looks_like_a_url(value: object) -> bool:
    # The server takes input_image as a URL when it starts with http:// or https:// (any case), and strips
    # webhook_url first: anything that starts with "http" once stripped is changed.
    return isinstance(value, str) and value.strip()[:4].lower() == "http"


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    body = case.body
    if case.operation.path in SUBMISSIONS and isinstance(body, dict):
        if generated_valid(case, "body"):
            body["input_image"] = IMAGE
            if case.meta.phase.name != "examples":
                body.update({side: 0 for side in SIDES if side in body})
        for field in URL_FIELDS:
            if looks_like_a_url(body.get(field)):
                body[field] = "not a URL: " + body[field]
    query = case.query
    if isinstance(query, dict) and "cursor" in query and generated_valid(case, "query"):
        query["cursor"] = encode_cursor(1)
