"""status_url / response_url / output URLs: from the request, or from BEYOND_PUBLIC_URL behind a proxy."""

from __future__ import annotations

from starlette.requests import Request

from server.deps import public_base
from server.settings import Settings


def make_request(host: str, scheme: str = "http", root_path: str = "") -> Request:
    return Request(
        {
            "type": "http",
            "method": "GET",
            "scheme": scheme,
            "server": (host, 8000),
            "path": "/v2/seg-beyond",
            "root_path": root_path,
            "headers": [(b"host", host.encode())],
            "query_string": b"",
        }
    )


def test_base_url_comes_from_the_request() -> None:
    settings = Settings(public_url=None)
    assert public_base(make_request("gpu-box:8000"), settings) == "http://gpu-box:8000"
    assert public_base(make_request("gpu-box:8000", root_path="/beyond"), settings) == "http://gpu-box:8000/beyond"


def test_public_url_wins_behind_a_proxy() -> None:
    settings = Settings(public_url="https://images.example.com/beyond/")
    assert public_base(make_request("127.0.0.1:8000"), settings) == "https://images.example.com/beyond"
