"""The working sizes a compiled UNet is built for, and the snapping of a request's working size onto them.

`torch.compile` specialises the UNet's graph to the latents' height and width: every new working
size compiles anew (a minute or more on a GPU, several with max-autotune), and past dynamo's
recompile limit a size silently runs eagerly. So with compile on, the engine works at a bounded set
of sizes: `models.canvas.working_size` picks the size for the canvas as always, then `snap` replaces
it with the size of the set nearest to the canvas's aspect ratio, and the worker compiles every size of the set
before it reports ready. The rows of a batch and the prompt's length stay dynamic in the graph
(`OutpaintPipeline`), so one graph per size serves every request.

The default set is the model's native area at the aspect ratios of SDXL's own ~1-megapixel
training sizes (1024x1024, 1152x896, 1216x832, 1344x768, 1536x640), both orientations: for SDXL
1024x1024, 1152x896, 1216x832, 1344x768, 1600x640 and the portrait five, 9 sizes in all. A canvas
between two of them is resized to the nearer one (its aspect ratio changes by at most ~12% within
1:2.4; beyond 2.4:1 the canvas is squeezed into 1600x640); the original is pasted back at its own
size as always.
"""

from __future__ import annotations

import math
import re

from models.canvas import working_size
from models.errors import InvalidSpeedOption

Size = tuple[int, int]  # (width, height) in pixels

# The aspect ratios (width / height) of SDXL's ~1-megapixel training sizes, landscape.
ASPECTS = (1024 / 1024, 1152 / 896, 1216 / 832, 1344 / 768, 1536 / 640)
MULTIPLE = 64  # a working size's sides are multiples of this (VAE x UNet downsampling)
_SIZES = re.compile(r"\d+x\d+(,\d+x\d+)*")
EXPECTED = "WxH,WxH,... with sides that are positive multiples of 64"


def default_sizes(native_area: int) -> tuple[Size, ...]:
    """The model's native area at each aspect ratio of ASPECTS and its transpose, portrait first."""
    sizes = set()
    for aspect in ASPECTS:
        for a in (aspect, 1 / aspect):
            # working_size's own rounding, so a canvas of exactly this aspect needs no snapping.
            sizes.add(working_size(round(a * 4096), 4096, native_area))
    return tuple(sorted(sizes, key=lambda s: s[0] / s[1]))


def parse_sizes(text: str) -> tuple[Size, ...] | None:
    """`WxH,WxH,...` (sides multiples of 64) as sizes; empty text: None (the default set)."""
    text = text.replace(" ", "")
    if not text:
        return None
    if not _SIZES.fullmatch(text):
        raise InvalidSpeedOption("compile_sizes", text, EXPECTED)
    sizes = []
    for item in text.split(","):
        width, height = (int(v) for v in item.split("x"))
        if width <= 0 or height <= 0 or width % MULTIPLE or height % MULTIPLE:
            raise InvalidSpeedOption("compile_sizes", text, EXPECTED)
        if (width, height) not in sizes:
            sizes.append((width, height))
    return tuple(sizes)


def snap(size: Size, sizes: tuple[Size, ...]) -> Size:
    """The size of `sizes` whose aspect ratio is nearest to `size`'s (on a log scale, so 2:1 is as far
    from 1:1 as 1:2); ties: the earlier. `size` may be the canvas itself: only its shape counts."""
    width, height = size
    aspect = math.log(width / height)
    return min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - aspect))
