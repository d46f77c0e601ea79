"""The working size: the native area at the canvas's aspect ratio, each side within a range and the area
never past the native one, so no canvas shape costs more than a square one; ordinary canvases keep the
size they always had wherever it was within the native area."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from models.canvas import SEAM_BAND, side_range, working_size
from models.engine import OutpaintEngine, OutpaintRequest, OutpaintResult
from models.pipeline import OutpaintPipeline
from models.random_models import build_random
from tests.helpers import noise_image

TINY_AREA = 256 * 256
SDXL_AREA = 1024 * 1024


@pytest.fixture(scope="module")
def engine() -> OutpaintEngine:
    return OutpaintEngine(
        OutpaintPipeline(build_random("random:tiny"), torch.device("cpu"), torch.float32), "random:tiny"
    )


def unbounded_working_size(width: int, height: int, native_area: int, multiple: int = 64) -> tuple[int, int]:
    """The rule before sides had a range (the short side at least 64, the long one unbounded)."""
    aspect = width / height
    w = max(multiple, round(math.sqrt(native_area * aspect) / multiple) * multiple)
    h = max(multiple, round(math.sqrt(native_area / aspect) / multiple) * multiple)
    return w, h


def test_the_side_range_scales_with_the_native_side() -> None:
    assert side_range(SDXL_AREA) == (256, 2048)
    assert side_range(TINY_AREA) == (64, 512)
    assert side_range(768 * 768) == (192, 1536)


@pytest.mark.parametrize("native", [TINY_AREA, 768 * 768, SDXL_AREA])
def test_canvases_up_to_four_to_one_keep_their_working_size_where_it_was_within_the_native_area(native: int) -> None:
    kept = changed = 0
    for width in range(1, 6000, 23):
        for height in range(1, 6000, 29):
            if 1 / 4 <= width / height <= 4:
                before = unbounded_working_size(width, height, native)
                w, h = working_size(width, height, native)
                assert w * h <= native, ((width, height), (w, h))
                if before[0] * before[1] <= native:
                    assert (w, h) == before, (width, height)
                    kept += 1
                else:
                    # Rounding the sides to 64 px put the old size past the native area: now one side, or
                    # each, is rounded down instead, by at most two steps in all.
                    assert w <= before[0] and h <= before[1] and before[0] + before[1] - w - h <= 128, (width, height)
                    changed += 1
    assert kept > 10_000 and changed > 0


def sweep() -> list[tuple[int, int]]:
    """Canvases on a grid of 1 to 8000 px a side, and a fine walk of aspect ratios from 1:20 to 20:1."""
    grid = [(w, h) for w in range(1, 8001, 89) for h in range(1, 8001, 97)]
    walk = []
    for k in range(-1500, 1501):
        root = math.sqrt(20 ** (k / 1500))
        walk.append((round(4096 * root), round(4096 / root)))
    return grid + walk


@pytest.mark.parametrize("native", [TINY_AREA, 768 * 768, SDXL_AREA])
def test_no_canvas_is_worked_past_the_native_area(native: int) -> None:
    low, high = side_range(native)
    sizes = {canvas: working_size(*canvas, native) for canvas in sweep()}
    over = {canvas: (w, h) for canvas, (w, h) in sizes.items() if w * h > native}
    assert not over, f"{len(over)} canvases past the native area, e.g. {list(over.items())[:4]}"
    for canvas, (w, h) in sizes.items():
        assert w % 64 == 0 and h % 64 == 0 and low <= w <= high and low <= h <= high, (canvas, (w, h))


def nearest_within_native_area(width: int, height: int, native: int) -> tuple[int, int]:
    """Every size of the range within the native area tried: the one nearest the exact size (log scale)."""
    low, high = side_range(native)
    exact_w = min(max(math.sqrt(native * width / height), low), high)
    exact_h = min(max(math.sqrt(native * height / width), low), high)
    sides = range(low, high + 1, 64)
    fits = [(w, h) for w in sides for h in sides if w * h <= native]
    return min(fits, key=lambda s: math.log(s[0] / exact_w) ** 2 + math.log(s[1] / exact_h) ** 2)


@pytest.mark.parametrize("native", [TINY_AREA, 768 * 768, SDXL_AREA])
def test_a_size_rounded_past_the_native_area_becomes_the_nearest_one_within_it(native: int) -> None:
    changed = 0
    for width, height in sweep()[-3001:]:  # the walk of aspect ratios
        if math.prod(unbounded_working_size(width, height, native)) > native:
            assert working_size(width, height, native) == nearest_within_native_area(width, height, native)
            changed += 1
    assert changed > 100


def test_the_documented_sizes() -> None:
    """README's examples: near-square and 3:2 canvases that used to be worked past the native area."""
    assert working_size(1424, 1024, SDXL_AREA) == (1216, 832)  # the seed example, 1216x896 before
    assert working_size(1500, 1000, SDXL_AREA) == (1216, 832)  # 3:2, 1280x832 before
    assert working_size(1000, 1500, SDXL_AREA) == (832, 1216)
    assert working_size(1064, 1000, SDXL_AREA) == (1024, 1024)  # 1088x1024 before
    assert working_size(1333, 1000, SDXL_AREA) == (1152, 896)  # 4:3, as before
    assert working_size(1920, 1080, SDXL_AREA) == (1344, 768)  # 16:9, as before
    assert working_size(320, 256, TINY_AREA) == (256, 256)  # 320x256 before


@pytest.mark.parametrize("native", [TINY_AREA, 768 * 768, SDXL_AREA])
@pytest.mark.parametrize(
    "canvas", [(5032, 1), (1, 5032), (18000, 3), (4000, 900), (900, 4000), (2049, 512), (40000, 1000), (1, 1)]
)
def test_every_working_size_is_in_range_and_at_most_the_native_area(native: int, canvas: tuple[int, int]) -> None:
    low, high = side_range(native)
    w, h = working_size(*canvas, native)
    assert w % 64 == 0 and h % 64 == 0
    assert low <= w <= high and low <= h <= high
    assert w * h <= native
    # Squeezed, but never the wrong way round: the longer canvas side stays the longer working side.
    assert (w >= h) == (canvas[0] >= canvas[1]) or w == h


def run(engine: OutpaintEngine, image: Image.Image, **padding: int) -> tuple[float, OutpaintResult]:
    started = time.perf_counter()
    result = engine.run(OutpaintRequest(image=image, prompt="a long shore", steps=20, seed=3, **padding))
    return time.perf_counter() - started, result


def test_thin_canvases_cost_no_more_than_a_square_one(engine: OutpaintEngine) -> None:
    cases = {
        "square": (noise_image(64, 64), {"left": 32}),
        "wide": (noise_image(5000, 1), {"left": 32}),
        "tall": (noise_image(1, 5000), {"top": 32}),
    }
    # The best of three, taken in turns: the machine's other load only ever adds time, and each case
    # meets the same load.
    best: dict[str, float] = {}
    results: dict[str, OutpaintResult] = {}
    for _ in range(3):
        for name, (image, padding) in cases.items():
            seconds, results[name] = run(engine, image, **padding)
            best[name] = min(best.get(name, seconds), seconds)
    low, high = side_range(TINY_AREA)
    for name in ("wide", "tall"):
        image, padding = cases[name]
        thin = results[name]
        # The measure was 18 s against 0.8 s; now a thin canvas works on half the square's area.
        assert best[name] <= 1.5 * best["square"], (thin.working_size, best)
        w, h = thin.working_size
        assert low <= w <= high and low <= h <= high and w * h <= TINY_AREA
        # Stretched back to the canvas, the original still bit for bit beyond the seam band.
        out = np.asarray(thin.images[0])
        assert out.shape == (image.height + padding.get("top", 0), image.width + padding.get("left", 0), 3)
        original = np.asarray(image)
        if "left" in padding:
            assert np.array_equal(out[:, 32 + SEAM_BAND :], original[:, SEAM_BAND:])
        else:
            assert np.array_equal(out[32 + SEAM_BAND :], original[SEAM_BAND:])
