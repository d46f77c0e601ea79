"""Reading `input_image`: an http(s) URL, raw base64 or a data: URL, into a clean RGB (or RGBA) picture.

The URL checks live in server/guard/urlguard.py and the download in server/guard/fetch.py; their names are re-exported
here for the callers that import them from this module.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re

import numpy as np
from PIL import Image, ImageOps

from server.guard.fetch import MAX_REDIRECTS, fetch, fetch_async
from server.guard.image_integrity import check_complete
from server.guard.input_limits import ImageLimits, InputImageError
from server.guard.urlguard import check_address, check_url, check_url_async, classify, is_url, parse_url, pinned_request

__all__ = [
    "MAX_REDIRECTS",
    "ImageLimits",
    "InputImageError",
    "check_address",
    "check_canvas",
    "check_url",
    "check_url_async",
    "classify",
    "decode_base64",
    "decode_image",
    "fetch",
    "fetch_async",
    "is_url",
    "load_image",
    "parse_url",
    "pinned_request",
    "read_bytes",
    "sniff_format",
    "to_rgb",
]

# The formats the contract promises, told apart by their first bytes rather than by any name.
MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
log = logging.getLogger("beyond.images")


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


def read_bytes(value: str, limits: ImageLimits) -> bytes:
    return fetch(value.strip(), limits) if is_url(value) else decode_base64(value, limits)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with palettes expanded and 16-bit grey scaled down; RGBA when some pixel is transparent (the engine
    generates transparent pixels, models/canvas.py), RGB when every pixel is opaque."""
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
        return rgba if rgba.getchannel("A").getextrema()[0] < 255 else rgba.convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """The picture in `data`, upright, RGB or RGBA (to_rgb). Client messages are ours alone: the library's detail (which
    names objects and its own limits) goes to the log."""
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
            # Pillow lets data that ends early through as grey (JPEG) or black (PNG) pixels.
            check_complete(fmt, data, image)
            image = ImageOps.exif_transpose(image) or image
            return to_rgb(image)
    except InputImageError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow refuses a header past its own bomb limit (178956970 pixels) before our check sees the size.
        log.info("input_image %s refused by Pillow: %s", fmt, exc)
        raise InputImageError(f"image is larger than the limit of {limits.max_pixels} pixels") from None
    except Exception as exc:  # any failure inside the decoders is the data's fault, never a server error
        log.info("input_image %s does not decode: %s: %s", fmt, type(exc).__name__, exc)
        raise InputImageError(f"cannot decode the {fmt} image: the data is truncated or corrupt") from None


def load_image(value: str, limits: ImageLimits) -> Image.Image:
    return decode_image(read_bytes(value, limits), limits)


def check_canvas(canvas: tuple[int, int], limits: ImageLimits) -> None:
    """The padded canvas must fit the limit too: padding can multiply a small image's pixels."""
    width, height = canvas
    if width * height > limits.max_canvas_pixels:
        raise InputImageError(
            f"{width}x{height} = {width * height} pixels after padding; the limit is {limits.max_canvas_pixels}",
            field="left/right/top/bottom",
        )
