"""Seam controls (docs/extensions.md): `seam_width` sets how far the model redraws into the original and the
paste-back feathers, `color_match` moves the generated area's colour to the original's next to the seam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.canvas import COLOR_BAND, SEAM_BAND, Padding, build_canvas, original_weight
from models.engine import OutpaintEngine, OutpaintRequest
from models.pipeline import OutpaintPipeline
from models.random_models import build_random
from tests.helpers import noise_image

WIDTH, HEIGHT = 96, 64


@pytest.fixture(scope="module")
def engine() -> OutpaintEngine:
    return OutpaintEngine(
        OutpaintPipeline(build_random("random:tiny"), torch.device("cpu"), torch.float32), "random:tiny"
    )


def outpaint(engine: OutpaintEngine, image: Image.Image, **fields: object) -> np.ndarray:
    fields = {"prompt": "a harbour at dusk", "steps": 20, "seed": 5, "styles": (), **fields}
    request = OutpaintRequest(image=image, **fields)  # type: ignore[arg-type]
    return np.asarray(engine.run(request).images[0])


@pytest.mark.parametrize("width", [0, 8, 32])
def test_the_mask_reaches_seam_width_pixels_into_the_original(width: int) -> None:
    _, mask = build_canvas(noise_image(WIDTH, HEIGHT), Padding(left=24, bottom=16), band=width)
    row = mask[10]  # a row of the original: padding, then `width` redrawn columns, then kept ones
    assert (row[: 24 + width] == 1).all() and (row[24 + width :] == 0).all()
    column = mask[:, 60]
    assert (column[HEIGHT - width :] == 1).all() and (column[: HEIGHT - width] == 0).all()


def test_the_engine_redraws_more_of_the_original_as_seam_width_grows(engine: OutpaintEngine) -> None:
    image = noise_image(WIDTH, HEIGHT)
    areas = []
    for width in (0, 8, 32, 64):
        job = engine.prepare(OutpaintRequest(image=image, prompt="x", seed=1, left=48, seam_width=width))
        areas.append(float(job.inputs.latent_mask.sum()))
    assert areas == sorted(set(areas)), areas


@pytest.mark.parametrize("width", [0, 8, 32])
def test_the_bit_exact_region_shrinks_and_grows_with_seam_width(engine: OutpaintEngine, width: int) -> None:
    image = noise_image(WIDTH, HEIGHT, seed=4)
    original = np.asarray(image)
    out = outpaint(engine, image, left=24, top=16, seam_width=width)
    region = out[16:, 24:]
    # Beyond `width` pixels from the padded sides (left, top): the original, bit for bit.
    assert np.array_equal(region[width:, width:], original[width:, width:])
    if width:
        # Inside the band, blended: the column next to the band's inner edge is no copy of the original.
        assert not np.array_equal(region[width:, width - 1], original[width:, width - 1])
        assert not np.array_equal(region[width - 1, width:], original[width - 1, width:])
    else:
        assert np.array_equal(region, original)  # no band: the original is pasted back whole


def test_a_transparent_hole_gets_a_band_of_seam_width_too() -> None:
    alpha = np.full((HEIGHT, WIDTH), 255, np.uint8)
    alpha[20:40, 30:50] = 0
    for width in (4, 24):
        weight = original_weight(WIDTH, HEIGHT, Padding(), alpha, band=width)
        assert weight[30, 30 - width - 1] == 1 and 0 < weight[30, 29] < 1  # left of the hole
        assert weight[30, 50 + width] == 1 and 0 < weight[30, 50] < 1  # right of it
    assert (original_weight(WIDTH, HEIGHT, Padding(), alpha, band=0) == alpha / 255).all()


def test_the_default_seam_is_todays(engine: OutpaintEngine) -> None:
    image = noise_image(WIDTH, HEIGHT, seed=6)
    default = outpaint(engine, image, right=40)
    assert np.array_equal(default, outpaint(engine, image, right=40, seam_width=SEAM_BAND, color_match=False))
    assert not np.array_equal(default, outpaint(engine, image, right=40, seam_width=SEAM_BAND + 8))


def cast_picture(seed: int = 0) -> np.ndarray:
    """A picture with a strong blue cast, textured so that its spread is not zero."""
    rng = np.random.default_rng(seed)
    return np.clip(np.array([70, 110, 190]) + rng.normal(0, 12, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", [1, 2])
def test_color_match_brings_the_generated_band_to_the_originals_colour(engine: OutpaintEngine, seed: int) -> None:
    pixels = cast_picture()
    image = Image.fromarray(pixels)
    # The mean colour of the 16 generated columns next to the seam against the original's 16 beside them.
    original_band = pixels[:, WIDTH - 16 :].reshape(-1, 3).astype(np.float64).mean(axis=0)

    def band_error(color_match: bool) -> float:
        out = outpaint(engine, image, right=64, seed=seed, color_match=color_match)
        generated_band = out[:, WIDTH : WIDTH + 16].reshape(-1, 3).astype(np.float64).mean(axis=0)
        return float(np.abs(generated_band - original_band).max())

    matched, unmatched = band_error(True), band_error(False)
    assert matched <= 6, matched
    assert unmatched > 20 and unmatched > 4 * matched, (matched, unmatched)


def test_color_match_uses_only_known_pixels() -> None:
    from models.canvas import match_colors

    pixels = cast_picture()
    alpha = np.full((HEIGHT, WIDTH), 255, np.uint8)
    alpha[:, 60:] = 0  # the right part is transparent: generated, its stored colour never a reference
    stored = pixels.copy()
    stored[:, 60:] = (255, 0, 0)  # a red that must not count
    generated = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    generated += np.random.default_rng(1).integers(0, 20, generated.shape, dtype=np.uint8)
    out = match_colors(generated, Image.fromarray(stored), Padding(), alpha)
    reference = pixels[:, 60 - COLOR_BAND : 60].reshape(-1, 3).mean(axis=0)
    band = out[:, 60 : 60 + COLOR_BAND].reshape(-1, 3).mean(axis=0)
    assert np.abs(band - reference).max() < 2


@pytest.mark.parametrize("pad", [Padding(left=40), Padding(top=3, right=70), Padding(5, 6, 7, 8), Padding(bottom=100)])
def test_color_match_measures_padding_as_it_measures_transparency(pad: Padding) -> None:
    from models.canvas import match_colors

    # The padding's bands come from geometry, a transparent area's from distance transforms: the same
    # bands for an opaque picture.
    rng = np.random.default_rng(3)
    original = Image.fromarray(cast_picture())
    generated = rng.integers(0, 256, (HEIGHT + pad.top + pad.bottom, WIDTH + pad.left + pad.right, 3), np.uint8)
    opaque = np.full((HEIGHT, WIDTH), 255, np.uint8)
    matched = match_colors(generated, original, pad)
    assert np.array_equal(matched, match_colors(generated, original, pad, opaque))
    assert not np.array_equal(matched, generated)
