"""Images whose data does not fill the size their header declares are refused, in every accepted format.

Each input is built here: a small image is encoded, then its header is edited to declare more pixels than
its data holds (a JPEG's SOF, a PNG's IHDR with a valid CRC, a WebP's VP8/VP8L/VP8X header).
"""

from __future__ import annotations

import base64
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from server.guard.images import ImageLimits, InputImageError, decode_image
from tests.helpers import ServerProcess, encode, noise_image, request_body, smooth_image
from tests.test_queue import finished, wait_for

LIMITS = ImageLimits()
SOF_MARKERS = {0xC0, 0xC1, 0xC2}


def jpeg_declaring(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF) edited to declare width x height."""
    out, position = bytearray(data), 2
    while position < len(out):
        assert out[position] == 0xFF, "a marker was expected"
        code = out[position + 1]
        (length,) = struct.unpack_from(">H", out, position + 2)
        if code in SOF_MARKERS:
            struct.pack_into(">HH", out, position + 5, height, width)
            return bytes(out)
        position += 2 + length
    raise AssertionError("no SOF marker")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(data: bytes, width: int, height: int) -> bytes:
    """The PNG with its IHDR edited to declare width x height, its CRC made valid again."""
    assert data[12:16] == b"IHDR"
    header = struct.pack(">II", width, height) + data[24:29]
    return data[:8] + png_chunk(b"IHDR", header) + data[33:]


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def interlaced_png(pixels: np.ndarray, declared: tuple[int, int] | None = None) -> bytes:
    """An Adam7-interlaced RGB PNG of `pixels` (Pillow writes none), declaring `declared` (width, height)."""
    height, width, _ = pixels.shape
    passes = (pixels[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7)
    raw = b"".join(b"\0" + row.tobytes() for rows in passes if rows.size for row in rows)
    width, height = declared or (width, height)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def riff_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, position = [], 12
    while position + 8 <= len(data):
        kind, (length,) = data[position : position + 4], struct.unpack_from("<I", data, position + 4)
        chunks.append((kind, data[position + 8 : position + 8 + length]))
        position += 8 + length + (length & 1)
    return chunks


def riff(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"WEBP" + b"".join(k + struct.pack("<I", len(b)) + b + b"\0" * (len(b) & 1) for k, b in chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_declaring(data: bytes, width: int, height: int) -> bytes:
    """The WebP with every header that states its size (VP8X canvas, VP8 frame, VP8L) edited to width x height."""
    edited = []
    for kind, body in riff_chunks(data):
        if kind == b"VP8X":
            body = body[:4] + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        elif kind == b"VP8 ":
            assert body[3:6] == b"\x9d\x01\x2a"
            body = body[:6] + struct.pack("<HH", width, height) + body[10:]  # 14 bits each, no upscaling
        elif kind == b"VP8L":
            (bits,) = struct.unpack_from("<I", body, 1)
            bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
            body = body[:1] + struct.pack("<I", bits) + body[5:]
        edited.append((kind, body))
    return riff(edited)


def translucent(width: int, height: int) -> Image.Image:
    """RGBA noise with varied alpha: WebP keeps it in an ALPH chunk beside the VP8 one, under a VP8X header."""
    return Image.fromarray(np.random.default_rng(2).integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")


def refusal(data: bytes) -> str:
    with pytest.raises(InputImageError) as caught:
        decode_image(data, LIMITS)
    return str(caught.value)


NOISE = noise_image(16, 16)
LYING_JPEG = jpeg_declaring(encode(NOISE, "JPEG"), 4000, 4000)  # the 630-byte 16-megapixel job
JPEG_4000 = "input_image: the JPEG data ends before the 4000x4000 image it declares is complete"


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("declared", [(4000, 4000), (64, 64), (16, 17)])
def test_a_jpeg_that_declares_more_pixels_than_its_data_holds(
    progressive: bool, mode: str, declared: tuple[int, int]
) -> None:
    data = encode(NOISE.convert(mode), "JPEG", progressive=progressive)
    assert decode_image(data, LIMITS).size == (16, 16)
    width, height = declared
    expected = f"input_image: the JPEG data ends before the {width}x{height} image it declares is complete"
    assert refusal(jpeg_declaring(data, width, height)) == expected


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_a_jpeg_cut_short_with_its_end_marker_kept(progressive: bool) -> None:
    data = encode(noise_image(160, 120), "JPEG", progressive=progressive)
    for length in (len(data) // 2, len(data) - 40):
        assert refusal(data[:length] + b"\xff\xd9") == (
            "input_image: the JPEG data ends before the 160x120 image it declares is complete"
        )
    # The bytes between the last scan and the end marker that some encoders leave do not hide a short scan.
    assert refusal(jpeg_declaring(data, 160, 240)[:-2] + b"\x00\x12\xff\xd9").startswith("input_image: the JPEG")


def sos_fields_set(data: bytes, value: int) -> bytes:
    """A sequential JPEG whose scan header's unused spectral-selection fields are not the standard ones."""
    out = bytearray(data)
    start = out.find(b"\xff\xda")
    (length,) = struct.unpack_from(">H", out, start + 2)
    out[start + 2 + length - 3] = value
    return bytes(out)


def jfif_version(data: bytes, major: int) -> bytes:
    out = bytearray(data)
    out[out.find(b"JFIF\x00") + 5] = major
    return bytes(out)


def with_exif_thumbnail() -> bytes:
    image = noise_image(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 1
    return encode(image, "JPEG", exif=exif.tobytes())


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize(
    "untidy",
    [
        lambda d: d[:-2] + b"\x00\x12" + d[-2:],  # libjpeg: "2 extraneous bytes before marker 0xd9"
        lambda d: d + b"trailing data after the end marker" * 3,
        lambda d: d + d,  # two pictures, as in an MPO
        lambda d: jfif_version(d, 2),  # libjpeg: "unknown JFIF revision number"
        lambda d: d[:2] + b"\xff\xfe\x00\x05abc" + d[2:],  # a comment
    ],
    ids=["bytes-before-eoi", "trailing-data", "two-pictures", "jfif-2", "comment"],
)
def test_untidy_but_complete_jpegs_are_still_accepted(progressive: bool, untidy) -> None:
    data = untidy(encode(noise_image(48, 32), "JPEG", progressive=progressive))
    assert decode_image(data, LIMITS).size == (48, 32)


def test_a_sequential_jpeg_with_odd_scan_fields_and_an_exif_jpeg_are_accepted() -> None:
    # libjpeg warns "Invalid SOS parameters for sequential JPEG" and decodes it in full.
    assert decode_image(sos_fields_set(encode(NOISE, "JPEG"), 5), LIMITS).size == (16, 16)
    assert decode_image(with_exif_thumbnail(), LIMITS).size == (64, 48)


def between_scans(data: bytes, filler: bytes) -> bytes:
    """A progressive JPEG with `filler` after its first scan's data (libjpeg skips it, and Pillow decodes it)."""
    first_scan = data.find(b"\xff\xda")
    # The next table or scan: in entropy-coded data 0xFF is only ever followed by 0x00 or a restart marker.
    after = min(i for i in (data.find(b"\xff\xc4", first_scan), data.find(b"\xff\xda", first_scan + 2)) if i > 0)
    return data[:after] + filler + data[after:]


def test_fill_bytes_and_segment_floods_between_scans() -> None:
    data = encode(noise_image(48, 32), "JPEG", progressive=True)
    # A megabyte of fill bytes and of restart markers, which libjpeg skips between segments: still sound.
    for filler in (b"\xff" * 1_000_000, b"\xff\xd0" * 500_000):
        assert decode_image(between_scans(data, filler), LIMITS).size == (48, 32)
    # Empty comments by the hundred thousand (libjpeg reads them in C, the check walks segments in Python).
    message = refusal(between_scans(data, b"\xff\xfe\x00\x02" * 100_000))
    assert message == "input_image: cannot decode the JPEG image: more than 10000 segments"


def test_a_jpeg_with_a_corrupt_scan_is_refused() -> None:
    data = bytearray(encode(noise_image(64, 64), "JPEG"))
    scan = data.find(b"\xff\xda")
    data[scan + 40 : scan + 48] = b"\xff\x00" * 4  # runs of ones: no Huffman code of these tables
    message = refusal(bytes(data))
    assert message == "input_image: cannot decode the JPEG image: the data is truncated or corrupt"


@pytest.mark.parametrize(
    "image",
    [
        noise_image(16, 16),
        noise_image(16, 16).convert("L"),
        noise_image(16, 16).convert("P"),
        noise_image(16, 16).convert("RGBA"),
        noise_image(16, 16).convert("1"),
        Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 257),
    ],
    ids=["rgb", "grey", "palette", "rgba", "bilevel", "16-bit"],
)
def test_a_png_that_declares_more_rows_than_its_data_holds(image: Image.Image) -> None:
    data = encode(image)
    assert decode_image(data, LIMITS).size == (16, 16)
    for height in (17, 64, 4000):
        message = refusal(png_declaring(data, 16, height))
        # Pillow itself refuses some of these (the rows it reads no longer line up with the data).
        assert message in (
            f"input_image: the PNG data ends before the 16x{height} image it declares is complete",
            "input_image: cannot decode the PNG image: the data is truncated or corrupt",
        )
    assert refusal(png_declaring(data, 16, 17)).startswith("input_image: the PNG data ends before")


@pytest.mark.parametrize("shape", [(16, 16), (13, 7), (1, 1), (9, 1), (1, 9)])
def test_interlaced_pngs_are_read_whole_and_refused_when_short(shape: tuple[int, int]) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert (np.asarray(decode_image(interlaced_png(pixels), LIMITS)) == pixels).all()
    height, width = shape
    message = refusal(interlaced_png(pixels, (width, height + 1)))
    assert message.startswith(("input_image: the PNG data ends before", "input_image: cannot decode the PNG"))


def test_a_png_whose_last_row_is_black_is_counted_and_accepted() -> None:
    pixels = np.asarray(noise_image(16, 16)).copy()
    pixels[-1] = 0
    data = encode(Image.fromarray(pixels))
    assert (np.asarray(decode_image(data, LIMITS)) == pixels).all()
    # Declaring one more row: the black last row no longer tells a decoded row from a missing one.
    assert refusal(png_declaring(data, 16, 17)).startswith("input_image: the PNG data ends before")


@pytest.mark.parametrize(
    "image, options",
    [
        (noise_image(16, 16), {}),
        (noise_image(16, 16), {"lossless": True}),
        (translucent(16, 16), {}),
        (translucent(16, 16), {"lossless": True}),
    ],
    ids=["vp8", "vp8l", "vp8x-alpha", "vp8l-alpha"],
)
def test_a_webp_that_declares_more_pixels_than_its_data_holds(image: Image.Image, options: dict) -> None:
    data = encode(image, "WEBP", **options)
    assert decode_image(data, LIMITS).size == (16, 16)
    if image.mode == "RGBA" and not options:  # lossy with alpha: VP8X, ALPH and VP8 chunks
        assert [kind for kind, _ in riff_chunks(data)][0] == b"VP8X"
    for width, height in ((16, 17), (64, 64), (4000, 4000)):
        assert refusal(webp_declaring(data, width, height)) == (
            "input_image: cannot decode the WEBP image: the data is truncated or corrupt"
        )


def test_a_webp_with_its_alpha_cut_short_is_refused() -> None:
    data = encode(translucent(16, 16), "WEBP")
    assert b"ALPH" in [kind for kind, _ in riff_chunks(data)]
    chunks = [(k, b[: len(b) // 3] if k == b"ALPH" else b) for k, b in riff_chunks(data)]
    assert refusal(riff(chunks)) == "input_image: cannot decode the WEBP image: the data is truncated or corrupt"


# Through the server: base64 and URL inputs, v1 and v2, get the same words.


def test_a_lying_jpeg_in_base64_is_400_on_v1_and_v2(server: ServerProcess) -> None:
    body = request_body(input_image=base64.b64encode(LYING_JPEG).decode())
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for path in ("/v1/seg-beyond", "/v2/seg-beyond"):
            response = client.post(path, json=body)
            assert response.status_code == 400, response.text
            assert response.json() == {"error": JPEG_4000}


def test_a_lying_image_by_url_fails_with_the_same_words(server: ServerProcess, images) -> None:
    lying_png = png_declaring(encode(smooth_image(32, 32)), 32, 48)
    cases = [
        (images.add("/lying.jpg", LYING_JPEG, "image/jpeg"), JPEG_4000),
        (
            images.add("/lying.png", lying_png),
            "input_image: the PNG data ends before the 32x48 image it declares is complete",
        ),
    ]
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for url, words in cases:
            response = client.post("/v1/seg-beyond", json=request_body(input_image=url))
            assert response.status_code == 400, response.text
            assert response.json()["error"] == words
            response = client.post("/v2/seg-beyond", json=request_body(input_image=url))
            assert response.status_code == 200, response.text
            final = wait_for(server, response.json()["request_id"], finished, timeout=60)
            assert final["status"] == "FAILED" and final["error"] == words
