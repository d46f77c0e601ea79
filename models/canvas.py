"""Geometry of outpainting: the padded canvas, its mask, the pre-fill, the working size, the paste-back.

All of it is plain array work on the CPU; the diffusion model only ever sees the working-size canvas.
Transparent pixels of the input are generated like the padding: a fully transparent pixel is new
area (with a seam band around it), a partly transparent one is blended by its alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from models.params import DEFAULT_SEAM_WIDTH

# How far (canvas pixels) the generated area reaches into the original, so the model redraws the
# border it must blend with; the paste-back feathers over the same band. The contract of the
# engine is: opaque pixels farther than the band from a padded side and from any fully transparent
# pixel are the original, bit for bit. A request sets the band's width (seam_width); this is its default.
SEAM_BAND = DEFAULT_SEAM_WIDTH
# color_match: the colour statistics are taken this many pixels deep on either side of the new area's edge.
COLOR_BAND = 32
# color_match: the most a channel's spread is scaled by (or divided by): a flat band beside the seam must
# not blow the generated texture up, nor a noisy one flatten it.
COLOR_GAIN = 2.0
# Modes that carry an alpha channel (palette and colour-key transparency is in `Image.info`).
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@dataclass(frozen=True)
class Padding:
    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0

    @property
    def any(self) -> bool:
        return bool(self.left or self.right or self.top or self.bottom)

    def canvas_size(self, width: int, height: int) -> tuple[int, int]:
        return width + self.left + self.right, height + self.top + self.bottom


def generation_mask(width: int, height: int, pad: Padding, overlap: int = SEAM_BAND) -> np.ndarray:
    """1.0 where the model generates: the new area plus `overlap` pixels into each padded side."""
    cw, ch = pad.canvas_size(width, height)
    mask = np.ones((ch, cw), dtype=np.float32)
    x0 = pad.left + (overlap if pad.left else 0)
    x1 = pad.left + width - (overlap if pad.right else 0)
    y0 = pad.top + (overlap if pad.top else 0)
    y1 = pad.top + height - (overlap if pad.bottom else 0)
    if x1 > x0 and y1 > y0:
        mask[y0:y1, x0:x1] = 0.0
    return mask


def prefill(pixels: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill unknown pixels with a smooth extension of the known ones (multi-scale normalised blur).

    Each pyramid level averages only known pixels; unknown pixels take the upsampled coarser level,
    so colours reach far into the new area without hard edges, and known pixels stay untouched.
    `known` may be fractional (a partly transparent pixel): such a pixel counts for that much in the
    averages and is its own colour over the fill in that proportion.
    """
    img = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
    weight = torch.from_numpy(known.astype(np.float32))[None, None]
    levels = [(img * weight, weight)]
    while min(levels[-1][1].shape[-2:]) > 1:
        s, w = levels[-1]
        # Overlapping 4x4 windows let known colours leak across cell borders at every level;
        # plain 2x2 cells would leave a pixel next to the original waiting for a coarse level.
        levels.append((F.avg_pool2d(s, 4, 2, 1, ceil_mode=True), F.avg_pool2d(w, 4, 2, 1, ceil_mode=True)))
    filled = None
    for s, w in reversed(levels):
        mean = s / w.clamp_min(1e-6)
        if filled is None:
            filled = mean
            continue
        up = F.interpolate(filled, size=s.shape[-2:], mode="bilinear", align_corners=False)
        trust = (w * 4).clamp(0, 1)  # a cell that is a quarter known already speaks for itself
        filled = trust * mean + (1 - trust) * up
    out = filled[0].permute(1, 2, 0).numpy()
    weight = known[..., None]
    # For 0/1 weights this is exactly the known pixels or the fill.
    return np.where(weight >= 1.0, pixels, weight * pixels + (1 - weight) * out)


def split_alpha(image: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """The picture in RGB and its alpha ((height, width) uint8); None when no pixel is transparent, so an
    opaque picture takes exactly the path of one without an alpha channel."""
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        if alpha.min() < 255:
            return rgba.convert("RGB"), alpha
    return image.convert("RGB"), None


def build_canvas(
    image: Image.Image,
    pad: Padding,
    alpha: np.ndarray | None = None,
    weight: np.ndarray | None = None,
    band: int = SEAM_BAND,
) -> tuple[Image.Image, np.ndarray]:
    """The padded canvas with its new area pre-filled, and the generation mask (canvas size), which
    reaches `band` pixels into the original.

    With `alpha`, transparent pixels are new area too: they count for their opacity in the pre-fill,
    and the mask takes in every pixel the paste-back does not keep whole (`original_weight` < 1);
    `weight` is that weight when the caller has it already.
    """
    width, height = image.size
    cw, ch = pad.canvas_size(width, height)
    pixels = np.zeros((ch, cw, 3), dtype=np.float32)
    known = np.zeros((ch, cw), dtype=np.float32)
    region = (slice(pad.top, pad.top + height), slice(pad.left, pad.left + width))
    pixels[region] = np.asarray(image, dtype=np.float32)
    known[region] = 1.0 if alpha is None else alpha.astype(np.float32) / 255
    filled = prefill(pixels, known)
    canvas = Image.fromarray(np.clip(filled + 0.5, 0, 255).astype(np.uint8))
    if alpha is None:
        return canvas, generation_mask(width, height, pad, band)
    mask = np.ones((ch, cw), dtype=np.float32)
    if weight is None:
        weight = original_weight(width, height, pad, alpha, band)
    mask[region] = (weight < 1.0).astype(np.float32)
    return canvas, mask


def side_range(native_area: int, multiple: int = 64) -> tuple[int, int]:
    """The shortest and longest working side: a quarter and twice the native side (256..2048 for SDXL)."""
    side = math.sqrt(native_area)
    low = max(multiple, round(side / 4 / multiple) * multiple)
    high = max(low, round(side * 2 / multiple) * multiple)
    return low, high


def working_size(width: int, height: int, native_area: int, multiple: int = 64) -> tuple[int, int]:
    """The model's native pixel area at the canvas's aspect ratio, sides rounded to `multiple` and
    kept within `side_range`, the area never past the native one.

    Up to 4:1 either way nothing is clamped (at 4:1 the native area is twice the native side by half
    of it). A thinner canvas is squeezed into the range, its long side at the maximum and its short
    side as the aspect ratio asks but at least the minimum: it is worked on at most the native area,
    never the tens of native areas that keeping the area at its aspect ratio would take, and the
    paste-back stretches the result back to the canvas.

    Each side is rounded to its nearest multiple. Where that puts the area past the native one (up to
    6.25% past it for SDXL, 25% for a 256x256 model), the size is instead the one nearest to the exact
    size (the native area at the canvas's aspect ratio) among those of the range within the native
    area. Nearest on a log scale, the squares of both sides' errors added: that sum is half the squares
    of the area's error and the aspect ratio's, so a shortfall of area and a change of shape count
    alike. In practice that is one side a step (rarely two) below its nearest rounding, and for SDXL up
    to 4:1 at least 93.75% of the native area (rounding both sides down can leave 87.5%, and the nearest
    aspect ratio among the sizes a step down 90.6%). A size within the native area is kept as it was,
    so those requests keep their bytes.
    """
    low, high = side_range(native_area, multiple)
    aspect = width / height
    exact_w, exact_h = math.sqrt(native_area * aspect), math.sqrt(native_area / aspect)
    w = min(max(round(exact_w / multiple) * multiple, low), high)
    h = min(max(round(exact_h / multiple) * multiple, low), high)
    if w * h <= native_area:
        return w, h
    # Past the range the exact side is the range's end (a squeezed canvas).
    exact_w, exact_h = min(max(exact_w, low), high), min(max(exact_h, low), high)
    below = max(low, math.floor(exact_h / multiple) * multiple)
    candidates = []
    for a in range(low, high + 1, multiple):
        # At a given width the error only grows as the height moves away from the exact one, so the best
        # height is the multiple just below or just above it, or the tallest within the native area.
        tallest = min(high, native_area // a // multiple * multiple)
        candidates += [(a, b) for b in (min(below, tallest), min(below + multiple, tallest)) if b >= low]
    return min(candidates, key=lambda s: math.log(s[0] / exact_w) ** 2 + math.log(s[1] / exact_h) ** 2)


def seam_alpha(width: int, height: int, pad: Padding, band: int = SEAM_BAND) -> np.ndarray:
    """Weight of the original for each of its pixels: 0 at a padded side, 1 from `band` pixels in
    (a band of 0: 1 everywhere, the original pasted back whole)."""
    if band == 0:
        return np.ones((height, width), dtype=np.float32)

    def distance(n: int, before: int, after: int) -> np.ndarray:
        # Distance of each pixel centre to the nearer padded edge along one axis.
        centres = np.arange(n, dtype=np.float32) + 0.5
        d = np.full(n, np.inf, dtype=np.float32)
        if before:
            d = np.minimum(d, centres)
        if after:
            d = np.minimum(d, n - centres)
        return d

    dist = np.minimum(distance(width, pad.left, pad.right)[None, :], distance(height, pad.top, pad.bottom)[:, None])
    return np.clip(dist / band, 0.0, 1.0)


def original_weight(
    width: int, height: int, pad: Padding, alpha: np.ndarray | None = None, band: int = SEAM_BAND
) -> np.ndarray:
    """Weight of the original for each of its pixels at the paste-back: the seam feather, measured from
    the padded sides and from fully transparent pixels alike, times the pixel's opacity."""
    weight = seam_alpha(width, height, pad, band)
    if alpha is None:
        return weight
    clear = alpha == 0
    if clear.any() and band > 0:
        # Distance of each pixel's centre to the nearest fully transparent pixel's edge (half a pixel
        # short of centre to centre), as seam_alpha measures it to a padded side.
        reach = ndimage.distance_transform_edt(~clear).astype(np.float32) - 0.5
        weight = np.minimum(weight, np.clip(reach / band, 0.0, 1.0))
    return weight * (alpha.astype(np.float32) / 255)


def paste_back(
    generated: Image.Image,
    original: Image.Image,
    pad: Padding,
    band: int = SEAM_BAND,
    weight: np.ndarray | None = None,
) -> Image.Image:
    """Put the original pixels back over a canvas-sized result, feathered across the seam band.

    `weight` is the original's weight per pixel when it has transparent ones (`original_weight`);
    None: the seam feather alone. Pixels of weight 1 are copied, bit for bit.
    """
    out = np.array(generated.convert("RGB"))
    width, height = original.size
    region = out[pad.top : pad.top + height, pad.left : pad.left + width].astype(np.float32)
    orig = np.asarray(original.convert("RGB"))
    if weight is None:
        weight = seam_alpha(width, height, pad, band)
    weight = weight[..., None]
    blended = np.clip(weight * orig + (1 - weight) * region + 0.5, 0, 255).astype(np.uint8)
    out[pad.top : pad.top + height, pad.left : pad.left + width] = np.where(weight >= 1.0, orig, blended)
    return Image.fromarray(out)


def match_colors(
    generated: np.ndarray, original: Image.Image, pad: Padding, alpha: np.ndarray | None = None
) -> np.ndarray:
    """The generated canvas ((h, w, 3) uint8) with each channel's mean and spread moved to the original's
    next to the seam: the answer to a colour cast of the new area.

    The reference is the original's own pixels (opaque ones only: never the colour stored under a
    transparent pixel) within COLOR_BAND pixels of the new area; the measured part is the generated
    new area (padding and fully transparent pixels) within COLOR_BAND pixels of them. Each channel is
    mapped by the affine map that gives the measured part the reference's mean and standard deviation
    (the spread's factor kept within 1/COLOR_GAIN..COLOR_GAIN), over the whole generated canvas, so the
    paste-back's feather blends two pictures of one colour.
    """
    width, height = original.size
    ch, cw = generated.shape[:2]
    # Only pixels within COLOR_BAND of the original's rectangle can be in either band: a crop around it.
    y0, y1 = max(0, pad.top - COLOR_BAND - 1), min(ch, pad.top + height + COLOR_BAND + 1)
    x0, x1 = max(0, pad.left - COLOR_BAND - 1), min(cw, pad.left + width + COLOR_BAND + 1)
    inside = (slice(pad.top - y0, pad.top - y0 + height), slice(pad.left - x0, pad.left - x0 + width))
    reference, measured = _color_bands((y1 - y0, x1 - x0), inside, pad, alpha)
    if not reference.any() or not measured.any():
        return generated
    on_canvas = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    on_canvas[inside] = np.asarray(original.convert("RGB"))
    target = on_canvas[reference].astype(np.float64)
    source = generated[y0:y1, x0:x1][measured].astype(np.float64)
    gain = np.clip(target.std(axis=0) / np.maximum(source.std(axis=0), 1.0), 1 / COLOR_GAIN, COLOR_GAIN)
    # The map of each channel as a table of its 256 values: the same numbers, a lookup per pixel.
    levels = np.arange(256, dtype=np.float64)[:, None]
    table = np.clip((levels - source.mean(axis=0)) * gain + target.mean(axis=0) + 0.5, 0, 255).astype(np.uint8)
    return np.stack([table[generated[..., c], c] for c in range(3)], axis=-1)


def _color_bands(
    shape: tuple[int, int], inside: tuple[slice, slice], pad: Padding, alpha: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """In a crop around the original (`inside` its place): its opaque pixels within COLOR_BAND of a new
    pixel, and the new pixels within COLOR_BAND of an opaque one (distances between pixel centres)."""
    if alpha is not None:
        known = np.zeros(shape, dtype=bool)
        known[inside] = alpha == 255
        new = np.ones(shape, dtype=bool)
        new[inside] = alpha == 0
        reference = known & (ndimage.distance_transform_edt(~new) <= COLOR_BAND)
        measured = new & (ndimage.distance_transform_edt(~known) <= COLOR_BAND)
        return reference, measured
    # Padding alone: the new area is what lies beyond the padded sides, so both distances are geometry.
    (top, bottom), (left, right) = (inside[0].start, inside[0].stop), (inside[1].start, inside[1].stop)
    ys = np.arange(shape[0], dtype=np.float64)[:, None]
    xs = np.arange(shape[1], dtype=np.float64)[None, :]
    dy = np.maximum(np.maximum(top - ys, ys - (bottom - 1)), 0)
    dx = np.maximum(np.maximum(left - xs, xs - (right - 1)), 0)
    outside = (dy > 0) | (dx > 0)
    measured = outside & (np.hypot(dy, dx) <= COLOR_BAND)
    # From inside, the nearest new pixel is across the nearest padded side.
    to_new = np.full(shape, np.inf)
    for padded, distance in (
        (pad.top, ys - (top - 1)),
        (pad.bottom, bottom - ys),
        (pad.left, xs - (left - 1)),
        (pad.right, right - xs),
    ):
        if padded:
            to_new = np.minimum(to_new, distance)
    reference = ~outside & (to_new <= COLOR_BAND)
    return reference, measured
