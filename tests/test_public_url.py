"""status_url / response_url / output URLs: from the request, or from BEYOND_PUBLIC_URL behind a proxy."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from starlette.requests import Request

from server.guard.hosts import AllowedHosts
from server.http.deps import public_base
from server.settings import Settings
from tests.helpers import ServerProcess, request_body, smooth_image


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


# With a real server: which Host headers are answered, and whose X-Forwarded-* headers are believed.


def submit_as(connection: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> tuple[int, dict]:
    body = json.dumps(request_body(image=smooth_image(32, 32), left=8)).encode()
    connection.request("POST", path, body=body, headers={"content-type": "application/json", **headers})
    response = connection.getresponse()
    data = response.read()
    return response.status, json.loads(data) if response.getheader("content-type") == "application/json" else {}


def cancel(server: ServerProcess, answer: dict) -> None:
    if "request_id" in answer:
        httpx.post(f"{server.url}/v2/requests/{answer['request_id']}/cancel", timeout=30)


def test_without_settings_urls_follow_the_host_and_forwarded_headers_are_ignored(server: ServerProcess) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        # What the README says of a server with neither BEYOND_PUBLIC_URL nor BEYOND_ALLOWED_HOSTS.
        status, answer = submit_as(connection, "/v2/seg-beyond", {"host": "evil.example:666"})
        cancel(server, answer)
        assert status == 200 and answer["status_url"].startswith("http://evil.example:666/v2/requests/")
        # uvicorn's own default believes X-Forwarded-* from 127.0.0.1, which is any local user.
        forwarded = {"x-forwarded-proto": "https", "x-forwarded-for": "203.0.113.7"}
        status, answer = submit_as(connection, "/v2/seg-beyond", forwarded)
        cancel(server, answer)
        assert status == 200 and answer["status_url"].startswith(f"http://127.0.0.1:{server.port}/v2/requests/")
    finally:
        connection.close()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "BEYOND_ALLOWED_HOSTS": "GPU.example.com, *.beyond.test,127.0.0.1,[::1]",
        "BEYOND_FORWARDED_ALLOW_IPS": "127.0.0.1",
    }
    server = ServerProcess(tmp_path_factory.mktemp("guarded"), env=env).start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


WRONG_HOST = {"error": "host: not a name this server answers to"}


@pytest.mark.parametrize("host", ["evil.example:666", "beyond.test", "gpu.example.com.evil", "127.0.0.2", "[::2]"])
def test_other_hosts_are_400_on_every_path_and_the_connection_stays(guarded: ServerProcess, host: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=60)
    try:
        connection.connect()
        kept = connection.sock
        for path in ("/v2/seg-beyond", "/v1/seg-beyond"):  # the router, and the v1 fast path
            assert submit_as(connection, path, {"host": host}) == (400, WRONG_HOST)
        for path in ("/v2/requests/abc/status", "/v2/requests/abc", "/docs", "/"):  # the status fast path too
            connection.request("GET", path, headers={"host": host})
            response = connection.getresponse()
            assert (response.status, json.loads(response.read())) == (400, WRONG_HOST), path
        # Health checks and scrapes address a node by its IP: answered whatever the Host.
        for path in ("/health", "/metrics"):
            connection.request("GET", path, headers={"host": host})
            response = connection.getresponse()
            response.read()
            assert response.status == 200, path
        assert connection.sock is kept
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("host", "base"),
    [
        ("gpu.example.com", "https://gpu.example.com"),
        ("Gpu.Example.COM:8443", "https://gpu.example.com:8443"),
        ("eu.beyond.test", "https://eu.beyond.test"),
        ("[::1]:9000", "https://[::1]:9000"),
    ],
)
def test_allowed_hosts_and_a_trusted_proxys_scheme_make_the_urls(guarded: ServerProcess, host: str, base: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=60)
    try:
        status, answer = submit_as(connection, "/v2/seg-beyond", {"host": host, "x-forwarded-proto": "https"})
        cancel(guarded, answer)
        assert status == 200, answer
        assert answer["status_url"].lower() == f"{base}/v2/requests/{answer['request_id']}/status".lower()
    finally:
        connection.close()


def test_a_request_without_a_host_header_is_refused(guarded: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as raw:
        raw.sendall(b"GET /v2/requests/abc/status HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(body) == WRONG_HOST


def test_host_patterns_match_names_not_ports_or_case() -> None:
    hosts = AllowedHosts("gpu.example.com,*.beyond.test,[::1],10.0.0.5")
    for header in (b"gpu.example.com", b"GPU.example.com:443", b"a.beyond.test", b"a.b.beyond.test:1", b"[::1]:80"):
        assert hosts.allows(header), header
    for header in (b"beyond.test", b"xbeyond.test", b"gpu.example.com.evil", b"[::1", b"10.0.0.50", b"", None):
        assert not hosts.allows(header), header
    assert AllowedHosts("*").allows(None)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("allowed_hosts", "gpu.example.com:8000"),
        ("allowed_hosts", "http://gpu.example.com"),
        ("allowed_hosts", "gpu.*.com"),
        ("allowed_hosts", ","),
        ("forwarded_allow_ips", "proxy.internal"),
        ("forwarded_allow_ips", "10.0.0.0/33"),
    ],
)
def test_malformed_host_settings_are_refused(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings(**{name: value})


def test_empty_host_settings_are_unset() -> None:
    # docker compose passes a variable it was not given as "".
    settings = Settings(public_url="", allowed_hosts=" ", forwarded_allow_ips="")
    assert (settings.public_url, settings.allowed_hosts, settings.forwarded_allow_ips) == (None, None, None)
    assert Settings(forwarded_allow_ips="127.0.0.1, 10.0.0.0/8,::1,*").forwarded_allow_ips
