"""What the completeness check of input images (server/guard/image_integrity.py) costs beside Pillow's decode.

    python -m benchmarks.input_check            # a 4000x3000 picture
    python -m benchmarks.input_check --quick    # 1600x1200

For each format, the same bytes are decoded by Pillow (what decode_image does anyway) and checked, in
alternating rounds; the table gives the median of each and their ratio. The picture is a gradient with
noise, like a photograph: hard to compress. A smooth one (PNG) shows the cheaper end.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from benchmarks.common import table
from server.guard.image_integrity import check_complete


def picture(width: int, height: int, noise: float) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    pixels = (x + y) / 2 + np.random.default_rng(0).normal(0, noise, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.input_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 1600x1200 picture, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (7; quick 3)")
    args = parser.parse_args(argv)
    width, height = (1600, 1200) if args.quick else (4000, 3000)
    rounds = args.rounds or (3 if args.quick else 7)
    noisy, smooth = picture(width, height, 12), picture(width, height, 0)
    # (name, format, bytes, whether the last row is made black: then the check inflates the PNG again)
    cases = [
        ("JPEG baseline q90", "JPEG", encoded(noisy, "JPEG", quality=90), False),
        ("JPEG progressive q90", "JPEG", encoded(noisy, "JPEG", quality=90, progressive=True), False),
        ("PNG", "PNG", encoded(noisy, "PNG"), False),
        ("PNG, last row black", "PNG", encoded(noisy, "PNG"), True),
        ("PNG smooth, last row black", "PNG", encoded(smooth, "PNG"), True),
    ]
    rows = []
    for name, fmt, data, black in cases:
        if black:  # the check cannot tell a black decoded row from a missing one, so it counts the data
            pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()
            pixels[-1] = 0
            data = encoded(Image.fromarray(pixels), "PNG")
        decode_times, check_times = [], []
        for _ in range(rounds):
            image = Image.open(io.BytesIO(data))
            decode_times.append(seconds(image.load))
            check_times.append(seconds(lambda data=data, image=image, fmt=fmt: check_complete(fmt, data, image)))
        decode, check = statistics.median(decode_times) * 1000, statistics.median(check_times) * 1000
        rows.append((name, f"{len(data) / 1e6:.1f}", decode, check, check / decode))
    print(f"{width}x{height}, median of {rounds} alternating rounds")
    print(table(["input", "MB", "Pillow decode ms", "check ms", "check / decode"], rows))


if __name__ == "__main__":
    main()
