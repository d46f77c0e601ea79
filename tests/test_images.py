"""Reading input_image: formats, modes, orientation, limits and URL checks."""

from __future__ import annotations

import base64
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from server.guard.images import (
    ImageLimits,
    InputImageError,
    check_url,
    decode_base64,
    decode_image,
    load_image,
    pinned_request,
)
from tests.helpers import encode, noise_image, smooth_image

LIMITS = ImageLimits()


def test_palette_png_is_read_as_colours_not_indices() -> None:
    palette_image = Image.new("P", (4, 2))
    palette = [0] * 768
    palette[3 * 7 : 3 * 7 + 3] = [200, 10, 30]  # index 7 is a red
    palette_image.putpalette(palette)
    palette_image.putdata([7] * 8)
    rgb = decode_image(encode(palette_image), LIMITS)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (200, 10, 30)


def test_transparent_areas_keep_their_alpha_for_the_engine() -> None:
    # The engine generates them (tests/test_transparency.py); nothing is flattened onto a background here.
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black
    kept = decode_image(encode(rgba), LIMITS)
    assert kept.mode == "RGBA"
    assert kept.getpixel((0, 0))[3] == 0 and kept.getpixel((1, 0)) == (0, 0, 0, 128)
    assert kept.getpixel((2, 2)) == (255, 0, 0, 255)


def test_la_and_transparent_palette() -> None:
    la = Image.new("LA", (2, 1), (255, 255))
    la.putpixel((0, 0), (0, 0))
    rgba = decode_image(encode(la), LIMITS)
    assert rgba.getpixel((0, 0))[3] == 0 and rgba.getpixel((1, 0)) == (255, 255, 255, 255)
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 250, 250, 250] + [0] * 762)
    pal.putdata([0, 1])
    data = encode(pal, transparency=0)
    rgba = decode_image(data, LIMITS)
    assert rgba.getpixel((0, 0))[3] == 0 and rgba.getpixel((1, 0)) == (250, 250, 250, 255)


def test_greyscale_and_16_bit_greyscale() -> None:
    grey = Image.new("L", (2, 2), 77)
    assert decode_image(encode(grey), LIMITS).getpixel((1, 1)) == (77, 77, 77)
    deep = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert decode_image(encode(deep), LIMITS).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    data = encode(image, "JPEG", exif=exif, quality=95)
    upright = decode_image(data, LIMITS)
    assert upright.size == (20, 40)
    top = np.asarray(upright)[:8].mean()
    bottom = np.asarray(upright)[-8:].mean()
    assert top > 200 > 50 > bottom  # the white strip is now on top


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_formats(fmt: str) -> None:
    image = decode_image(encode(smooth_image(32, 16), fmt), LIMITS)
    assert image.size == (32, 16) and image.mode == "RGB"


def test_other_formats_are_refused_by_their_bytes() -> None:
    with pytest.raises(InputImageError, match="not a PNG, JPEG or WebP"):
        decode_image(encode(smooth_image(8, 8), "GIF"), LIMITS)
    with pytest.raises(InputImageError, match="not a PNG, JPEG or WebP"):
        decode_image(encode(smooth_image(8, 8), "BMP"), LIMITS)


def test_pixel_and_byte_caps() -> None:
    small = ImageLimits(max_pixels=100, max_bytes=10_000)
    with pytest.raises(InputImageError, match="pixels; the limit is 100"):
        decode_image(encode(smooth_image(20, 20)), small)
    payload = base64.b64encode(b"x" * 20_000).decode()
    with pytest.raises(InputImageError, match="larger than the limit"):
        decode_base64(payload, small)


def test_base64_variants_decode_to_the_same_bytes() -> None:
    data = encode(smooth_image(16, 8))
    plain = base64.b64encode(data).decode()
    wrapped = "\n".join(plain[i : i + 76] for i in range(0, len(plain), 76))
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    for text in (plain, wrapped, urlsafe, "data:image/png;base64," + plain):
        assert decode_base64(text, LIMITS) == data
    with pytest.raises(InputImageError):
        decode_base64("data:image/png,rawtext", LIMITS)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://localhost/x.png",
        "http://10.1.2.3/x.png",
        "http://[::1]/x.png",
        "http://192.168.0.1/a",
        "http://169.254.169.254/latest/meta-data",
    ],
)
def test_private_urls_are_refused_by_default(url: str) -> None:
    with pytest.raises(InputImageError, match="input_image: "):
        check_url(url, LIMITS)


def test_allow_private_lets_loopback_through_but_never_link_local() -> None:
    allowed = ImageLimits(allow_private_urls=True)
    check_url("http://127.0.0.1/x.png", allowed)
    with pytest.raises(InputImageError, match="forbidden"):
        check_url("http://169.254.169.254/latest/meta-data", allowed)


def test_only_http_and_https() -> None:
    with pytest.raises(InputImageError, match="only http and https"):
        check_url("ftp://example.com/x.png", LIMITS)


def test_fetch_follows_redirects_and_caps_bytes(images) -> None:
    png = encode(noise_image(16, 16))
    assert len(png) > 300
    target = images.add("/target.png", png)
    images.add("/hop", b"", status=302, headers={"Location": target})
    allowed = ImageLimits(allow_private_urls=True)
    assert load_image(images.url + "/hop", allowed).size == (16, 16)
    with pytest.raises(InputImageError, match="larger than the limit"):
        load_image(target, ImageLimits(allow_private_urls=True, max_bytes=300))


@pytest.mark.parametrize(
    "host",
    ["100.64.1.1", "240.0.0.1", "0.0.0.0", "[fc00::1]", "[::ffff:127.0.0.1]", "[fe80::1]", "224.0.0.1", "[::]"],
)
def test_carrier_grade_nat_reserved_and_ipv6_special_ranges_are_refused(host: str) -> None:
    with pytest.raises(InputImageError, match="input_image: "):
        check_url(f"http://{host}/x.png", LIMITS)


def test_the_connection_goes_to_the_checked_address_with_the_host_name_kept(images) -> None:
    png = encode(noise_image(8, 8))
    path = "/pinned.png"
    images.add(path, png)
    port = images.url.rsplit(":", 1)[1]
    # "localhost" is resolved once, checked, and the request is sent to that address with
    # Host: localhost, so a DNS answer that changes between check and connect cannot matter.
    target, headers, extensions = pinned_request(f"http://localhost:{port}{path}", "127.0.0.1")
    assert target.host == "127.0.0.1" and headers == {"Host": f"localhost:{port}"}
    assert extensions == {"sni_hostname": "localhost"}
    assert load_image(f"http://localhost:{port}{path}", ImageLimits(allow_private_urls=True)).size == (8, 8)
    with pytest.raises(InputImageError, match="private or loopback"):
        load_image(f"http://localhost:{port}{path}", LIMITS)


def test_a_redirect_to_a_private_address_is_refused(images) -> None:
    # The first hop (loopback) is let through by allow_private; its target, link-local, never is.
    images.add("/to-metadata", b"", status=302, headers={"Location": "http://169.254.169.254/latest"})
    with pytest.raises(InputImageError, match="forbidden"):
        load_image(images.url + "/to-metadata", ImageLimits(allow_private_urls=True))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds almost nothing: the shape of a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def assert_our_words(message: str) -> None:
    for leak in ("0x", "object at", "BytesIO", "/", "178956970", "357913941", "Traceback"):
        assert leak not in message, message


@pytest.mark.parametrize("max_pixels", [16_000_000, 1000])
@pytest.mark.parametrize("side", [15_000, 20_000])  # 225 and 400 MP: Pillow's own bomb check speaks first
def test_a_header_past_pillows_own_limit_is_reported_against_ours(max_pixels: int, side: int) -> None:
    with pytest.raises(InputImageError) as caught:
        decode_image(png_header(side, side), ImageLimits(max_pixels=max_pixels))
    assert str(caught.value) == f"input_image: image is larger than the limit of {max_pixels} pixels"
    assert_our_words(str(caught.value))


def test_a_header_over_our_limit_but_under_pillows_names_the_size() -> None:
    with pytest.raises(InputImageError) as caught:
        decode_image(png_header(5000, 4000), LIMITS)
    assert str(caught.value) == "input_image: image is 5000x4000 = 20000000 pixels; the limit is 16000000"


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        ("JPEG", encode(noise_image(64, 64), "JPEG")[:1500]),  # truncated
        ("PNG", encode(noise_image(64, 64))[:2000]),  # truncated
        ("PNG", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20),  # Pillow: "cannot identify image file <_io.BytesIO ...>"
        ("JPEG", b"\xff\xd8\xff" + bytes(range(256)) * 4),
        ("WEBP", b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 32),
    ],
)
def test_undecodable_images_get_our_message_and_the_detail_goes_to_the_log(
    fmt: str, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="beyond.images")
    with pytest.raises(InputImageError) as caught:
        decode_image(data, LIMITS)
    assert str(caught.value) == f"input_image: cannot decode the {fmt} image: the data is truncated or corrupt"
    assert_our_words(str(caught.value))
    assert [r for r in caplog.records if r.name == "beyond.images" and fmt in r.getMessage()]
