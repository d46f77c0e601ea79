"""Device check for batching and previews on CUDA (random:sdxl, fp16): tolerance and cost.

    python -m benchmarks.gpu_batching          # needs a CUDA GPU; about a minute on an H100

Two jobs of one working size (1424x1024 canvases) are denoised in one fused UNet batch and each
alone; it prints the largest difference of the 8-bit images (fp16 kernels differ by batch size, so
bit-identity is not expected on a GPU), the time of the batch against the two alone, and the
steps per second with and without the worker's previews (at most one per 500 ms).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from models.engine import OutpaintEngine, OutpaintRequest
from models.preview import latent_rgb
from tests.helpers import noise_image, smooth_image


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    engine = OutpaintEngine.load("random:sdxl", "cuda", "fp16")
    steps = 12
    a = OutpaintRequest(
        image=smooth_image(1024, 1024),
        prompt="a harbour at dusk",
        seed=3,
        steps=steps,
        left=300,
        right=100,
        sampler="dpmpp_2m_sde_gpu",
    )
    b = OutpaintRequest(
        image=noise_image(1024, 1024, seed=2),
        prompt="pine forest",
        seed=50,
        steps=steps,
        left=200,
        right=200,
        sampler="dpmpp_2m_sde_gpu",
    )

    def timed(jobs: list, on_latents: object = None) -> tuple[list, float]:
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = engine.denoise(jobs, None, on_latents)
        torch.cuda.synchronize()
        return out, time.perf_counter() - started

    engine.run(a)  # warm-up
    pa, pb = engine.prepare(a), engine.prepare(b)
    assert pa.batch_key == pb.batch_key
    both, t_both = timed([pa, pb])
    (alone_a,), t_a = timed([engine.prepare(a)])
    (alone_b,), t_b = timed([engine.prepare(b)])
    for name, got, want in (("a", both[0], alone_a), ("b", both[1], alone_b)):
        x = np.asarray(engine.finish(pa if name == "a" else pb, got).images[0], dtype=np.int16)
        y = np.asarray(engine.finish(pa if name == "a" else pb, want).images[0], dtype=np.int16)
        diff = np.abs(x - y)
        print(f"job {name}: batched vs alone, 8-bit max diff {diff.max()}, mean {diff.mean():.3f}")
    print(f"batch of 2: {t_both:.2f} s; alone: {t_a:.2f} + {t_b:.2f} s; ratio {(t_a + t_b) / t_both:.2f}")

    last = [-1.0]

    def previews(latents: torch.Tensor) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.5:
            last[0] = now
            latent_rgb(latents[0])

    rates = {"none": [], "previews": []}
    for _ in range(3):
        for name, hook in (("none", None), ("previews", previews)):
            _, spent = timed([engine.prepare(a)], hook)
            rates[name].append(steps / spent)
    for name, values in rates.items():
        print(f"steps/s {name}: {sorted(values)[1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
