"""Seconds per request: plain diffusers `StableDiffusionXLInpaintPipeline` against our engine, in one run.

    python -m benchmarks.engine --model random:sdxl                       # on a GPU: fp16, the real shapes
    python -m benchmarks.engine --model random:tiny --device cpu --quick  # anywhere, in under a minute

Both sides get the same request: the same canvas, pre-fill, mask and working size (the model's
native area at the canvas's aspect ratio), 30 steps, CFG 4, and the same paste-back, so the timed
span is request-in, image-out for both. Diffusers keeps its own defaults otherwise: the model's
scheduler (Euler for the SDXL inpainting checkpoint and the random models), strength 0.9999 (which
makes it run 29 of the 30 steps: the "steps" column counts what each side ran), zeroed negative
embeddings; ours runs the API's sampler defaults (dpmpp_2m_sde_gpu + karras). The prompt is the
same short text for both: with `--styles default` ours adds the API's default styles, whose longer
text means more text-encoder chunks and longer cross-attention (much longer on the random models,
whose tokenizers spell every character as a token). Each side builds its own copy of the model,
so our speed-ups never leak into the baseline. Warm-up runs are not timed; the table shows the
median of the timed repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import machine_line, table
from models.canvas import Padding, build_canvas, paste_back, working_size
from models.components import Components
from models.devices import resolve_device, resolve_dtype
from models.engine import OutpaintEngine, OutpaintRequest
from models.loading import load_components
from models.names import DEFAULT_SAMPLER, DEFAULT_SCHEDULER, DEFAULT_STYLES, SAMPLERS, SCHEDULERS
from models.pipeline import OutpaintPipeline
from models.random_models import RANDOM_SPECS, build_random
from models.speed import DEFAULT_COMPILE_MODE, SpeedOptions

PROMPT = "a wide mountain valley"
SEED = 1234
ENGINES = ("diffusers", "ours", "ours-plain", "ours-compile")
StepHook = Callable[[int], None]


@dataclass(frozen=True)
class Case:
    name: str
    width: int
    height: int
    pad: Padding

    def scaled(self, scale: float) -> Case:
        def s(v: int) -> int:
            return round(v * scale)

        if scale == 1:
            return self
        pad = Padding(s(self.pad.left), s(self.pad.right), s(self.pad.top), s(self.pad.bottom))
        name = f"{self.name} x{scale:g}"
        return replace(self, name=name, width=max(16, s(self.width)), height=max(16, s(self.height)), pad=pad)

    def image(self) -> Image.Image:
        # A smooth gradient with some texture: the content does not change the work, only the JPEG.
        x = np.linspace(0, 255, self.width, dtype=np.float32)[None, :]
        y = np.linspace(0, 255, self.height, dtype=np.float32)[:, None]
        rgb = np.stack([x + 0 * y, y + 0 * x, 128 + 60 * np.sin((x + y) / 40)], axis=-1)
        return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


CASES = {
    "seed": Case("seed example (1024x1024, left 300, right 100)", 1024, 1024, Padding(left=300, right=100)),
    "square": Case("1024x1024 canvas (768x1024, right 256)", 768, 1024, Padding(right=256)),
}


@dataclass
class Measurement:
    engine: str
    case: str
    working_size: tuple[int, int]
    first_s: float
    times: list[float] = field(default_factory=list)
    steps_run: int = 0
    loop_steps_per_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    flops: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Times the denoising loop alone: from the end of the first step to the end of the last."""

    def __init__(self, device: torch.device, sync_steps: bool) -> None:
        self.device, self.sync_steps = device, sync_steps
        self.marks: list[float] = []

    def __call__(self, step: int) -> None:
        if self.sync_steps:
            # One sync per step, so a mark is when the GPU finished the step, not when it was queued.
            sync(self.device)
        self.marks.append(time.perf_counter())

    def steps_per_s(self) -> float | None:
        if len(self.marks) < 2 or self.marks[-1] <= self.marks[0]:
            return None
        return (len(self.marks) - 1) / (self.marks[-1] - self.marks[0])


def load_model(spec: str, device: torch.device) -> Components:
    """A fresh copy of the model; the random ones are built on the device itself (minutes faster for sdxl)."""
    if spec in RANDOM_SPECS:
        return build_random(spec, device=device)
    return load_components(spec)


class Diffusers:
    """The plain diffusers pipeline on a model copy of its own, around the same canvas and paste-back."""

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype, steps: int, cfg: float) -> None:
        from diffusers import StableDiffusionXLInpaintPipeline

        self.device, self.steps, self.cfg = device, steps, cfg
        components = load_model(spec, device)
        self.pipe = StableDiffusionXLInpaintPipeline(**components.as_pipeline_kwargs()).to(device=device, dtype=dtype)
        self.pipe.set_progress_bar_config(disable=True)
        side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.native_area = side * side
        self.applied = "diffusers defaults"

    def working_size(self, case: Case) -> tuple[int, int]:
        return working_size(*case.pad.canvas_size(case.width, case.height), self.native_area)

    def run(self, case: Case, image: Image.Image, hook: StepHook | None) -> Image.Image:
        canvas, mask = build_canvas(image, case.pad)
        size = working_size(canvas.width, canvas.height, self.native_area)
        mask_image = Image.fromarray((mask * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)

        def on_step_end(pipe: object, i: int, t: object, kwargs: dict) -> dict:
            if hook is not None:
                hook(i + 1)
            return kwargs

        out = self.pipe(
            prompt=PROMPT,
            image=canvas.resize(size, Image.Resampling.LANCZOS),
            mask_image=mask_image,
            height=size[1],
            width=size[0],
            num_inference_steps=self.steps,
            guidance_scale=self.cfg,
            generator=torch.Generator(self.device).manual_seed(SEED),
            callback_on_step_end=on_step_end,
        ).images[0]
        return paste_back(out.resize(canvas.size, Image.Resampling.LANCZOS), image, case.pad)


class Ours:
    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, speed: SpeedOptions) -> None:
        self.steps, self.cfg, self.sampler, self.scheduler = args.steps, args.cfg, args.sampler, args.scheduler
        self.styles = [] if args.styles == "none" else DEFAULT_STYLES.split(",")
        pipeline = OutpaintPipeline(load_model(args.model, device), device, dtype, speed)
        self.engine = OutpaintEngine(pipeline, args.model)
        self.applied = ", ".join(
            f"{k}={v}" for k, v in self.engine.pipeline.speedups.as_dict().items() if v not in (None, False)
        )

    def working_size(self, case: Case) -> tuple[int, int]:
        canvas = case.pad.canvas_size(case.width, case.height)
        return self.engine.pipeline.snap(working_size(*canvas, self.engine.pipeline.native_area), canvas)

    def run(self, case: Case, image: Image.Image, hook: StepHook | None) -> Image.Image:
        request = case_request(
            case, self.steps, self.sampler, image=image, scheduler=self.scheduler, cfg=self.cfg, styles=self.styles
        )
        return self.engine.run(request, None if hook is None else lambda step, total: hook(step)).images[0]


def case_request(
    case: Case,
    steps: int,
    sampler: str,
    *,
    image: Image.Image | None = None,
    scheduler: str = "karras",
    cfg: float = 4.0,
    styles: Sequence[str] = (),
    samples: int = 1,
) -> OutpaintRequest:
    """Our engine's request for a benchmark case: the shared prompt and seed, the case's padding."""
    return OutpaintRequest(
        image=case.image() if image is None else image,
        prompt=PROMPT,
        steps=steps,
        samples=samples,
        seed=SEED,
        guidance_scale=cfg,
        styles=list(styles),
        sampler=sampler,
        scheduler=scheduler,
        left=case.pad.left,
        right=case.pad.right,
        top=case.pad.top,
        bottom=case.pad.bottom,
    )


def _tristate(value: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[value]


def build(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Diffusers | Ours:
    if name == "diffusers":
        return Diffusers(args.model, device, dtype, args.steps, args.cfg)
    knobs = SpeedOptions(channels_last=_tristate(args.channels_last), fuse_qkv=_tristate(args.fuse_qkv))
    if name == "ours-plain":
        knobs = SpeedOptions(channels_last=False, fuse_qkv=False)
    elif name == "ours-compile":
        knobs = replace(knobs, compile=True, compile_mode=args.compile_mode)
    return Ours(args, device, dtype, knobs)


@contextlib.contextmanager
def flop_counter(device: torch.device) -> Iterator[Callable[[], float]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # torch counts the CUDA attention kernels but not the CPU flash kernel; the math path is
    # plain matmuls, which it does count.
    backends = sdpa_kernel(SDPBackend.MATH) if device.type != "cuda" else contextlib.nullcontext()
    with backends, counter:
        yield lambda: float(counter.get_total_flops())


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def timed_run(
    runner: Diffusers | Ours, case: Case, image: Image.Image, result: Measurement, args: argparse.Namespace
) -> None:
    device = args.resolved_device
    clock = StepClock(device, sync_steps=args.step_sync)
    sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    runner.run(case, image, clock)
    sync(device)
    result.times.append(time.perf_counter() - started)
    result.steps_run = len(clock.marks)
    if (rate := clock.steps_per_s()) is not None:
        result.loop_steps_per_s.append(rate)
    if device.type == "cuda":
        # Every engine stays loaded, so the peak of this run is its own model plus what the run
        # allocated on top of everything resident.
        peak = args.resident[result.engine] + torch.cuda.max_memory_allocated(device) - base
        result.peak_bytes = max(result.peak_bytes or 0, peak)


def measure_case(runners: dict[str, Diffusers | Ours], case: Case, args: argparse.Namespace) -> list[Measurement]:
    device = args.resolved_device
    image = case.image()
    results = {name: Measurement(name, case.name, r.working_size(case), float("nan")) for name, r in runners.items()}
    for name, runner in runners.items():
        for i in range(args.warmup):
            sync(device)
            started = time.perf_counter()
            runner.run(case, image, None)
            sync(device)
            if i == 0:
                results[name].first_s = time.perf_counter() - started
    # Round-robin, so a drift in machine load (a shared CPU, GPU clocks) touches every engine alike.
    for _ in range(args.repeats):
        for name, runner in runners.items():
            timed_run(runner, case, image, results[name], args)
    if args.flops:
        for name, runner in runners.items():
            with flop_counter(device) as total:
                runner.run(case, image, None)
            results[name].flops = total()
    return list(results.values())


def run_benchmark(args: argparse.Namespace) -> list[Measurement]:
    device = args.resolved_device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [case.scaled(args.scale) for key, case in CASES.items() if key in args.cases]
    print(f"# engine benchmark: {args.model} on {device}, {str(dtype).removeprefix('torch.')}")
    print(machine_line())
    print(
        f"torch threads {torch.get_num_threads()}; {args.steps} steps, CFG {args.cfg}, scale {args.scale}, "
        f"ours: {args.sampler} + {args.scheduler}, styles {args.styles}; "
        f"{args.warmup} warm-up + {args.repeats} timed runs (median), engines interleaved\n"
    )
    runners: dict[str, Diffusers | Ours] = {}
    args.resident = {}
    for name in args.engines:
        before = allocated(device)
        runners[name] = build(name, args, device, dtype)
        args.resident[name] = allocated(device) - before
        print(f"{name}: {runners[name].applied}", flush=True)
    results = [m for case in cases for m in measure_case(runners, case, args)]
    runners.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print()
    print(report(results))
    return results


MEASUREMENT_HEADERS = [
    "case",
    "engine",
    "working size",
    "s/request",
    "min s",
    "steps",
    "steps/s (request)",
    "steps/s (loop)",
    "peak GiB",
    "TFLOP/request",
    "TFLOP/s",
    "first run s",
    "vs diffusers",
]


def measurement_rows(
    results: list[Measurement], headers: list[str] = MEASUREMENT_HEADERS, label: dict[str, str] | None = None
) -> list[list[Any]]:
    """A row per measurement with the columns named in `headers` (of MEASUREMENT_HEADERS); `label` renames
    engines."""
    baseline = {m.case: m.median_s for m in results if m.engine == "diffusers"}
    rows = []
    for m in results:
        tflop = m.flops / 1e12 if m.flops else None
        cells = {
            "case": m.case,
            "engine": (label or {}).get(m.engine, m.engine),
            "working size": f"{m.working_size[0]}x{m.working_size[1]}",
            "s/request": m.median_s,
            "min s": min(m.times),
            "steps": m.steps_run,
            "steps/s (request)": m.steps_run / m.median_s,
            "steps/s (loop)": statistics.median(m.loop_steps_per_s) if m.loop_steps_per_s else None,
            "peak GiB": m.peak_bytes / 2**30 if m.peak_bytes is not None else None,
            "TFLOP/request": tflop,
            "TFLOP/s": tflop / m.median_s if tflop else None,
            "first run s": m.first_s,
            "vs diffusers": f"{baseline[m.case] / m.median_s:.2f}x" if m.case in baseline else None,
        }
        rows.append([cells[name] for name in headers])
    return rows


def report(results: list[Measurement]) -> str:
    return table(MEASUREMENT_HEADERS, measurement_rows(results))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:tiny", help="model spec, as for `beyond serve --model`")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    parser.add_argument("--scale", type=float, default=1.0, help="scale the input sizes and paddings")
    parser.add_argument("--cases", default="seed,square", help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per case (default 2, quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5, quick 1)")
    parser.add_argument(
        "--engines",
        default="diffusers,ours",
        help=f"comma-separated, run in this order: {', '.join(ENGINES)} (ours-plain: every knob off)",
    )
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--fuse-qkv", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--compile-mode", default=DEFAULT_COMPILE_MODE, help="torch.compile mode for ours-compile")
    parser.add_argument(
        "--flops",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="count model FLOPs in one extra untimed run per case (default on, off with --quick)",
    )
    parser.add_argument(
        "--step-sync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="synchronise the GPU at each step to time the loop (costs a little)",
    )
    parser.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, metavar="NAME", help="ours only")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=DEFAULT_SCHEDULER, metavar="NAME", help="ours only")
    parser.add_argument(
        "--styles",
        choices=["none", "default"],
        default="none",
        help="none: the same bare prompt for both sides; default: ours adds the API's default styles",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="1 warm-up, 1 timed run, no FLOP count")
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if set(args.cases) - set(CASES):
        parser.error(f"unknown cases {sorted(set(args.cases) - set(CASES))}; known: {', '.join(CASES)}")
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; known: {', '.join(ENGINES)}")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    args.flops = args.flops if args.flops is not None else not args.quick
    return args


def main(argv: list[str] | None = None) -> int:
    run_benchmark(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
