"""Transparent input pixels are generated: the mask and the pre-fill take them in like padding (with a
seam band around them), the paste-back weights the original by its alpha, and opaque pixels stay bit for bit."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from models.canvas import SEAM_BAND, Padding, build_canvas, original_weight, paste_back
from models.engine import OutpaintEngine, OutpaintRequest
from models.pipeline import OutpaintPipeline
from models.random_models import build_random
from server.guard.images import ImageLimits, decode_image
from tests.helpers import ServerProcess, encode, noise_image, request_body

WIDTH, HEIGHT = 96, 80
HOLE = (slice(28, 52), slice(36, 60))  # rows, columns: fully transparent, touching no side
STRIP = (slice(0, HEIGHT), slice(0, 8))  # half transparent, more than the band away from the hole
UNDER = (255, 0, 255)  # what a fully transparent pixel holds: a colour nobody should see


def far_from_hole(left_padded: bool = False) -> np.ndarray:
    """Opaque pixels farther than the seam band from the hole (and outside the strip, and the band of a
    padded left side)."""
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    dy = np.maximum(np.maximum(HOLE[0].start - rows, rows - (HOLE[0].stop - 1)), 0)
    dx = np.maximum(np.maximum(HOLE[1].start - cols, cols - (HOLE[1].stop - 1)), 0)
    far = np.hypot(dx, dy) > SEAM_BAND + 1
    far[STRIP] = False
    if left_padded:
        far[:, :SEAM_BAND] = False
    return far


def sticker(seed: int = 0) -> Image.Image:
    rgba = np.dstack([np.asarray(noise_image(WIDTH, HEIGHT, seed)), np.full((HEIGHT, WIDTH), 255, np.uint8)])
    rgba[HOLE] = (*UNDER, 0)
    rgba[(*STRIP, 3)] = 128
    return Image.fromarray(rgba, "RGBA")


@pytest.fixture(scope="module")
def engine() -> OutpaintEngine:
    return OutpaintEngine(
        OutpaintPipeline(build_random("random:tiny"), torch.device("cpu"), torch.float32), "random:tiny"
    )


def run(engine: OutpaintEngine, image: Image.Image, **fields: object) -> list[np.ndarray]:
    request = OutpaintRequest(image=image, prompt="a product on a table", steps=20, **{"seed": 5, **fields})
    return [np.asarray(picture) for picture in engine.run(request).images]


# Decoding keeps the alpha for the engine


def test_decoding_keeps_transparency_and_opaque_pictures_stay_rgb() -> None:
    limits = ImageLimits()
    kept = decode_image(encode(sticker()), limits)
    assert kept.mode == "RGBA" and np.array_equal(np.asarray(kept), np.asarray(sticker()))
    la = Image.new("LA", (2, 1), (255, 255))
    la.putpixel((0, 0), (0, 0))
    assert decode_image(encode(la), limits).getchannel("A").tobytes() == bytes([0, 255])
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 250, 250, 250] + [0] * 762)
    palette.putdata([0, 1])
    assert decode_image(encode(palette, transparency=0), limits).getpixel((0, 0))[3] == 0
    # No transparent pixel: the RGB picture, whatever the mode said.
    rgb = noise_image(16, 16)
    for opaque in (rgb, rgb.convert("RGBA")):
        decoded = decode_image(encode(opaque), limits)
        assert decoded.mode == "RGB" and decoded.tobytes() == rgb.tobytes()


# The geometry


def test_the_mask_covers_transparent_pixels_and_a_band_around_them() -> None:
    image = sticker()
    canvas, mask = build_canvas(image.convert("RGB"), Padding(), np.asarray(image.getchannel("A")))
    assert mask.shape == (HEIGHT, WIDTH)
    assert (mask[HOLE] == 1).all() and (mask[STRIP] == 1).all()
    assert (mask[HOLE[0], HOLE[1].start - SEAM_BAND : HOLE[1].start] == 1).all()  # the band beside the hole
    assert (mask[far_from_hole()] == 0).all()
    # The hole is pre-filled from its neighbours, never with the colour under the transparency.
    filled = np.asarray(canvas, dtype=np.float32)[HOLE]
    assert np.abs(filled - np.asarray(UNDER, np.float32)).mean(axis=-1).min() > 60


def test_the_paste_back_weights_the_original_by_its_alpha() -> None:
    image = sticker()
    alpha = np.asarray(image.getchannel("A"))
    original = image.convert("RGB")
    pixels = np.asarray(original, dtype=np.float32)
    colour = np.asarray((20, 200, 90), np.float32)
    generated = Image.new("RGB", (WIDTH, HEIGHT), (20, 200, 90))
    out = np.asarray(
        paste_back(generated, original, Padding(), weight=original_weight(WIDTH, HEIGHT, Padding(), alpha)),
        dtype=np.float32,
    )
    assert (out[HOLE] == colour).all()  # fully transparent: the generated pixels
    far = far_from_hole()
    assert np.array_equal(out[far], pixels[far])  # opaque beyond the band: the original, bit for bit
    # Half transparent, beyond the band of any transparent pixel: the original at its alpha over the generated.
    a = 128 / 255
    assert np.abs(out[STRIP] - (a * pixels[STRIP] + (1 - a) * colour)).max() <= 0.5 + 1e-3
    # Beside the hole, opaque pixels fade from generated to original across the band, as beside a padded side:
    # weight (distance of the pixel's centre to the hole's edge) / band.
    columns = np.arange(HOLE[1].start - SEAM_BAND - 2, HOLE[1].start)
    weight = np.clip((HOLE[1].start - columns - 0.5) / SEAM_BAND, 0, 1)[:, None]
    expected = weight * pixels[40, columns] + (1 - weight) * colour
    assert np.abs(out[40, columns] - expected).max() <= 0.5 + 1e-3
    assert not np.array_equal(out[40, columns[-SEAM_BAND:]], pixels[40, columns[-SEAM_BAND:]])
    # With a padded side too, the strip's weight is the side's feather times its alpha.
    wide = Image.new("RGB", (WIDTH + 10, HEIGHT), (20, 200, 90))
    padded = np.asarray(
        paste_back(wide, original, Padding(left=10), weight=original_weight(WIDTH, HEIGHT, Padding(left=10), alpha)),
        dtype=np.float32,
    )[:, 10:18]
    feather = ((np.arange(8) + 0.5) / SEAM_BAND)[None, :, None]
    expected = feather * a * pixels[STRIP] + (1 - feather * a) * colour
    assert np.abs(padded - expected).max() <= 0.5 + 1e-3


# The engine on random:tiny


def test_transparent_pixels_are_generated_and_opaque_ones_kept(engine: OutpaintEngine) -> None:
    image = sticker()
    first, second = run(engine, image, seed=5)[0], run(engine, image, seed=6)[0]
    original = np.asarray(image.convert("RGB"))
    far = far_from_hole()
    for out in (first, second):
        assert out.shape == (HEIGHT, WIDTH, 3)
        assert np.array_equal(out[far], original[far])
        hole = out[HOLE].astype(np.float32)
        assert np.abs(hole - np.asarray(UNDER, np.float32)).mean() > 40  # not what was under the alpha
    # Generated: another seed, other pixels in the hole and the half-transparent strip.
    assert np.abs(first[HOLE].astype(int) - second[HOLE].astype(int)).mean() > 5
    assert not np.array_equal(first[STRIP], second[STRIP])


def test_an_opaque_alpha_channel_changes_nothing(engine: OutpaintEngine) -> None:
    rgb = noise_image(WIDTH, HEIGHT, seed=2)
    for padding in ({"left": 40}, {}):
        plain = run(engine, rgb, **padding)
        opaque = run(engine, rgb.convert("RGBA"), **padding)
        assert all(np.array_equal(a, b) for a, b in zip(plain, opaque, strict=True))
    assert np.array_equal(run(engine, rgb)[0], np.asarray(rgb))  # nothing to outpaint: the input


# Through the API


def test_a_transparent_png_comes_back_filled(server: ServerProcess) -> None:
    body = request_body(sticker(), samples=2, seed=8, output_format="png", base64=True)
    response = httpx.post(server.url + "/v1/seg-beyond", json=body, timeout=120)
    assert response.status_code == 200, response.text
    outs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(x)))) for x in response.json()["images"]]
    original = np.asarray(sticker().convert("RGB"))
    far = far_from_hole(left_padded=True)
    holes = []
    for out in outs:
        assert out.shape == (HEIGHT, WIDTH + 32, 3)  # request_body pads 32 on the left
        region = out[:, 32:]
        assert np.array_equal(region[far], original[far])
        holes.append(region[HOLE].astype(int))
        assert np.abs(holes[-1] - 128).mean() > 5  # not flattened onto grey
    assert np.abs(holes[0] - holes[1]).mean() > 5  # each sample drew its own
