"""One deadline for the whole download of an input_image URL: DNS, headers, body and every redirect hop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from server.guard.images import ImageLimits, InputImageError, fetch, fetch_async, load_image
from tests.helpers import ImageServer, encode, noise_image

ONE_SECOND = ImageLimits(allow_private_urls=True, timeout=1)
PNG = encode(noise_image(8, 8))


class Dribble(socketserver.BaseRequestHandler):
    """/headers sends its header section a byte every 0.2 s, /body its body; either would take 12 s whole,
    and ends in a valid PNG, so only a deadline on the whole download can stop the fetch."""

    def handle(self) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            data = self.request.recv(4096)
            if not data:
                return
            request += data
        slow_headers = request.startswith(b"GET /headers ")
        head = b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n" % len(PNG)
        padding = b"X-Padding: " + b"a" * 60 + b"\r\n\r\n" if slow_headers else b"\r\n"
        try:
            if slow_headers:
                self.request.sendall(head)
                for byte in padding:
                    self.request.sendall(bytes([byte]))
                    time.sleep(0.2)
                self.request.sendall(PNG)
            else:
                self.request.sendall(head + padding + PNG[:4])
                for i in range(4, len(PNG), max(1, len(PNG) // 60)):
                    self.request.sendall(PNG[i : i + max(1, len(PNG) // 60)])
                    time.sleep(0.2)
        except OSError:
            pass  # the client gave up, as it should


@pytest.fixture
def dribble() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Dribble)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("path", ["/headers", "/body"])
def test_a_dribbling_server_is_cut_off_at_the_deadline(dribble: str, path: str) -> None:
    started = time.monotonic()
    with pytest.raises(InputImageError, match=r"^input_image: fetching the URL took longer than 1 s$"):
        load_image(dribble + path, ONE_SECOND)
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 2.0, elapsed


def test_the_deadline_covers_a_slow_dns_answer(monkeypatch: pytest.MonkeyPatch, images: ImageServer) -> None:
    url = images.add("/after-slow-dns.png", PNG)
    real = socket.getaddrinfo

    def slow(host: str, *args: object, **kwargs: object) -> list:
        if host == "slow-dns.example":
            time.sleep(3)
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    port = url.rsplit(":", 1)[1].split("/")[0]
    started = time.monotonic()
    with pytest.raises(InputImageError, match="took longer than 1 s"):
        fetch(f"http://slow-dns.example:{port}/after-slow-dns.png", ONE_SECOND)
    assert time.monotonic() - started < 2.0


class SlowRedirects(socketserver.BaseRequestHandler):
    """/hop<n> waits 0.3 s and redirects to /hop<n+1>; /hop5 waits 0.3 s and serves the PNG."""

    def handle(self) -> None:
        request = self.request.recv(4096)
        n = int(request.split(b" ", 2)[1].removeprefix(b"/hop"))
        time.sleep(0.3)
        if n < 5:
            answer = b"HTTP/1.0 302 Found\r\nLocation: /hop%d\r\nContent-Length: 0\r\n\r\n" % (n + 1)
        else:
            answer = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PNG) + PNG
        with contextlib.suppress(OSError):  # the client gave up, as it should
            self.request.sendall(answer)


def test_the_deadline_spans_every_redirect_hop() -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), SlowRedirects)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        # Each hop answers within 0.3 s; six of them do not fit in one second, but do in three.
        assert fetch(base + "/hop0", ImageLimits(allow_private_urls=True, timeout=3)) == PNG
        started = time.monotonic()
        with pytest.raises(InputImageError, match="took longer than 1 s"):
            fetch(base + "/hop0", ONE_SECOND)
        assert time.monotonic() - started < 2.0
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_async_keeps_the_event_loop_free_while_dns_is_slow(
    monkeypatch: pytest.MonkeyPatch, images: ImageServer
) -> None:
    url = images.add("/async.png", PNG)
    real = socket.getaddrinfo

    def slow(host: str, *args: object, **kwargs: object) -> list:
        if host == "slow-dns.example":
            time.sleep(0.5)
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    port = url.rsplit(":", 1)[1].split("/")[0]

    async def main() -> tuple[bytes, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        task = asyncio.create_task(ticker())
        data = await fetch_async(f"http://slow-dns.example:{port}/async.png", ONE_SECOND)
        task.cancel()
        return data, ticks

    data, ticks = asyncio.run(main())
    assert data == PNG
    assert ticks >= 5  # the loop ran on through the 0.5 s lookup


def test_the_sync_fetch_also_works_from_inside_an_event_loop(images: ImageServer) -> None:
    url = images.add("/sync-in-loop.png", PNG)

    async def main() -> bytes:
        return fetch(url, ONE_SECOND)

    assert asyncio.run(main()) == PNG
