"""Reading `input_image`: an http(s) URL, raw base64 or a data: URL, into a clean RGB picture."""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image, ImageOps

# The formats the contract promises, told apart by their first bytes rather than by any name.
MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
NEUTRAL = (128, 128, 128)
MAX_REDIRECTS = 5


class InputImageError(ValueError):
    """The image cannot be used; the message is for the client and starts with the field name."""

    def __init__(self, reason: str, field: str = "input_image") -> None:
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 16_000_000
    max_canvas_pixels: int = 40_000_000
    allow_private_urls: bool = False
    timeout: float = 15.0


def is_url(value: str) -> bool:
    return value[:8].lower().startswith(("http://", "https://"))


def sniff_format(data: bytes) -> str | None:
    for magic, fmt in MAGIC.items():
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_base64(value: str, limits: ImageLimits) -> bytes:
    text = value.strip()
    if text[:5].lower() == "data:":
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header.lower():
            raise InputImageError("a data: URL must be base64-encoded (data:image/png;base64,...)")
    text = re.sub(r"\s+", "", text)
    # Base64 grows data by 4/3: refuse oversized payloads before decoding them.
    if len(text) * 3 // 4 > limits.max_bytes:
        raise InputImageError(f"image is larger than the limit of {limits.max_bytes} bytes")
    text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputImageError("not a URL and not valid base64") from None


# Ranges Python's `ipaddress` counts as global (or does not single out) that must still never be reached.
THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # 0.x.y.z reaches the local host on Linux
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries and may be routed to (mapped, 6to4, NAT64, v4-compatible)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64 or (ip in IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def classify(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """One of: public; private (private, loopback, carrier-grade NAT: allowed for in-house servers);
    forbidden (link-local with the cloud metadata services, multicast, reserved, unspecified)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None:
            return "forbidden"
        ip = embedded_ipv4(ip) or ip
    if ip.is_loopback:
        return "private"  # before is_reserved, which covers ::1 too
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved or ip in THIS_NETWORK:
        return "forbidden"
    return "public" if ip.is_global else "private"


def check_address(host: str, allow_private: bool) -> list[str]:
    """Resolve `host` and refuse addresses that are not on the public internet.

    Private and loopback addresses are allowed only with allow_private (in-house asset servers);
    link-local (cloud metadata services live there) never is.
    """
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InputImageError(f"cannot resolve host {host!r}") from None
    addresses = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        kind = classify(ip)
        if kind == "forbidden":
            raise InputImageError(f"host {host!r} resolves to a forbidden address")
        if kind == "private" and not allow_private:
            raise InputImageError(f"host {host!r} resolves to a private or loopback address, which is refused")
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        addresses.append(str(mapped or ip))
    return addresses


def check_url(url: str, limits: ImageLimits) -> list[str]:
    """The URL's addresses, each one checked; raises when any of them may not be reached."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InputImageError("only http and https URLs are accepted")
    return check_address(parts.hostname, limits.allow_private_urls)


def pinned_request(url: str, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
    """The request aimed at the address that was checked, so a second DNS answer cannot redirect it
    (DNS rebinding); Host and TLS SNI still name the host, so virtual hosts and certificates work."""
    logical = httpx.URL(url)
    target = logical.copy_with(host=address)
    host = logical.host if logical.port is None else f"{logical.host}:{logical.port}"
    return target, {"Host": host}, {"sni_hostname": logical.host}


def fetch(url: str, limits: ImageLimits) -> bytes:
    """Download with a byte cap, timeouts and every redirect re-checked."""
    timeout = httpx.Timeout(limits.timeout, connect=min(5.0, limits.timeout))
    # Read timeouts bound each wait; this bounds the whole, against a server dripping bytes slowly.
    deadline = time.monotonic() + 2 * limits.timeout
    too_large = f"image is larger than the limit of {limits.max_bytes} bytes"
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            target, headers, extensions = pinned_request(url, check_url(url, limits)[0])
            try:
                with client.stream("GET", target, headers=headers, extensions=extensions) as response:
                    if response.is_redirect:
                        url = str(httpx.URL(url).join(response.headers.get("location", "")))
                        continue
                    if response.status_code != 200:
                        raise InputImageError(f"fetching the URL answered HTTP {response.status_code}")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > limits.max_bytes:
                        raise InputImageError(too_large)
                    chunks, size = [], 0
                    for chunk in response.iter_bytes():
                        size += len(chunk)
                        if size > limits.max_bytes:
                            raise InputImageError(too_large)
                        if time.monotonic() > deadline:
                            raise InputImageError(f"fetching the URL took longer than {2 * limits.timeout:g} s")
                        chunks.append(chunk)
                    return b"".join(chunks)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise InputImageError(f"could not fetch the URL ({type(exc).__name__})") from None
    raise InputImageError(f"more than {MAX_REDIRECTS} redirects")


def read_bytes(value: str, limits: ImageLimits) -> bytes:
    return fetch(value.strip(), limits) if is_url(value) else decode_base64(value, limits)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with palettes expanded, 16-bit grey scaled down and transparency on a neutral grey."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array / top * 255 + 0.5).clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray((np.asarray(image) * 255 + 0.5).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*NEUTRAL, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    fmt = sniff_format(data)
    if fmt is None:
        raise InputImageError("not a PNG, JPEG or WebP image")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise InputImageError(
                    f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
                )
            image.load()
            image = ImageOps.exif_transpose(image) or image
            return to_rgb(image)
    except InputImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputImageError(f"cannot decode the {fmt} image ({exc})") from None


def load_image(value: str, limits: ImageLimits) -> Image.Image:
    return decode_image(read_bytes(value, limits), limits)


def check_canvas(size: tuple[int, int], params: dict, limits: ImageLimits) -> None:
    """The padded canvas must fit the limit too: padding can multiply a small image's pixels."""
    width = size[0] + params["left"] + params["right"]
    height = size[1] + params["top"] + params["bottom"]
    if width * height > limits.max_canvas_pixels:
        raise InputImageError(
            f"{width}x{height} = {width * height} pixels after padding; the limit is {limits.max_canvas_pixels}",
            field="left/right/top/bottom",
        )
