"""Compile that a server can use: a bounded set of working sizes, compiled before the worker is ready.

The traces here are real dynamo traces of the tiny UNet; only the compiler behind them is dynamo's
eager one (inductor takes minutes for even the tiny UNet on a CPU), so what is checked is which
graphs are made and when, not the kernels.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch._dynamo
from diffusers import UNet2DConditionModel
from torch import nn
from torch._dynamo.utils import counters

from models.canvas import working_size
from models.compile_sizes import default_sizes, parse_sizes, snap
from models.engine import OutpaintEngine, OutpaintRequest
from models.errors import InvalidSpeedOption
from models.pipeline import OutpaintPipeline
from models.random_models import build_random
from models.speed import SpeedOptions
from server.jobs.contract import JobParams
from server.jobs.messages import JobDone, Ready, RunJob, Shutdown
from server.settings import Settings
from tests.helpers import encode, noise_image, smooth_image, tiny_worker_config

SDXL_AREA = 1024 * 1024


def test_the_sdxl_set_is_nine_sizes_of_about_one_megapixel() -> None:
    sizes = default_sizes(SDXL_AREA)
    assert sizes == (
        (640, 1600), (768, 1344), (832, 1216), (896, 1152), (1024, 1024),
        (1152, 896), (1216, 832), (1344, 768), (1600, 640),
    )  # fmt: skip
    assert all(0.9 < w * h / SDXL_AREA < 1.1 and w % 64 == h % 64 == 0 for w, h in sizes)
    # The tiny model's: some aspect ratios round alike (within its native area, 1152x896's shape is 256x256).
    assert default_sizes(256 * 256) == ((128, 384), (192, 320), (256, 256), (320, 192), (384, 128))


@pytest.mark.parametrize("area", [SDXL_AREA, 256 * 256])
def test_every_working_size_snaps_into_the_set(area: int) -> None:
    sizes = default_sizes(area)
    pipeline = SimpleNamespace(compiled_sizes=sizes)
    for canvas in [(1424, 1024), (1024, 1424), (4000, 1000), (1000, 4000), (1300, 1000), (777, 555), (2048, 2047)]:
        snapped = OutpaintPipeline.snap(pipeline, working_size(*canvas, area), canvas)  # as the engine calls it
        assert snapped in sizes
        # The nearest to the canvas's aspect ratio (on a log scale: 2:1 is as far from 1:1 as 1:2).
        distance = {s: abs(math.log(s[0] / s[1] * canvas[1] / canvas[0])) for s in sizes}
        assert distance[snapped] == min(distance.values())
    for size in sizes:
        assert snap(size, sizes) == size
    if area == SDXL_AREA:
        # The seed example's 1424x1024 canvas (aspect 1.39): 1216x832 with compile or without.
        assert working_size(1424, 1024, area) == (1216, 832) and snap((1424, 1024), sizes) == (1216, 832)


def test_compile_sizes_as_text() -> None:
    assert parse_sizes("") is None and parse_sizes("  ") is None
    assert parse_sizes("1024x1024, 1216x832,1024x1024") == ((1024, 1024), (1216, 832))
    for bad in ("1024", "1024x1000", "0x64", "1024*1024", "1024x1024;832x1216", "-64x64"):
        with pytest.raises(InvalidSpeedOption, match="compile_sizes"):
            parse_sizes(bad)
    assert SpeedOptions.parse(compile="1", compile_sizes="256x256").compile_sizes == ((256, 256),)
    assert Settings(compile_sizes="1216x832,832x1216").compile_sizes == "1216x832,832x1216"
    for bad in ("1216x830", "big"):
        with pytest.raises(ValueError, match="multiples of 64"):
            Settings(compile_sizes=bad)


def eager_compile(calls: list[dict] | None = None) -> Any:
    """UNet2DConditionModel.compile traced for real by dynamo, with its eager compiler instead of inductor."""

    def compile(self: nn.Module, **kwargs: Any) -> None:
        if calls is not None:
            calls.append(kwargs)
        nn.Module.compile(self, backend="eager", dynamic=kwargs.get("dynamic"))

    return compile


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    # dynamo's own patch, not monkeypatch: undoing a monkeypatch on its config module hides the setting
    # from every later test (getattr then fails).
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
        torch._dynamo.reset()
        yield
        torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
def test_requests_run_on_the_warmed_up_graph_never_compile_and_compute_the_same(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cpu, fp32 = torch.device("cpu"), torch.float32
    plain = OutpaintEngine(OutpaintPipeline(build_random("random:tiny"), cpu, fp32), "random:tiny")
    calls: list[dict] = []
    monkeypatch.setattr(UNet2DConditionModel, "compile", eager_compile(calls))
    speed = SpeedOptions(compile=True, compile_sizes=((256, 256),))
    pipeline = OutpaintPipeline(build_random("random:tiny"), cpu, fp32, speed)
    assert calls == [{"mode": speed.compile_mode, "dynamic": False}]
    assert torch._dynamo.config.recompile_limit >= 1
    engine = OutpaintEngine(pipeline, "random:tiny")
    before = counters["stats"]["unique_graphs"]
    assert set(pipeline.warm_up()) == {(256, 256)}
    warmed = counters["stats"]["unique_graphs"]
    assert warmed > before

    base = dict(image=smooth_image(48, 64), prompt="a harbour", seed=1, steps=2, left=16, styles=[])
    variants = [
        {"sampler": "heun", "samples": 2},  # two model calls a step, a batch of 4 rows
        {"prompt": "a harbour at dusk, " * 20, "left": 80},  # more tokens; 128x64: 320x192 snapped to 256x256
        {"image": noise_image(40, 160), "left": 0, "top": 16},  # a portrait canvas
    ]
    with caplog.at_level(logging.WARNING, logger="beyond.pipeline"):
        for fields in variants:
            result = engine.run(OutpaintRequest(**{**base, **fields}))
            assert result.working_size == (256, 256)
        # No guidance and one image: one row (run as two). The same as the plain UNet's images.
        request = OutpaintRequest(**{**base, "guidance_scale": 1.0})
        (got,) = engine.denoise([engine.prepare(request)])
    (want,) = plain.denoise([plain.prepare(request)])
    assert got.shape == want.shape == (1, 3, 256, 256)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] == warmed  # nothing compiled for a request
    assert not [r for r in caplog.records if r.name == "beyond.pipeline"]


class Reporting:
    """The worker's end of the pipe; before Ready and JobDone it says how many graphs dynamo has made."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def send(self, message: object) -> None:
        if isinstance(message, Ready | JobDone):
            self.conn.send(("graphs", counters["stats"]["unique_graphs"]))
        self.conn.send(message)

    def recv(self) -> object:
        return self.conn.recv()


def compiling_worker(conn: Any, config: Any) -> None:
    """The real worker process (as the supervisor starts it), its UNet traced by dynamo's eager compiler."""
    from server.jobs.engine_process import worker_main

    UNet2DConditionModel.compile = eager_compile()  # type: ignore[method-assign]
    worker_main(Reporting(conn), config)


def test_the_worker_compiles_every_size_before_it_reports_ready() -> None:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    config = tiny_worker_config(compile="1", compile_sizes="256x256", cpu_threads=1)
    process = context.Process(target=compiling_worker, args=(theirs, config), daemon=True)
    process.start()
    try:

        def receive() -> object:
            assert ours.poll(120), "the worker said nothing for 120 s"
            return ours.recv()

        assert receive() == ("graphs", 1)  # the 256x256 graph, made before the worker said it is ready
        assert isinstance(receive(), Ready)
        job = RunJob("j", 1, JobParams(prompt="p", steps=2, left=48, seed=3), encode(smooth_image(96, 64)))
        ours.send(job)
        messages = []
        while not isinstance(messages[-1:] and messages[-1], JobDone):
            messages.append(receive())
        assert ("graphs", 1) in messages  # the job ran on it: no compile
        assert messages[-1].result.working_size == (256, 256)
    finally:
        ours.send(Shutdown())
        process.join(30)
        if process.is_alive():
            process.kill()
