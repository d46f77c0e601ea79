"""Whether an image's data fills the size its header declares.

Pillow decodes a JPEG whose entropy-coded data ends early (a header edited to declare more pixels than the
data holds, or a file cut short before its end marker) without a word: libjpeg fills the missing blocks with
grey and only warns, and Pillow drops the warning. A PNG whose compressed data ends before its last row
leaves the missing rows black, again without an error. These checks run after Pillow has decoded the image
(so a cut file keeps Pillow's own refusal) and refuse what it let through. WebP needs none: libwebp refuses
data that ends early.
"""

from __future__ import annotations

import logging
import re
import struct
import zlib

import simplejpeg
from PIL import Image

from server.guard.input_limits import InputImageError

log = logging.getLogger("beyond.images")

# An 0xFF that starts a marker inside entropy-coded data: not a stuffed 0xFF00, not a restart marker
# (which stays inside the scan), not one of the fill bytes 0xFF that may stand before a marker.
SCAN_END = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")
# libjpeg's warning for bytes between the last scan's data and the end marker, which some encoders leave
# there (only the decoder can tell where a scan's data ends, so `scan_stream` cannot leave them out).
TRAILING_BYTES = "extraneous bytes before marker 0xd9"
# The next segment's marker, past fill bytes (0xFF), stray 0xFF00 pairs and the markers that stand alone
# (TEM, RSTn, SOI), all of which libjpeg skips between segments.
MARKER = re.compile(rb"\xff+([^\x00\x01\xd0-\xd8\xff])")
# Real files have tens; the walk below is Python, so a file of millions of empty segments is refused.
MAX_SEGMENTS = 10_000
SEQUENTIAL_FRAMES = {0xC0, 0xC1, 0xC9}  # baseline, extended, extended arithmetic
# PNG colour types: samples per pixel.
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7: (first column, first row, column step, row step) of each pass.
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
INFLATE_STEP = 1 << 16


def check_complete(fmt: str, data: bytes, image: Image.Image) -> None:
    """InputImageError when `data` does not fill the size of `image`, the picture Pillow just decoded from it."""
    if fmt == "JPEG":
        check_jpeg(data, image.size, image.mode)
    elif fmt == "PNG":
        check_png(data, image)


def incomplete(fmt: str, size: tuple[int, int]) -> InputImageError:
    return InputImageError(f"the {fmt} data ends before the {size[0]}x{size[1]} image it declares is complete")


def check_jpeg(data: bytes, size: tuple[int, int], mode: str) -> None:
    """libjpeg-turbo decodes every scan again, at an eighth of the size, and stops at its first warning.

    The stream it is given holds only what decoding needs (see `scan_stream`), so that the warnings of sound
    but untidy files neither hide a premature end behind them nor make the image fail.
    """
    stream = scan_stream(data)
    colorspace = "CMYK" if mode == "CMYK" else "GRAY"  # libjpeg-turbo turns CMYK into nothing else
    try:
        simplejpeg.decode_jpeg(stream, colorspace=colorspace, min_height=1, min_width=1, strict=True)
        return
    except ValueError as exc:
        problem = str(exc)
    try:
        # Without strict a warning passes and an error does not. An error is something TurboJPEG cannot do
        # that Pillow just did (it decoded this image), so it says nothing about the data.
        simplejpeg.decode_jpeg(stream, colorspace=colorspace, min_height=1, min_width=1, strict=False)
    except ValueError:
        log.info("input_image JPEG not checked for completeness: %s", problem)
        return
    log.info("input_image JPEG decodes with a warning: %s", problem)
    if "premature end" in problem.lower():
        raise incomplete("JPEG", size)
    if TRAILING_BYTES in problem:
        return  # bytes after the last scan, before the end marker: every scan was decoded in full before them
    raise InputImageError("cannot decode the JPEG image: the data is truncated or corrupt")


def scan_stream(data: bytes) -> bytes:
    """The JPEG's tables, frame header and scans, in their order, ending with an end-of-image marker.

    Left out: application and comment segments (EXIF, ICC profiles, JFIF versions: libjpeg warns about some
    of them), bytes between one segment's end and the next marker, anything after the first end-of-image
    marker (the second picture of an MPO), and the unused spectral-selection fields of a sequential frame's
    scan headers (some encoders write them wrong). None of these changes the scans' data. A stream that ends
    without an end marker gets one, so data that ends early is found inside the last scan.
    """
    parts = [b"\xff\xd8"]
    sequential = False
    position = 2
    for _ in range(MAX_SEGMENTS):
        marker = MARKER.search(data, position)
        if marker is None or marker.group(1) == b"\xd9":
            break
        code, code_at = marker.group(1)[0], marker.start(1)
        if code_at + 3 > len(data):
            break
        (length,) = struct.unpack_from(">H", data, code_at + 1)
        position = code_at + 1 + max(length, 2)
        if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            sequential = code in SEQUENTIAL_FRAMES
        if 0xE0 <= code <= 0xEF or code == 0xFE:  # APPn, COM
            continue
        segment = bytearray(b"\xff" + data[code_at:position])
        if code == 0xDA:  # a scan: its header, then its entropy-coded data up to the next marker
            if sequential and len(segment) >= 7:
                segment[-3:] = b"\x00\x3f\x00"  # Ss=0, Se=63, Ah=Al=0: what libjpeg reads a sequential scan as
            scan_end = SCAN_END.search(data, position)
            segment += data[position : scan_end.start() if scan_end else len(data)]
            position = scan_end.start() if scan_end else len(data)
        parts.append(bytes(segment))
    else:
        raise InputImageError(f"cannot decode the JPEG image: more than {MAX_SEGMENTS} segments")
    parts.append(b"\xff\xd9")
    return b"".join(parts)


def check_png(data: bytes, image: Image.Image) -> None:
    """The image data (IDAT), inflated and counted until it holds every row the header declares.

    Most images are let through without that: Pillow decodes into zeroed memory, one whole row at a time from
    the top, so a last row with a byte that is not zero was decoded, and every row above it too. An image
    whose last row is black, or an interlaced one (rows in seven passes), is counted.
    """
    width, height = size = image.size
    header, image_data = png_chunks(data)
    depth, colour, interlaced = header[8], header[9], header[12]
    if not interlaced and image.crop((0, height - 1, width, height)).tobytes().strip(b"\x00"):
        return
    bits = depth * PNG_CHANNELS.get(colour, 1)

    def row_bytes(pixels: int) -> int:  # the filter byte and the packed samples of one row
        return 1 + (pixels * bits + 7) // 8

    if interlaced:
        needed = 0
        for x0, y0, dx, dy in ADAM7:
            columns, rows = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
            if columns > 0 and rows > 0:
                needed += rows * row_bytes(columns)
    else:
        needed = height * row_bytes(width)
    inflater, produced = zlib.decompressobj(), 0
    for chunk in image_data:
        for offset in range(0, len(chunk), INFLATE_STEP):
            piece = chunk[offset : offset + INFLATE_STEP]
            while piece and produced < needed and not inflater.eof:
                produced += len(inflater.decompress(piece, INFLATE_STEP))
                piece = inflater.unconsumed_tail
            if produced >= needed:
                return
    raise incomplete("PNG", size)


def png_chunks(data: bytes) -> tuple[bytes, list[memoryview]]:
    """The header (IHDR) and the payloads of the image data chunks (IDAT), in order; a chunk cut short gives
    what there is of it."""
    view, header, image_data, position = memoryview(data), b"", [], 8
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IEND":
            break
        if kind == b"IHDR" and not header:
            header = data[position + 8 : position + 8 + length]
        elif kind == b"IDAT":
            image_data.append(view[position + 8 : position + 8 + length])
        position += 12 + length
    return header.ljust(13, b"\0"), image_data
