"""What the pipelined worker's side work costs: output encoding, and live previews next to the denoising.

    python -m benchmarks.pipeline           # about a minute on random:tiny, CPU

1. JPEG encoding of a 1424x1024 output (the size of a 1024x1024 input padded 300/100): PIL, and
   simplejpeg when it is importable; PNG for comparison. Median of 10.
2. One preview of SDXL-size latents (4x128x178, a 1424x1024 working size): the linear map plus
   the 256 px JPEG. Median of 20.
3. Steps per second of the engine's denoising loop on random:tiny with no previews, with the
   worker's previews (at most one per 500 ms, encoded on another thread) and with one preview
   every step, alternated in one run (three rounds each, median).
"""

from __future__ import annotations

import argparse
import io
import queue
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from benchmarks.common import machine_line, table


def median_ms(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def output_like(width: int = 1424, height: int = 1024) -> np.ndarray:
    """A photo-like test picture: smooth gradients plus a little grain (pure noise would flatter nobody)."""
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    rgb = np.stack([np.sin(6 * x + 3 * y), np.cos(4 * x * y + 2 * y), x * y], axis=-1) * 0.45 + 0.5
    grain = np.random.default_rng(0).normal(0, 0.03, rgb.shape)
    return ((rgb + grain).clip(0, 1) * 255).astype(np.uint8)


def encoders(repeats: int = 10) -> list[list[object]]:
    pixels = output_like()
    picture = Image.fromarray(pixels)

    def pil(fmt: str, **options: object) -> Callable[[], bytes]:
        def save() -> bytes:
            buffer = io.BytesIO()
            picture.save(buffer, format=fmt, **options)
            return buffer.getvalue()

        return save

    rows = [
        ["PIL JPEG q95", median_ms(pil("JPEG", quality=95), repeats), len(pil("JPEG", quality=95)())],
        ["PIL JPEG q80", median_ms(pil("JPEG", quality=80), repeats), len(pil("JPEG", quality=80)())],
        ["PIL PNG", median_ms(pil("PNG"), repeats), len(pil("PNG")())],
    ]
    try:
        import simplejpeg
    except ImportError:
        rows.append(["simplejpeg", "not installed", "-"])
    else:
        for quality in (95, 80):
            encode = lambda q=quality: simplejpeg.encode_jpeg(  # noqa: E731
                pixels,
                quality=q,
                colorspace="RGB",
                colorsubsampling="420",  # as PIL does by default
            )
            rows.append([f"simplejpeg q{quality}", median_ms(encode, repeats), len(encode())])
    return rows


def one_preview(repeats: int = 20) -> float:
    from models.preview import latent_rgb
    from server.jobs.engine_process import preview_jpeg

    latents = torch.randn(4, 128, 178)
    return median_ms(lambda: preview_jpeg(latent_rgb(latents)), repeats)


def loop_rates(steps: int, rounds: int) -> list[list[object]]:
    from models.engine import OutpaintEngine, OutpaintRequest
    from models.pipeline import OutpaintPipeline
    from models.preview import latent_rgb
    from models.random_models import build_random
    from server.jobs.engine_process import PREVIEW_INTERVAL, preview_jpeg
    from tests.helpers import smooth_image

    engine = OutpaintEngine(OutpaintPipeline(build_random("random:tiny"), torch.device("cpu"), torch.float32), "tiny")
    request = OutpaintRequest(image=smooth_image(512, 512), prompt="a quiet beach", steps=steps, left=150, right=50)
    jobs: queue.Queue = queue.Queue()
    made = {"previews": 0}

    def encoder() -> None:
        while (rgb := jobs.get()) is not None:
            preview_jpeg(rgb)
            made["previews"] += 1

    thread = threading.Thread(target=encoder, daemon=True)
    thread.start()

    def previews(interval: float) -> Callable[[torch.Tensor], None]:
        last = -interval

        def on_latents(latents: torch.Tensor) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= interval:
                last = now
                jobs.put(latent_rgb(latents[0]))

        return on_latents

    modes: dict[str, Callable[[], Callable[[torch.Tensor], None] | None]] = {
        "no previews": lambda: None,
        f"previews, at most every {PREVIEW_INTERVAL * 1000:.0f} ms": lambda: previews(PREVIEW_INTERVAL),
        "a preview every step": lambda: previews(0.0),
    }
    rates: dict[str, list[float]] = {name: [] for name in modes}
    counts: dict[str, int] = dict.fromkeys(modes, 0)
    job = engine.prepare(request)
    for _ in range(rounds):
        for name, make in modes.items():
            before = made["previews"]
            started = time.perf_counter()
            engine.denoise([job], None, make())
            rates[name].append(steps / (time.perf_counter() - started))
            while not jobs.empty():
                time.sleep(0.01)
            counts[name] += made["previews"] - before
    jobs.put(None)
    thread.join()
    base = statistics.median(rates["no previews"])
    return [
        [name, statistics.median(r), statistics.median(r) / base, counts[name] / rounds] for name, r in rates.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("# pipelined worker side work")
    print(machine_line())
    print()
    print(table(["1424x1024 output", "median ms", "bytes"], encoders()))
    print()
    print(f"one preview of 4x128x178 latents (map + 256 px JPEG): {one_preview():.2f} ms")
    print()
    print(
        table(
            ["denoising loop (random:tiny, 512x512 +150/+50)", "steps/s", "vs none", "previews/run"],
            loop_rates(args.steps, args.rounds),
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
