"""Batching in the engine (random:tiny on the CPU): which jobs share a batch, and that sharing changes nothing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.engine import Cancelled, OutpaintEngine, OutpaintRequest, PreparedJob
from models.pipeline import OutpaintPipeline
from models.random_models import build_random
from tests.helpers import noise_image, smooth_image

STEPS = 4


@pytest.fixture(scope="module")
def engine() -> OutpaintEngine:
    return OutpaintEngine(
        OutpaintPipeline(build_random("random:tiny"), torch.device("cpu"), torch.float32), "random:tiny"
    )


def request_a(**fields: object) -> OutpaintRequest:
    # A 120x48 canvas: an 80x48 noise image padded on the left.
    base: dict = dict(
        image=noise_image(80, 48, seed=1),
        prompt="a harbour at dusk",
        negative_prompt="blurry",
        seed=3,
        samples=2,
        steps=STEPS,
        sampler="euler_ancestral",
        left=40,
    )
    return OutpaintRequest(**{**base, **fields})


def request_b(**fields: object) -> OutpaintRequest:
    # Another 120x48 canvas (so the same working size): a 64x48 gradient padded on both sides.
    base: dict = dict(
        image=smooth_image(64, 48),
        prompt="pine forest, morning fog",
        seed=50,
        samples=1,
        steps=STEPS,
        sampler="euler_ancestral",
        left=28,
        right=28,
    )
    return OutpaintRequest(**{**base, **fields})


def png_bytes(images: list) -> list[bytes]:
    out = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def test_two_batched_jobs_give_each_the_bytes_it_gets_alone(engine: OutpaintEngine) -> None:
    a, b = engine.prepare(request_a()), engine.prepare(request_b())
    assert a.batch_key == b.batch_key is not None and a.working_size == b.working_size
    batches: list[int] = []
    original = engine.pipeline.denoise

    def counting(parts, *args, **kwargs):  # type: ignore[no-untyped-def]
        batches.append(len(parts))
        return original(parts, *args, **kwargs)

    engine.pipeline.denoise = counting  # type: ignore[method-assign]
    try:
        steps_seen: dict[str, list[int]] = {"a": [], "b": []}
        images = engine.denoise(
            [a, b], [lambda s, t: steps_seen["a"].append(s), lambda s, t: steps_seen["b"].append(s)]
        )
        batched = [engine.finish(job, part) for job, part in zip([a, b], images, strict=True)]
    finally:
        del engine.pipeline.denoise
    assert batches == [2]  # one denoising loop for both
    assert steps_seen == {"a": list(range(1, STEPS + 1)), "b": list(range(1, STEPS + 1))}
    alone_a, alone_b = engine.run(request_a()), engine.run(request_b())
    assert batched[0].seeds == alone_a.seeds == [3, 4] and batched[1].seeds == alone_b.seeds == [50]
    assert png_bytes(batched[0].images) == png_bytes(alone_a.images)
    assert png_bytes(batched[1].images) == png_bytes(alone_b.images)
    # And the two jobs really differ (the comparison above could not pass by both being the same).
    assert png_bytes(batched[0].images[:1]) != png_bytes(batched[1].images)


def test_a_job_with_transparent_pixels_keeps_its_own_mask_in_a_batch(engine: OutpaintEngine) -> None:
    pixels = np.dstack([np.asarray(noise_image(80, 48, seed=1)), np.full((48, 80), 255, np.uint8)])
    pixels[16:32, 40:60, 3] = 0  # a transparent hole the engine generates, touching no padded side
    holed = request_a(image=Image.fromarray(pixels, "RGBA"))
    a, b = engine.prepare(holed), engine.prepare(request_b())
    assert a.batch_key == b.batch_key is not None
    batched = [engine.finish(job, part) for job, part in zip([a, b], engine.denoise([a, b]), strict=True)]
    assert png_bytes(batched[0].images) == png_bytes(engine.run(holed).images)
    assert png_bytes(batched[1].images) == png_bytes(engine.run(request_b()).images)
    assert png_bytes(batched[0].images) != png_bytes(engine.run(request_a()).images)


def test_one_fused_unet_call_per_step_and_one_vae_decode_agree_closely(engine: OutpaintEngine) -> None:
    # The accelerator path (forced on here): one UNet call over both jobs' rows a step, and one VAE
    # decode of all three images. CPU kernels round differently by row count: on this CPU the images
    # differ by at most 6.2e-6 (of 1.0) from each job's own calls, i.e. at most 1 of 255 on a few
    # pixels (README, "On a GPU"); the bound leaves room for other CPUs.
    unet_rows: list[int] = []
    decoded_rows: list[int] = []
    c = engine.pipeline.c
    hooks = [
        c.unet.register_forward_pre_hook(lambda module, args: unet_rows.append(args[0].shape[0])),
        c.vae.decoder.register_forward_pre_hook(lambda module, args: decoded_rows.append(args[0].shape[0])),
    ]
    engine.pipeline.fused_batches = True
    try:
        a, b = engine.prepare(request_a()), engine.prepare(request_b())
        fused = engine.denoise([a, b])
        fused_images = [engine.finish(job, part).images for job, part in zip([a, b], fused, strict=True)]
    finally:
        engine.pipeline.fused_batches = False
    calls_fused = (list(unet_rows), list(decoded_rows))
    unet_rows.clear()
    decoded_rows.clear()
    try:
        ra, rb = engine.prepare(request_a()), engine.prepare(request_b())
        alone = engine.denoise([ra, rb])  # the CPU's default: each job's own UNet calls and decode
        alone_images = [engine.finish(job, part).images for job, part in zip([ra, rb], alone, strict=True)]
    finally:
        for hook in hooks:
            hook.remove()
    assert calls_fused == ([2 * (2 + 1)] * STEPS, [3])  # negatives and positives of three images; one decode
    assert (unet_rows, decoded_rows) == ([2 * 2, 2 * 1] * STEPS, [2, 1])
    for got, want in zip(fused, alone, strict=True):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=0)
    for got_images, want_images in zip(fused_images, alone_images, strict=True):
        for got, want in zip(got_images, want_images, strict=True):
            difference = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16))
            assert difference.max() <= 2 and difference.mean() < 0.01


def test_a_job_cancelled_in_a_batch_leaves_it_and_its_partner_is_unchanged(engine: OutpaintEngine) -> None:
    a, b = engine.prepare(request_a()), engine.prepare(request_b())
    seen_a: list[int] = []

    def cancel_a(step: int, total: int) -> None:
        seen_a.append(step)
        if step == 2:
            raise Cancelled()

    images = engine.denoise([a, b], [cancel_a, None])
    assert images[0] is None and seen_a == [1, 2]  # not called again after its cancel
    with pytest.raises(Cancelled):
        engine.finish(a, images[0])
    assert png_bytes(engine.finish(b, images[1]).images) == png_bytes(engine.run(request_b()).images)
    # A batch whose every job is cancelled stops.
    steps: list[int] = []

    def cancel(step: int, total: int) -> None:
        steps.append(step)
        raise Cancelled()

    with pytest.raises(Cancelled):
        engine.denoise([engine.prepare(request_a()), engine.prepare(request_b())], [cancel, cancel])
    assert steps == [1, 1]


def key(engine: OutpaintEngine, request: OutpaintRequest) -> tuple | None:
    return engine.prepare(request).batch_key


@pytest.mark.parametrize(
    "change",
    [
        {"steps": STEPS + 1},
        {"sampler": "euler"},
        {"scheduler": "normal"},
        {"guidance_scale": 6.0},
        {"left": 0, "top": 40},  # another working size
        {"prompt": "a harbour at dusk, " * 60},  # more text chunks (the tiny tokenizer: one per character)
    ],
)
def test_incompatible_jobs_are_not_batched(engine: OutpaintEngine, change: dict) -> None:
    a, other = engine.prepare(request_a()), engine.prepare(request_a(seed=9, **change))
    assert a.batch_key is not None and other.batch_key is not None and a.batch_key != other.batch_key
    with pytest.raises(ValueError, match="cannot share a batch"):
        engine.denoise([a, other])


def test_jobs_that_never_batch(engine: OutpaintEngine) -> None:
    nothing_to_do: PreparedJob = engine.prepare(request_a(left=0))
    assert nothing_to_do.batch_key is None and nothing_to_do.inputs is None
    # dpm_adaptive sizes its steps by an error over the whole batch: partners would change it.
    assert key(engine, request_a(sampler="dpm_adaptive")) is None
    # With nothing to outpaint, finish gives the input back untouched.
    (untouched,) = engine.finish(nothing_to_do, None).images[:1]
    assert np.array_equal(np.asarray(untouched), np.asarray(noise_image(80, 48, seed=1)))
