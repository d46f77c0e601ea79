"""Draws docs/seam-widths.png: one request at seam_width 8, 32 and 64 (docs/extensions.md, Seams).

    python docs/make_seam_widths.py

random:tiny on the CPU (random weights: the new area is noise, which makes the blend easy to see),
a test gradient padded left and right. Each panel marks the original's edges (solid) and the inner
edge of the seam band (dashed): left of the dashed line the output is the original, bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.engine import OutpaintEngine, OutpaintRequest  # noqa: E402
from models.pipeline import OutpaintPipeline  # noqa: E402
from models.random_models import build_random  # noqa: E402
from tests.helpers import smooth_image  # noqa: E402

WIDTHS = (8, 32, 64)
SIDE = 64  # pixels added left and right
LABEL = 16  # height of each panel's caption


def dashed(draw: ImageDraw.ImageDraw, x: int, top: int, bottom: int) -> None:
    for y in range(top, bottom, 6):
        draw.line([(x, y), (x, min(y + 3, bottom))], fill=(255, 255, 255), width=1)


def main() -> None:
    torch.manual_seed(0)
    engine = OutpaintEngine(
        OutpaintPipeline(build_random("random:tiny"), torch.device("cpu"), torch.float32), "random:tiny"
    )
    image = smooth_image(160, 96)
    panels = []
    for width in WIDTHS:
        request = OutpaintRequest(
            image=image, prompt="a quiet beach", steps=20, seed=7, styles=(), left=SIDE, right=SIDE, seam_width=width
        )
        out = engine.run(request).images[0]
        panel = Image.new("RGB", (out.width, out.height + LABEL), (255, 255, 255))
        panel.paste(out, (0, LABEL))
        draw = ImageDraw.Draw(panel)
        draw.text((4, 2), f"seam_width {width}", fill=(0, 0, 0))
        top, bottom = LABEL, LABEL + out.height - 1
        for x in (SIDE, SIDE + image.width - 1):
            draw.line([(x, top), (x, bottom)], fill=(0, 0, 0), width=1)
        for x in (SIDE + width, SIDE + image.width - 1 - width):
            dashed(draw, x, top, bottom)
        panels.append(panel)
    figure = Image.new("RGB", (panels[0].width, sum(p.height for p in panels)), (255, 255, 255))
    y = 0
    for panel in panels:
        figure.paste(panel, (0, y))
        y += panel.height
    path = ROOT / "docs" / "seam-widths.png"
    figure.save(path, optimize=True)
    print(path, path.stat().st_size, "bytes", np.asarray(figure).shape)


if __name__ == "__main__":
    main()
