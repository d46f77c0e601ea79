"""The engine in-process on random:tiny: geometry, preserved pixels, steps, seeds, conditioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

import models
from models import architectures as arch
from models.canvas import SEAM_BAND, Padding, build_canvas, working_size
from models.engine import Cancelled, OutpaintEngine, OutpaintRequest
from models.errors import EngineError, NonFiniteOutput, OutOfMemory
from models.pipeline import OutpaintPipeline
from models.random_models import build_random
from models.seeds import MAX_SEED
from tests.helpers import noise_image, smooth_image


@pytest.fixture(scope="module")
def engine() -> OutpaintEngine:
    return OutpaintEngine(
        OutpaintPipeline(build_random("random:tiny"), torch.device("cpu"), torch.float32), "random:tiny"
    )


def run(engine: OutpaintEngine, **fields: object) -> list[np.ndarray]:
    fields.setdefault("image", noise_image(80, 48))
    fields.setdefault("prompt", "a harbour at dusk")
    fields.setdefault("steps", 20)
    fields.setdefault("seed", 11)
    result = engine.run(OutpaintRequest(**fields))
    return [np.asarray(image) for image in result.images]


@pytest.mark.parametrize(
    "pad", [Padding(left=40), Padding(right=1), Padding(top=33, bottom=7), Padding(17, 29, 5, 61), Padding(right=200)]
)
def test_output_is_exactly_the_padded_size_and_the_original_survives(engine: OutpaintEngine, pad: Padding) -> None:
    image = noise_image(80, 48, seed=3)
    out = run(engine, image=image, left=pad.left, right=pad.right, top=pad.top, bottom=pad.bottom)[0]
    assert out.shape == (48 + pad.top + pad.bottom, 80 + pad.left + pad.right, 3)
    region = out[pad.top : pad.top + 48, pad.left : pad.left + 80]
    original = np.asarray(image)
    # Bit-identical beyond the seam band on each padded side.
    y0 = SEAM_BAND if pad.top else 0
    y1 = 48 - (SEAM_BAND if pad.bottom else 0)
    x0 = SEAM_BAND if pad.left else 0
    x1 = 80 - (SEAM_BAND if pad.right else 0)
    assert np.array_equal(region[y0:y1, x0:x1], original[y0:y1, x0:x1])
    # Inside the band the result is a blend, not a copy of the original.
    if pad.left:
        assert not np.array_equal(region[:, 0], original[:, 0])


def test_working_size_keeps_area_and_aspect() -> None:
    for width, height in [(1424, 1024), (1024, 1024), (3072, 200), (200, 3072), (640, 480)]:
        w, h = working_size(width, height, 1024 * 1024)
        assert w % 64 == 0 and h % 64 == 0
        # Past 4:1 the long side stops at 2048 (tests/test_working_size.py): less area, squeezed.
        assert abs(w * h - 1024 * 1024) / (1024 * 1024) < 0.25 or max(w, h) == 2048
        assert abs(w / h - width / height) / (width / height) < 0.2 or max(w, h) == 2048
    assert working_size(1424, 1024, 1024 * 1024) == (1216, 832)  # 1216x896 would be past the native area


def test_the_working_size_comes_from_the_model_config(engine: OutpaintEngine) -> None:
    unet = engine.pipeline.c.unet.config
    assert engine.pipeline.native_area == (unet.sample_size * 8) ** 2 == 256 * 256
    result = engine.run(OutpaintRequest(image=noise_image(80, 48), prompt="x", steps=20, seed=1, left=40))
    w, h = result.working_size
    assert w % 64 == 0 and h % 64 == 0 and abs(w * h - 256 * 256) <= 0.25 * 256 * 256


def test_prefill_extends_the_edges_smoothly() -> None:
    image = smooth_image(64, 64)
    canvas, mask = build_canvas(image, Padding(left=64, top=32))
    pixels = np.asarray(canvas, dtype=np.float32)
    new_area = pixels[:, :64]
    assert new_area.mean() > 20, "the new area must not be black"
    # Smooth, not noise: neighbouring pixels barely differ.
    assert np.abs(np.diff(new_area, axis=1)).mean() < 4
    # The column next to the original takes the original's edge colours.
    assert np.abs(pixels[32:, 63] - np.asarray(image, dtype=np.float32)[:, 0]).mean() < 12
    assert np.array_equal(pixels[32:, 64:], np.asarray(image, dtype=np.float32))
    assert mask[0, 0] == 1 and mask[-1, -1] == 0 and mask[40, 64 + SEAM_BAND - 1] == 1


def test_exactly_steps_denoising_steps(engine: OutpaintEngine) -> None:
    calls: list[tuple[int, int]] = []
    engine.run(
        OutpaintRequest(
            image=noise_image(), prompt="x", steps=23, seed=1, left=16, sampler="euler", scheduler="normal"
        ),
        on_step=lambda i, n: calls.append((i, n)),
    )
    assert [i for i, _ in calls] == list(range(1, 24))
    assert {n for _, n in calls} == {23}


def test_same_seed_same_pixels_and_samples_use_consecutive_seeds(engine: OutpaintEngine) -> None:
    first = run(engine, left=32, samples=2, seed=100)
    again = run(engine, left=32, samples=2, seed=100)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    alone = run(engine, left=32, samples=1, seed=101)[0]
    # Sample 1 of the batch used seed 101: equal to seed 101 alone up to batched float rounding.
    assert np.abs(alone.astype(int) - first[1].astype(int)).max() <= 2
    assert not np.array_equal(first[0], first[1])


def test_seeds_wrap_past_the_largest_and_each_reproduces_its_image_alone(engine: OutpaintEngine) -> None:
    batch = engine.run(
        OutpaintRequest(
            image=noise_image(80, 48), prompt="a harbour at dusk", steps=20, seed=MAX_SEED - 1, samples=3, left=32
        )
    )
    assert batch.seeds == [MAX_SEED - 1, MAX_SEED, 0]
    for seed, image in zip(batch.seeds, batch.images, strict=True):
        alone = run(engine, left=32, seed=seed)[0]
        # Equal up to batched float rounding, as for any sample (test above).
        assert np.abs(alone.astype(int) - np.asarray(image).astype(int)).max() <= 2
    with pytest.raises(ValueError, match="seed"):
        engine.run(OutpaintRequest(image=noise_image(80, 48), prompt="x", steps=20, seed=MAX_SEED + 1, left=32))


def test_seed_minus_one_draws_different_seeds(engine: OutpaintEngine) -> None:
    seeds = {engine.run(OutpaintRequest(image=noise_image(), prompt="x", steps=20, left=16)).seeds[0] for _ in range(3)}
    assert len(seeds) == 3 and all(0 <= s <= 999_999_999_999_999 for s in seeds)


def test_negative_prompt_and_guidance_change_the_result(engine: OutpaintEngine) -> None:
    base = run(engine, left=32)[0]
    assert not np.array_equal(base, run(engine, left=32, negative_prompt="blurry, dark")[0])
    assert not np.array_equal(base, run(engine, left=32, guidance_scale=9.0)[0])
    assert not np.array_equal(base, run(engine, left=32, prompt="a snowy forest")[0])


def test_cancel_stops_between_steps(engine: OutpaintEngine) -> None:
    seen: list[int] = []

    def stop_at_three(step: int, total: int) -> None:
        seen.append(step)
        if step == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        engine.run(OutpaintRequest(image=noise_image(), prompt="x", steps=20, left=16), on_step=stop_at_three)
    assert seen == [1, 2, 3]
    assert models.Cancelled is Cancelled and issubclass(Cancelled, EngineError)


@pytest.mark.parametrize("error", [MemoryError, torch.cuda.OutOfMemoryError])
def test_running_out_of_memory_is_reported_with_the_facts(engine: OutpaintEngine, error: type[Exception]) -> None:
    # The step callback runs inside the denoise loop, where a real allocation failure would surface.
    def allocate_too_much(step: int, total: int) -> None:
        raise error("tried to allocate 80 GiB")

    request = OutpaintRequest(image=noise_image(80, 48), prompt="x", steps=4, samples=2, left=16, top=8)
    with pytest.raises(OutOfMemory) as caught:
        engine.run(request, on_step=allocate_too_much)
    assert (caught.value.device, caught.value.samples, caught.value.canvas) == ("cpu", 2, (96, 56))
    assert caught.value.detail == "tried to allocate 80 GiB"
    assert str(caught.value) == "out of memory on cpu with 2 sample(s) of a 96x56 canvas"
    assert isinstance(caught.value, EngineError) and isinstance(caught.value, MemoryError)
    # The engine is still usable afterwards.
    assert len(engine.run(OutpaintRequest(image=noise_image(80, 48), prompt="x", steps=2, left=16)).images) == 1


def test_non_finite_output_is_a_typed_error() -> None:
    components = build_random("random:tiny")
    with torch.no_grad():
        components.vae.decoder.conv_out.bias.fill_(float("nan"))
    engine = OutpaintEngine(OutpaintPipeline(components, torch.device("cpu"), torch.float32), "random:tiny")
    with pytest.raises(NonFiniteOutput) as caught:
        engine.run(OutpaintRequest(image=noise_image(80, 48), prompt="x", steps=2, left=16))
    assert caught.value.dtype == "float32"
    assert str(caught.value) == "the model produced NaN or infinite values when computing in float32"
    assert isinstance(caught.value, FloatingPointError) and isinstance(caught.value, EngineError)


def test_a_plain_four_channel_unet_outpaints_with_the_known_region_reimposed() -> None:
    components = build_random("random:tiny")
    torch.manual_seed(5)
    components.unet = UNet2DConditionModel(**{**arch.TINY_UNET, "in_channels": 4}).eval()
    engine = OutpaintEngine(OutpaintPipeline(components, torch.device("cpu"), torch.float32), "tiny-4ch")
    assert not engine.pipeline.inpainting_unet
    image = noise_image(80, 48)
    out = run(engine, image=image, left=48)[0]
    assert out.shape == (48, 128, 3)
    assert np.array_equal(out[:, 48 + SEAM_BAND :], np.asarray(image)[:, SEAM_BAND:])


def test_half_precision_keeps_the_vae_in_fp32_and_gives_finite_images() -> None:
    components = build_random("random:tiny")
    pipeline = OutpaintPipeline(components, torch.device("cpu"), torch.float16)
    assert pipeline.vae_dtype == torch.float32 and components.vae.dtype == torch.float32
    assert components.unet.dtype == torch.float16
    engine = OutpaintEngine(pipeline, "random:tiny")
    out = run(engine, left=32, sampler="euler", scheduler="karras")[0]
    assert out.shape == (48, 112, 3) and out[:, :32].std() > 0
    bf16 = OutpaintPipeline(build_random("random:tiny"), torch.device("cpu"), torch.bfloat16)
    assert bf16.vae_dtype == torch.bfloat16  # bf16 has fp32's range: no upcast needed
