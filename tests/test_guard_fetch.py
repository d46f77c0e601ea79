"""Safe fetching of input URLs: address classes, names, redirects, rebinding, byte and time caps."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from server.guard import urlguard
from server.guard.images import ImageLimits, InputImageError, check_url, classify, load_image
from tests.helpers import ImageServer, ServerProcess, encode, noise_image, request_body

STRICT = ImageLimits(allow_private_urls=False)
IN_HOUSE = ImageLimits(allow_private_urls=True)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", "public"),
        ("2606:4700::1111", "public"),
        ("64:ff9b::808:808", "public"),  # NAT64 of a public address
        ("127.0.0.1", "private"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.1.1", "private"),  # carrier-grade NAT
        ("::1", "private"),
        ("fd00::1", "private"),  # unique local
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::1", "private"),  # 6to4 around 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 around 10.0.0.1
        ("::7f00:1", "private"),  # IPv4-compatible 127.0.0.1
        ("169.254.169.254", "forbidden"),
        ("fe80::1", "forbidden"),
        ("::ffff:169.254.169.254", "forbidden"),
        ("2002:a9fe:a9fe::1", "forbidden"),  # 6to4 around the metadata service
        ("64:ff9b::a9fe:a9fe", "forbidden"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "forbidden"),  # Teredo
        ("224.0.0.1", "forbidden"),
        ("ff02::1", "forbidden"),
        ("0.0.0.0", "forbidden"),
        ("0.1.2.3", "forbidden"),
        ("::", "forbidden"),
        ("240.0.0.1", "forbidden"),
        ("255.255.255.255", "forbidden"),
        ("::a9fe:a9fe", "forbidden"),  # IPv4-compatible metadata service
        ("::ffff:7f00:1", "private"),  # IPv4-mapped loopback
        ("2002:808:808::1", "public"),  # 6to4 around 8.8.8.8
        ("::808:808", "public"),  # IPv4-compatible 8.8.8.8
        ("64:ff9b:1::a9fe:a9fe", "forbidden"),  # local-use NAT64: which bits hold the IPv4 address is unknown
        ("64:ff9b:1::808:808", "forbidden"),
        ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", "forbidden"),
        ("fec0::1", "forbidden"),  # site-local
        ("feff:ffff::1", "forbidden"),
        ("::ffff:0:7f00:1", "forbidden"),  # IPv4-translated (SIIT): reserved
    ],
)
def test_address_classes(address: str, kind: str) -> None:
    assert classify(ipaddress.ip_address(address)) == kind


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names the test maps to addresses (every other name resolves as usual); lookups are recorded."""
    table: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def fake(host: str, port: object, *args: object, **kwargs: object) -> list:
        if host in table:
            table.setdefault("_lookups", []).append(host)
            addresses = table[host]
            answer = addresses.pop(0) if len(addresses) > 1 else addresses[0]  # a changing answer: rebinding
            family = socket.AF_INET6 if ":" in answer else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (answer, port or 0))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return table


@pytest.fixture
def loopback_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.1 stands in for a public asset host, so redirects from it can be tested offline."""
    real = urlguard.classify
    monkeypatch.setattr(urlguard, "classify", lambda ip: "public" if str(ip) == "127.0.0.1" else real(ip))


def test_a_name_that_resolves_inward_is_refused(dns: dict[str, list[str]]) -> None:
    dns["assets.corp.example"] = ["10.0.0.5"]
    dns["metadata.example"] = ["169.254.169.254"]
    with pytest.raises(InputImageError, match="private or loopback"):
        check_url("http://assets.corp.example/x.png", STRICT)
    check_url("http://assets.corp.example/x.png", IN_HOUSE)
    with pytest.raises(InputImageError, match="forbidden"):
        check_url("https://metadata.example/latest", IN_HOUSE)
    with pytest.raises(InputImageError, match="private or loopback"):
        check_url("http://localhost/x.png", STRICT)


@pytest.mark.parametrize(
    ("answer", "strict", "in_house"),
    [
        ("64:ff9b::a9fe:a9fe", "forbidden", "forbidden"),
        ("64:ff9b::a00:1", "private or loopback", None),
        ("64:ff9b::808:808", None, None),
        ("64:ff9b:1::a9fe:a9fe", "forbidden", "forbidden"),
        ("2002:a9fe:a9fe::1", "forbidden", "forbidden"),
        ("2002:c0a8:101::1", "private or loopback", None),
        ("::a9fe:a9fe", "forbidden", "forbidden"),
        ("::ffff:169.254.169.254", "forbidden", "forbidden"),
        ("fec0::1", "forbidden", "forbidden"),
        ("fec0:1:2:3::4", "forbidden", "forbidden"),
    ],
)
def test_names_resolving_to_embedded_and_site_local_addresses(
    dns: dict[str, list[str]], answer: str, strict: str | None, in_house: str | None
) -> None:
    # Judged in-process: the faked resolver answers, nothing connects anywhere.
    dns["embedded.example"] = [answer]
    for limits, refusal in ((STRICT, strict), (IN_HOUSE, in_house)):
        if refusal is None:
            check_url("http://embedded.example/x.png", limits)
        else:
            with pytest.raises(InputImageError, match=refusal):
                check_url("http://embedded.example/x.png", limits)
        if refusal == "forbidden":  # the same address written into the URL as a literal
            with pytest.raises(InputImageError, match=refusal):
                check_url(f"http://[{answer}]/x.png", limits)


@pytest.mark.parametrize(
    "location",
    ["http://10.1.2.3/x.png", "http://[::1]/x.png", "http://169.254.169.254/latest", "http://[::ffff:192.168.0.1]/"],
)
def test_every_redirect_is_checked_again(images: ImageServer, loopback_is_public: None, location: str) -> None:
    images.add("/hop-inward", b"", status=302, headers={"Location": location})
    with pytest.raises(InputImageError, match="private or loopback|forbidden"):
        load_image(images.url + "/hop-inward", STRICT)


def test_redirects_are_followed_at_most_five_times(images: ImageServer, loopback_is_public: None) -> None:
    images.add("/end.png", encode(noise_image(8, 8)))
    for i in range(6):
        images.add(f"/chain{i}", b"", status=301, headers={"Location": f"/chain{i + 1}" if i < 5 else "/end.png"})
    assert load_image(images.url + "/chain1", STRICT).size == (8, 8)  # five hops
    with pytest.raises(InputImageError, match="more than 5 redirects"):
        load_image(images.url + "/chain0", STRICT)
    images.add("/to-file", b"", status=302, headers={"Location": "file:///etc/passwd"})
    with pytest.raises(InputImageError, match="only http and https"):
        load_image(images.url + "/to-file", STRICT)


def test_the_connection_goes_to_the_address_that_was_checked(
    images: ImageServer, dns: dict[str, list[str]], loopback_is_public: None
) -> None:
    images.add("/rebind.png", encode(noise_image(8, 8)))
    port = images.url.rsplit(":", 1)[1]
    # The first answer is checked and used; a later lookup would have said the metadata service.
    dns["rebind.example"] = ["127.0.0.1", "169.254.169.254"]
    assert load_image(f"http://rebind.example:{port}/rebind.png", STRICT).size == (8, 8)
    assert dns["_lookups"] == ["rebind.example"]


class RecordingV6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def test_the_host_header_of_an_ipv6_literal_has_brackets() -> None:
    png = encode(noise_image(8, 8))
    received: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            received.append(self.headers.get("Host"))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: object) -> None:
            pass

    httpd = RecordingV6Server(("::1", 0), Handler)  # no IPv6 loopback: this fails, and so should the test
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        assert load_image(f"http://[::1]:{port}/x.png", IN_HOUSE).size == (8, 8)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert received == [f"[::1]:{port}"]


class Trickle(BaseHTTPRequestHandler):
    """/slow drips a byte at a time; /endless streams without a Content-Length and never stops."""

    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if self.path == "/slow":
            self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(10_000):
                self.wfile.write(b"\x89" if self.path == "/slow" else b"\0" * 65536)
                self.wfile.flush()
                if self.path == "/slow":
                    time.sleep(0.2)
        except OSError:
            pass  # the client gave up, as it should

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def trickle() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def test_a_slow_drip_is_cut_off_by_the_overall_deadline(trickle: str) -> None:
    started = time.monotonic()
    # A byte every 0.2 s: no single wait is long, the whole download may still not pass the 1 s deadline.
    with pytest.raises(InputImageError, match="took longer than 1 s"):
        load_image(trickle + "/slow", ImageLimits(allow_private_urls=True, timeout=1))
    assert time.monotonic() - started < 2


def test_the_byte_cap_holds_without_a_content_length(trickle: str) -> None:
    with pytest.raises(InputImageError, match="larger than the limit of 1000000 bytes"):
        load_image(trickle + "/endless", ImageLimits(allow_private_urls=True, max_bytes=1_000_000))


def test_through_the_server_a_redirect_to_link_local_is_400(server: ServerProcess, images: ImageServer) -> None:
    # The shared server allows private URLs (its image server is on loopback), never link-local.
    images.add("/to-metadata.png", b"", status=302, headers={"Location": "http://169.254.169.254/latest/meta-data"})
    body = request_body(input_image=images.url + "/to-metadata.png", guidance_scale=1.0)
    response = httpx.post(f"{server.url}/v1/seg-beyond", json=body, timeout=120)
    assert response.status_code == 400 and "forbidden address" in response.json()["error"]


def test_through_the_server_an_image_over_the_pixel_limit_is_400(server: ServerProcess, images: ImageServer) -> None:
    url = images.add("/huge.png", encode(Image.new("L", (4100, 4100))))  # 16.8 MP, a few kB of PNG
    response = httpx.post(f"{server.url}/v1/seg-beyond", json=request_body(input_image=url), timeout=120)
    assert response.status_code == 400
    assert response.json()["error"] == "input_image: image is 4100x4100 = 16810000 pixels; the limit is 16000000"
