"""The fast routes' table (server/http/fast_routes.py): what the routes register, and how a scope matches."""

from __future__ import annotations

import asyncio

from server.http import fast_routes
from server.http.app import create_app  # noqa: F401  (imports the routes, which register their fast paths)


def scope(method: str, path: str) -> dict:
    return {"type": "http", "method": method, "path": path}


def test_the_routes_register_the_status_poll_and_v1() -> None:
    poll = scope("GET", "/v2/requests/abc_123/status")
    answer = fast_routes.match(poll)
    assert answer is not None
    assert poll["route"].path == "/v2/requests/{request_id}/status"
    assert poll["path_params"] == {"request_id": "abc_123"}
    v1 = scope("POST", "/v1/seg-beyond")
    assert fast_routes.match(v1) is not None and v1["route"].path == "/v1/seg-beyond"


def test_anything_else_goes_to_the_router() -> None:
    for method, path in [
        ("POST", "/v2/requests/abc/status"),
        ("GET", "/v1/seg-beyond"),
        ("GET", "/v2/requests/a/b/status"),
        ("GET", "/v2/requests//status"),
        ("GET", "/v2/requests/abc/status/"),
        ("GET", "/v2/requests/abc"),
    ]:
        unmatched = scope(method, path)
        assert fast_routes.match(unmatched) is None, (method, path)
        assert "route" not in unmatched


def test_a_template_passes_its_parameters_by_name() -> None:
    seen = []

    async def answer(request: object, **params: str) -> str:
        seen.append((request, params))
        return "answered"

    fast_routes.add("DELETE", "/test/{a}/x.y/{b}", answer)
    try:
        found = scope("DELETE", "/test/1/x.y/2")
        handler = fast_routes.match(found)
        assert handler is not None and asyncio.run(handler("request")) == "answered"  # type: ignore[arg-type]
        assert seen == [("request", {"a": "1", "b": "2"})]
        assert fast_routes.match(scope("DELETE", "/test/1/xzy/2")) is None  # the dot is literal
    finally:
        fast_routes.PATTERNS.pop("DELETE")
