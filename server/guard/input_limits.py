"""What an `input_image` may be (sizes, address classes, time) and the error for one that may not."""

from __future__ import annotations

from dataclasses import dataclass


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
    timeout: float = 15.0  # seconds for the whole download: DNS, connect, headers, body, every redirect
