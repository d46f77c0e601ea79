"""The speed knobs of models/speed.py on random:tiny (CPU): each one visibly applied, none changing the output."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

from models.engine import OutpaintEngine, OutpaintRequest
from models.errors import InvalidSpeedOption
from models.pipeline import OutpaintPipeline
from models.prompts import encode_prompts
from models.random_models import build_random
from models.speed import DEFAULT_COMPILE_MODE, SpeedOptions, apply_speedups
from tests.helpers import noise_image

CPU = torch.device("cpu")
OFF = SpeedOptions(channels_last=False, fuse_qkv=False)


def pipeline(speed: SpeedOptions | None, dtype: torch.dtype = torch.float32) -> OutpaintPipeline:
    return OutpaintPipeline(build_random("random:tiny"), CPU, dtype, speed)


def outpaint(pipe: OutpaintPipeline) -> torch.Tensor:
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 128) * 2 - 1
    mask = torch.zeros(1, 1, 64, 128)
    mask[..., 80:] = 1
    prompts = encode_prompts(pipe.c, ["a harbour at dusk"], ["blurry"], CPU, pipe.dtype)
    return pipe(image, mask, prompts, seeds=[5], steps=6, guidance_scale=4.0, sampler="euler", schedule="karras")


def attention_layers(model: torch.nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return outpaint(pipeline(OFF))


def test_on_a_cpu_auto_means_off_and_attention_is_already_sdpa() -> None:
    pipe = pipeline(SpeedOptions())
    applied = pipe.speedups
    assert (applied.channels_last, applied.fuse_qkv, applied.compile) == (False, False, None)
    assert applied.sdpa
    assert not pipe.c.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for model in (pipe.c.unet, pipe.c.vae):
        assert {type(m.processor) for m in attention_layers(model)} == {AttnProcessor2_0}


def test_the_classic_attention_processor_is_replaced_by_sdpa() -> None:
    components = build_random("random:tiny")
    components.unet.set_attn_processor(AttnProcessor())
    assert apply_speedups(components, CPU, torch.float32, OFF).sdpa
    assert {type(m.processor) for m in attention_layers(components.unet)} == {AttnProcessor2_0}


def test_channels_last_forced_on(reference: torch.Tensor) -> None:
    pipe = pipeline(SpeedOptions(channels_last=True, fuse_qkv=False))
    assert pipe.speedups.channels_last
    for conv in (pipe.c.unet.conv_in, pipe.c.unet.up_blocks[0].resnets[0].conv1, pipe.c.vae.decoder.conv_out):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert not conv.weight.is_contiguous()
    torch.testing.assert_close(outpaint(pipe), reference, atol=1e-4, rtol=0)


def test_fused_qkv_forced_on(reference: torch.Tensor) -> None:
    pipe = pipeline(SpeedOptions(channels_last=False, fuse_qkv=True))
    assert pipe.speedups.fuse_qkv
    for model in (pipe.c.unet, pipe.c.vae):
        layers = attention_layers(model)
        assert layers and {type(m.processor) for m in layers} == {FusedAttnProcessor2_0}
    self_attn = [m for m in attention_layers(pipe.c.unet) if not m.is_cross_attention]
    cross_attn = [m for m in attention_layers(pipe.c.unet) if m.is_cross_attention]
    assert self_attn and cross_attn
    # The separate projections are views into the fused weight, not a second copy of it.
    for m in self_attn:
        assert m.to_q.weight.untyped_storage().data_ptr() == m.to_qkv.weight.untyped_storage().data_ptr()
        torch.testing.assert_close(torch.cat([m.to_q.weight, m.to_k.weight, m.to_v.weight]), m.to_qkv.weight)
    for m in cross_attn:
        assert m.to_v.weight.untyped_storage().data_ptr() == m.to_kv.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(outpaint(pipe), reference, atol=1e-4, rtol=0)


def test_channels_last_and_fused_qkv_together(reference: torch.Tensor) -> None:
    pipe = pipeline(SpeedOptions(channels_last=True, fuse_qkv=True))
    assert pipe.speedups.channels_last and pipe.speedups.fuse_qkv
    assert pipe.c.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert {type(m.processor) for m in attention_layers(pipe.c.unet)} == {FusedAttnProcessor2_0}
    # The fused projection's weight is a plain (rows, columns) matrix: channels_last leaves it alone.
    assert all(m.to_qkv.weight.is_contiguous() for m in attention_layers(pipe.c.unet) if not m.is_cross_attention)
    torch.testing.assert_close(outpaint(pipe), reference, atol=1e-4, rtol=0)


def test_compile_knob_compiles_the_unet_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    # A real inductor compile of even the tiny UNet takes about 90 s on a small CPU; the knob's
    # effect is checked here, a real dynamo trace in tests/test_compile.py.
    import torch._dynamo

    calls: list[dict] = []
    monkeypatch.setattr(UNet2DConditionModel, "compile", lambda self, **kwargs: calls.append(kwargs))
    with torch._dynamo.config.patch(recompile_limit=2):  # not monkeypatch: see tests/test_compile.py
        pipe = pipeline(SpeedOptions(channels_last=False, fuse_qkv=False, compile=True, compile_mode="reduce-overhead"))
        limit = torch._dynamo.config.recompile_limit
    # One graph per working size: static shapes (the pipeline marks rows and prompt length dynamic).
    assert calls == [{"mode": "reduce-overhead", "dynamic": False}]
    assert pipe.speedups.compile == "reduce-overhead"
    assert isinstance(pipe.c.unet, UNet2DConditionModel)
    assert pipe.compiled_sizes is not None and len(pipe.compiled_sizes) == 5  # the tiny model's set
    assert limit == 5


def test_no_compile_no_sizes_and_no_snapping() -> None:
    pipe = pipeline(OFF)
    assert pipe.compiled_sizes is None and pipe.snap((448, 128)) == (448, 128)
    assert pipe.warm_up() == {}


def fp32_precision() -> tuple[str, str]:
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


@pytest.fixture
def tf32_flags() -> Iterator[None]:
    """The process-wide flags as they were, after the test."""
    before = fp32_precision()
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


@pytest.mark.usefixtures("tf32_flags")
def test_tf32_is_on_for_the_fp32_vae_of_a_half_precision_cuda_engine() -> None:
    def applied(device: str, dtype: torch.dtype, vae_dtype: torch.dtype, tf32: bool | None = None) -> bool:
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
        options = SpeedOptions(channels_last=False, fuse_qkv=False, tf32=tf32)
        on = apply_speedups(build_random("random:tiny"), torch.device(device), dtype, options, vae_dtype).tf32
        assert fp32_precision() == (("tf32", "tf32") if on else ("ieee", "ieee"))
        return on

    # The decision only (the models stay on the CPU: nothing here runs on a GPU).
    assert applied("cuda", torch.float16, torch.float32)
    assert not applied("cuda", torch.bfloat16, torch.bfloat16)  # nothing runs in fp32
    assert not applied("cuda", torch.float32, torch.float32)  # full precision was asked for
    assert not applied("cpu", torch.float16, torch.float32)
    assert applied("cpu", torch.float32, torch.float32, tf32=True)
    assert not applied("cuda", torch.float16, torch.float32, tf32=False)


def test_options_from_the_environment() -> None:
    assert SpeedOptions.parse() == SpeedOptions()
    assert SpeedOptions.parse("1", "off", "1") == SpeedOptions(True, False, True, DEFAULT_COMPILE_MODE)
    assert SpeedOptions.parse(compile="reduce-overhead").compile_mode == "reduce-overhead"
    assert SpeedOptions.parse(compile="0").compile is False
    with pytest.raises(InvalidSpeedOption, match="fuse_qkv") as caught:
        SpeedOptions.parse(fuse_qkv="maybe")
    assert (caught.value.option, caught.value.value) == ("fuse_qkv", "maybe")
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(("dtype", "vae_dtype"), [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_the_whole_engine_in_half_precision(dtype: torch.dtype, vae_dtype: torch.dtype) -> None:
    def run(dtype: torch.dtype) -> tuple[OutpaintEngine, list[np.ndarray]]:
        engine = OutpaintEngine(OutpaintPipeline(build_random("random:tiny"), CPU, dtype, OFF), "random:tiny")
        request = OutpaintRequest(
            image=noise_image(80, 48, seed=1), prompt="a harbour at dusk", seed=3, samples=2, steps=4,
            sampler="dpmpp_2m_sde_gpu", left=40, styles=[],
        )  # fmt: skip
        return engine, [np.asarray(image, dtype=np.int16) for image in engine.run(request).images]

    engine, half = run(dtype)
    assert {p.dtype for p in engine.pipeline.c.unet.parameters()} == {dtype}
    assert {p.dtype for p in engine.pipeline.c.text_encoder_2.parameters()} == {dtype}
    assert {p.dtype for p in engine.pipeline.c.vae.parameters()} == {vae_dtype}
    _, full = run(torch.float32)
    for got, want in zip(half, full, strict=True):
        assert got.shape == want.shape == (48, 120, 3)
        # Farther than the seam band from the padded side: the original, bit for bit, in any precision.
        assert np.array_equal(got[:, 40 + 16 :], want[:, 40 + 16 :])
        # The generated part: the fp32 run's, up to half precision's rounding (on this CPU: fp16 at
        # most 1 level of 255, bf16 5; the bound leaves room for other CPUs' kernels).
        difference = np.abs(got - want)[:, :56]
        assert difference.max() <= 16 and difference.mean() < 2
    assert not np.array_equal(half[0], half[1])  # two samples, two images


@pytest.mark.parametrize(("dtype", "vae_dtype"), [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_vae_runs_in_bf16_and_is_upcast_only_for_fp16(dtype: torch.dtype, vae_dtype: torch.dtype) -> None:
    pipe = pipeline(OFF, dtype)
    assert pipe.vae_dtype == vae_dtype
    assert {p.dtype for p in pipe.c.vae.parameters()} == {vae_dtype}
    assert pipe.speedups.vae_dtype == str(vae_dtype).removeprefix("torch.")


def test_engine_benchmark_quick_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import engine

    argv = ["--model", "random:tiny", "--device", "cpu", "--quick", "--steps", "2", "--scale", "0.0625", "--flops"]
    results = engine.run_benchmark(engine.parse_args(argv))
    # Diffusers' default strength (0.9999) drops one of the steps asked for; ours runs them all.
    assert [(m.engine, m.steps_run) for m in results] == [("diffusers", 1), ("ours", 2)] * 2
    assert all(m.times and m.flops for m in results)
    out = capsys.readouterr().out
    assert "| seed example" in out and "vs diffusers" in out
