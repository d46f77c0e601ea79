"""Milliseconds per step of the SDE samplers' noise: torchsde's Brownian tree (before) vs BrownianNoise (now).

    python -m benchmarks.noise            # CPU, and CUDA too when there is one
    python -m benchmarks.noise --quick    # fewer repeats, under a minute on a 2-core CPU

Three tables:

1. The noise alone, replaying a 30-step Karras schedule's queries: the 2M/3M SDE pattern (one
   interval per step) and dpmpp_sde's (a midpoint, then the whole step), at random:tiny's latent
   size for the seed example and at SDXL's (4x128x128, 4x112x152), batch 1 and 4; on the CPU, and
   on CUDA when there is one. `tree 1e-6` is the noise as it was (one `torchsde.BrownianTree` per
   item, tolerance 1e-6, as k-diffusion); `tree 1e-4` a shallower tree (7 levels fewer); `bridge`
   the new `models.sampling.noise.BrownianNoise`. The last column divides the bridge's ms per
   step by the median UNet call of the engine run below (random:tiny unless `--model`).
2. The engine, `OutpaintEngine` on the seed example with dpmpp_2m_sde_gpu (and euler, which draws
   no noise, as the floor), run with the old tree patched in and with the bridge: per step, wall
   time minus UNet time (a timer on the UNet's forward, synchronised on CUDA), from the end of the
   first step to the end of the last.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from benchmarks.common import machine_line, table
from models.architectures import SCHEDULER
from models.sampling import compute_sigmas
from models.sampling import stock as stock_module
from models.sampling.noise import BROWNIAN_STREAM, BrownianNoise, derive_seed

STEPS = 30
SEEDS = (1234, 1235, 1236, 1237)
SDXL_LATENTS = ((4, 128, 128), (4, 112, 152))
Noise = Callable[[float, float], torch.Tensor]


class TorchsdeTree:
    """The SDE samplers' noise as it was before BrownianNoise: one torchsde.BrownianTree per item,
    queries clamped to the tree's rounded interval, increments normalised to unit variance."""

    def __init__(
        self, sample: torch.Tensor, lo: float, hi: float, seeds: Sequence[int], device: torch.device, tol: float
    ) -> None:
        import torchsde

        self.out_device, self.shape = sample.device, tuple(sample.shape)
        w0 = torch.zeros(sample.shape[1:], dtype=torch.float32, device=device)
        self.trees = [
            torchsde.BrownianTree(lo, w0, hi, entropy=derive_seed(s, BROWNIAN_STREAM), tol=tol) for s in seeds
        ]
        digits = -int(math.log10(tol))
        self.lo, self.hi = round(lo, digits), round(hi, digits)

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        a, b = (min(max(float(t), self.lo), self.hi) for t in (sigma, sigma_next))
        if a == b:
            return torch.zeros(self.shape, dtype=torch.float32, device=self.out_device)
        sign = 1.0
        if a > b:
            a, b, sign = b, a, -1.0
        w = torch.stack([tree(a, b) for tree in self.trees])
        return (w * (sign / (b - a) ** 0.5)).to(device=self.out_device, dtype=torch.float32)


def karras_sigmas(steps: int = STEPS) -> list[float]:
    return [float(s) for s in compute_sigmas("karras", SCHEDULER, steps).float()]


def queries(pattern: str, sigmas: Sequence[float]) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) pairs a run asks its noise for (none for the step into sigma 0)."""
    out = []
    for s, s_next in zip(sigmas, sigmas[1:], strict=False):
        if s_next <= 0:
            continue
        if pattern == "sde":  # dpmpp_sde: the midpoint in log-sigma, then the whole step
            out.append((s, math.sqrt(s * s_next)))
        out.append((s, s_next))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_noise(kind: str, sample: torch.Tensor, sigmas: Sequence[float], state: torch.device) -> Noise:
    positive = [s for s in sigmas if s > 0]
    seeds = SEEDS[: sample.shape[0]]
    if kind == "bridge":
        return BrownianNoise(sample, min(positive), seeds, state)
    tol = {"tree 1e-6": 1e-6, "tree 1e-4": 1e-4}[kind]
    return TorchsdeTree(sample, min(positive), max(positive), seeds, state, tol)


def ms_per_step(kind: str, shape: tuple[int, ...], device: torch.device, pattern: str, repeats: int) -> float:
    """Median over `repeats` whole runs (noise built, every query made) of ms per schedule step."""
    sigmas = karras_sigmas()
    pairs = queries(pattern, sigmas)
    sample = torch.zeros(shape, device=device)
    warm = make_noise(kind, sample, sigmas, device)  # allocator, CUDA kernels
    for a, b in pairs[:3]:
        warm(a, b)
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        noise = make_noise(kind, sample, sigmas, device)
        for a, b in pairs:
            noise(a, b)
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times) / STEPS * 1e3


# --- the engine: non-UNet time per step -----------------------------------------------------------


@dataclass
class UNetTimer:
    """Wall time of each UNet forward (synchronised on CUDA), from hooks on the module."""

    device: torch.device
    calls: list[float] = field(default_factory=list)
    _started: float = 0.0

    @contextlib.contextmanager
    def attached(self, unet: torch.nn.Module) -> Iterator[UNetTimer]:
        def before(*_: object) -> None:
            sync(self.device)
            self._started = time.perf_counter()

        def after(*_: object) -> None:
            sync(self.device)
            self.calls.append(time.perf_counter() - self._started)

        handles = [unet.register_forward_pre_hook(before), unet.register_forward_hook(after)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


@dataclass
class StepSplit:
    """One engine run split per step into UNet and everything else (scheduler, CFG, noise, ...)."""

    steps: int
    loop_s: float
    unet_s: float

    @property
    def ms_per_step(self) -> float:
        return self.loop_s / self.steps * 1e3

    @property
    def unet_ms_per_step(self) -> float:
        return self.unet_s / self.steps * 1e3

    @property
    def non_unet_ms_per_step(self) -> float:
        return (self.loop_s - self.unet_s) / self.steps * 1e3


def split_run(engine: object, request: object, device: torch.device) -> StepSplit:
    """Run `engine.run(request)` once; from the end of step 1 to the end of the last step, the wall
    time per step and the UNet's share (one UNet call per step for the samplers measured here; for
    multi-call samplers, 'step' reads 'model call')."""
    marks: list[float] = []

    def on_step(step: int, total: int) -> None:
        sync(device)
        marks.append(time.perf_counter())

    timer = UNetTimer(device)
    with timer.attached(engine.pipeline.c.unet):  # type: ignore[attr-defined]
        engine.run(request, on_step)  # type: ignore[attr-defined]
    calls = len(marks)
    if calls < 2:
        return StepSplit(0, math.nan, math.nan)
    return StepSplit(calls - 1, marks[-1] - marks[0], sum(timer.calls[1:calls]))


@contextlib.contextmanager
def old_tree_patched(tol: float = 1e-6) -> Iterator[None]:
    """Make the engine's SDE samplers take the old torchsde tree (for the before/after rows)."""
    original = stock_module._default_brownian

    def tree(sched: object, sample: torch.Tensor) -> Noise:
        s = sched.schedule_sigmas  # type: ignore[attr-defined]
        positive = s[s > 0].float()
        on_device = getattr(sched, "brownian_on_device", False)
        device = sample.device if on_device else torch.device("cpu")
        return TorchsdeTree(sample, float(positive.min()), float(positive.max()), sched.seeds, device, tol)  # type: ignore[attr-defined]

    stock_module._default_brownian = tree  # type: ignore[assignment]
    try:
        yield
    finally:
        stock_module._default_brownian = original


def build_engine(model: str, device: torch.device, dtype: torch.dtype) -> object:
    from benchmarks.engine import load_model
    from models.engine import OutpaintEngine
    from models.pipeline import OutpaintPipeline

    return OutpaintEngine(OutpaintPipeline(load_model(model, device), device, dtype), model)


def seed_request(sampler: str, steps: int = STEPS) -> object:
    from benchmarks.engine import CASES, case_request

    return case_request(CASES["seed"], steps, sampler)


def engine_rows(args: argparse.Namespace, device: torch.device) -> tuple[list[list[object]], float, tuple[int, ...]]:
    from benchmarks.engine import CASES
    from models.canvas import working_size
    from models.devices import resolve_dtype

    engine = build_engine(args.model, device, resolve_dtype("auto", device))
    pipe = engine.pipeline  # type: ignore[attr-defined]
    case = CASES["seed"]
    w, h = working_size(*case.pad.canvas_size(case.width, case.height), pipe.native_area)
    latent = (pipe.c.vae.config.latent_channels, h // pipe.vae_scale, w // pipe.vae_scale)
    variants = [("dpmpp_2m_sde_gpu", "bridge"), ("dpmpp_2m_sde_gpu", "tree 1e-6"), ("euler", "none")]
    splits: dict[tuple[str, str], list[StepSplit]] = {v: [] for v in variants}
    for sampler, noise in variants:  # warm-up
        with old_tree_patched() if noise.startswith("tree") else contextlib.nullcontext():
            split_run(engine, seed_request(sampler), device)
    for _ in range(args.engine_repeats):  # round-robin, so drifting load hits every variant alike
        for sampler, noise in variants:
            with old_tree_patched() if noise.startswith("tree") else contextlib.nullcontext():
                splits[(sampler, noise)].append(split_run(engine, seed_request(sampler), device))
    rows = []
    unet_ms = []
    for (sampler, noise), runs in splits.items():
        unet_ms += [r.unet_ms_per_step for r in runs]
        rows.append(
            [
                f"{args.model} {w}x{h}",
                str(device),
                sampler,
                noise,
                statistics.median(r.ms_per_step for r in runs),
                statistics.median(r.unet_ms_per_step for r in runs),
                statistics.median(r.non_unet_ms_per_step for r in runs),
                f"{statistics.median(r.non_unet_ms_per_step / r.unet_ms_per_step for r in runs) * 100:.1f}%",
            ]
        )
    return rows, statistics.median(unet_ms), latent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.noise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:tiny", help="model of the engine rows (and the UNet step)")
    parser.add_argument("--devices", default="auto", help="comma-separated, e.g. cpu,cuda (auto: cpu, and cuda if any)")
    parser.add_argument("--repeats", type=int, default=None, help="timed bridge runs per row (default 7, quick 3)")
    parser.add_argument("--engine-repeats", type=int, default=None, help="timed engine runs (default 3, quick 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine more threads spin against each other)",
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.engine_repeats = args.engine_repeats or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.devices == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(d.strip()) for d in args.devices.split(",") if d.strip()]
    try:
        import torchsde  # noqa: F401

        kinds = ["tree 1e-6", "tree 1e-4", "bridge"]
    except ImportError:
        print("torchsde is not installed: the tree rows are left out")
        kinds = ["bridge"]
    print(f"# SDE noise: ms per step, {STEPS}-step Karras schedule")
    print(machine_line())
    print(
        f"torch threads {torch.get_num_threads()}; median of {args.repeats} timed runs per bridge row, "
        "1 per tree row; each after an untimed warm-up\n"
    )

    engine_tables, unet_ms, tiny_latent = [], {}, None
    for device in devices:
        rows, unet_ms[device.type], tiny_latent = engine_rows(args, device)
        engine_tables += rows
    assert tiny_latent is not None
    shapes = [tiny_latent, *SDXL_LATENTS]
    rows = []
    for device in devices:
        for shape in shapes:
            for batch in (1, 4):
                for pattern in ("2m",) if args.quick else ("2m", "sde"):
                    ms = {
                        # The trees take seconds per run at SDXL sizes on a CPU: one run is plenty.
                        k: ms_per_step(k, (batch, *shape), device, pattern, 1 if k.startswith("tree") else args.repeats)
                        for k in kinds
                    }
                    old = ms.get("tree 1e-6")
                    rows.append(
                        [
                            str(device),
                            f"{batch}x{'x'.join(map(str, shape))}",
                            pattern,
                            *(ms.get(k) for k in ("tree 1e-6", "tree 1e-4")),
                            ms["bridge"],
                            f"{old / ms['bridge']:.0f}x" if old else None,
                            f"{ms['bridge'] / unet_ms[device.type] * 100:.2f}%",
                        ]
                    )
    print(
        table(
            [
                "device",
                "latents",
                "queries",
                "tree 1e-6 ms/step (before)",
                "tree 1e-4 ms/step",
                "bridge ms/step (now)",
                "speed-up",
                f"bridge / UNet call ({args.model})",
            ],
            rows,
        )
    )
    medians = ", ".join(f"{d}: {v:.3g} ms" for d, v in unet_ms.items())
    print(f"\nUNet call of {args.model} (CFG batch 2), median: {medians}")
    print()
    print(
        table(
            [
                "engine",
                "device",
                "sampler",
                "noise",
                "ms/step",
                "UNet ms/step",
                "non-UNet ms/step",
                "non-UNet / UNet",
            ],
            engine_tables,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
