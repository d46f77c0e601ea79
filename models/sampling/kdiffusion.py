"""Our own diffusers scheduler for the ComfyUI samplers diffusers has no class for.

heunpp2, dpm_fast, dpm_adaptive and dpmpp_2s_ancestral have no diffusers counterpart, and ComfyUI's
ddpm runs at arbitrary sigmas (DDPMScheduler only knows integer training timesteps). Each is
written here as a Python generator in the style of a k-diffusion sampling loop: it yields
`(latents, sigma)` whenever it needs the model and receives `(latents, denoised)` back. The
`KDiffusionScheduler` drives that generator one model call per `step()`, so the pipeline's plain
loop over `timesteps` works for multi-evaluation samplers too.

The generator receives the latents the pipeline actually passed to `step` (it may have re-imposed
a known region since the last call) and treats them as the state at that evaluation, as the
stock diffusers schedulers do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from models.sampling.noise import NoiseSampler, gaussian_like, step_generators
from models.sampling.registry import SAMPLER_SPECS, Noise, model_evaluations, sampler_spec
from models.sampling.schedules import model_sigmas, sigma_to_timestep

# What a sampler program yields (latents to evaluate, their sigma) and is sent back
# (latents actually evaluated, denoised prediction); it returns the final latents.
Program = Generator[tuple[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor], torch.Tensor]
ProgramFn = Callable[[torch.Tensor, Sequence[float], NoiseSampler, int], Program]


def _evaluate(x: torch.Tensor, sigma: float) -> Generator[tuple[torch.Tensor, float], Any, Any]:
    x_seen, denoised = yield x, sigma
    return x_seen, denoised


def _ancestral_step(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) for eta = 1."""
    if sigma_to == 0:
        return 0.0, 0.0
    up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def heunpp2(x: torch.Tensor, sigmas: Sequence[float], noise: NoiseSampler, budget: int) -> Program:
    """Heun++ (ComfyUI sample_heunpp2): 3 evaluations per step, 2 on the next-to-last, 1 on the last."""
    s = list(sigmas)
    s_end = s[-1]
    for i in range(len(s) - 1):
        x, den = yield from _evaluate(x, s[i])
        d = (x - den) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == s_end:
            x = x + d * dt
        elif s[i + 2] == s_end:
            x_2, den_2 = yield from _evaluate(x + d * dt, s[i + 1])
            d_2 = (x_2 - den_2) / s[i + 1]
            w2 = s[i + 1] / (2 * s[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2, den_2 = yield from _evaluate(x + d * dt, s[i + 1])
            d_2 = (x_2 - den_2) / s[i + 1]
            x_3, den_3 = yield from _evaluate(x_2 + d_2 * (s[i + 2] - s[i + 1]), s[i + 2])
            d_3 = (x_3 - den_3) / s[i + 2]
            w2 = s[i + 1] / (3 * s[0])
            w3 = s[i + 2] / (3 * s[0])
            x = x + (d * (1 - w2 - w3) + d_2 * w2 + d_3 * w3) * dt
    return x


def dpmpp_2s_ancestral(x: torch.Tensor, sigmas: Sequence[float], noise: NoiseSampler, budget: int) -> Program:
    """DPM-Solver++(2S) with ancestral noise, eta = 1 (ComfyUI sample_dpmpp_2s_ancestral)."""
    s = list(sigmas)
    for i in range(len(s) - 1):
        x, den = yield from _evaluate(x, s[i])
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1])
        if sigma_down == 0:
            x = den  # Euler into sigma 0: x + (x - den) / s * (0 - s)
        else:
            h = math.log(s[i]) - math.log(sigma_down)  # in t = -log(sigma)
            sigma_mid = math.exp(-(-math.log(s[i]) + 0.5 * h))
            x_2 = (sigma_mid / s[i]) * x - math.expm1(-0.5 * h) * den
            _, den_2 = yield from _evaluate(x_2, sigma_mid)
            x = (sigma_down / s[i]) * x - math.expm1(-h) * den_2
        if s[i + 1] > 0:
            x = x + noise(s[i], s[i + 1]) * sigma_up
    return x


def ddpm(x: torch.Tensor, sigmas: Sequence[float], noise: NoiseSampler, budget: int) -> Program:
    """Ancestral DDPM posterior sampling at arbitrary sigmas (ComfyUI sample_ddpm)."""
    s = list(sigmas)
    for i in range(len(s) - 1):
        x, den = yield from _evaluate(x, s[i])
        sigma, sigma_prev = s[i], s[i + 1]
        eps = (x - den) / sigma
        x_vp = x / math.sqrt(1.0 + sigma**2)
        abar = 1.0 / (sigma**2 + 1.0)
        abar_prev = 1.0 / (sigma_prev**2 + 1.0)
        alpha = abar / abar_prev
        mu = math.sqrt(1.0 / alpha) * (x_vp - (1 - alpha) * eps / math.sqrt(1 - abar))
        if sigma_prev > 0:
            mu = mu + math.sqrt((1 - alpha) * (1.0 - abar_prev) / (1.0 - abar)) * noise(sigma, sigma_prev)
            x = mu * math.sqrt(1.0 + sigma_prev**2)
        else:
            x = mu
    return x


def _fast_bounds(sigmas: Sequence[float]) -> tuple[float, float]:
    # ComfyUI's KSAMPLER hands dpm_fast/dpm_adaptive only sigma_max = sigmas[0] and sigma_min =
    # the last non-zero sigma; the shape of the schedule in between is not used.
    s_min = sigmas[-2] if sigmas[-1] == 0 and len(sigmas) > 1 else sigmas[-1]
    return s_min, sigmas[0]


class _DPMSolver:
    """DPM-Solver single-step updates in t = -log(sigma) (k-diffusion's DPMSolver class)."""

    @staticmethod
    def sigma(t: float) -> float:
        return math.exp(-t)

    def eps(self, x: torch.Tensor, t: float) -> Generator[Any, Any, tuple[torch.Tensor, torch.Tensor]]:
        x_seen, den = yield from _evaluate(x, self.sigma(t))
        return x_seen, (x_seen - den) / self.sigma(t)

    def first(self, x: torch.Tensor, t: float, t_next: float, eps: torch.Tensor) -> torch.Tensor:
        return x - self.sigma(t_next) * math.expm1(t_next - t) * eps

    def second(
        self,
        x: torch.Tensor,
        t: float,
        t_next: float,
        eps: torch.Tensor,
        r1: float,
        cache: dict[str, torch.Tensor],
    ) -> Generator[Any, Any, torch.Tensor]:
        h = t_next - t
        s1 = t + r1 * h
        if "eps_r1" not in cache:
            u1 = x - self.sigma(s1) * math.expm1(r1 * h) * eps
            _, cache["eps_r1"] = yield from self.eps(u1, s1)
        eps_r1 = cache["eps_r1"]
        return (
            x
            - self.sigma(t_next) * math.expm1(h) * eps
            - self.sigma(t_next) / (2 * r1) * math.expm1(h) * (eps_r1 - eps)
        )

    def third(
        self, x: torch.Tensor, t: float, t_next: float, eps: torch.Tensor, cache: dict[str, torch.Tensor]
    ) -> Generator[Any, Any, torch.Tensor]:
        r1, r2 = 1 / 3, 2 / 3
        h = t_next - t
        s1, s2 = t + r1 * h, t + r2 * h
        if "eps_r1" not in cache:
            u1 = x - self.sigma(s1) * math.expm1(r1 * h) * eps
            _, cache["eps_r1"] = yield from self.eps(u1, s1)
        eps_r1 = cache["eps_r1"]
        u2 = (
            x
            - self.sigma(s2) * math.expm1(r2 * h) * eps
            - self.sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps)
        )
        _, eps_r2 = yield from self.eps(u2, s2)
        return (
            x
            - self.sigma(t_next) * math.expm1(h) * eps
            - self.sigma(t_next) / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)
        )


def dpm_fast(x: torch.Tensor, sigmas: Sequence[float], noise: NoiseSampler, budget: int) -> Program:
    """DPM-Solver-Fast, eta = 0 (ComfyUI sample_dpm_fast): `len(sigmas) - 1` model evaluations
    spread over orders 3, ..., 3, then 2 and 1 or the remainder, on a uniform grid in log-sigma from
    sigma_max to sigma_min. It stops at sigma_min (no final denoise), as ComfyUI does."""
    s_min, s_max = _fast_bounds(sigmas)
    nfe = len(sigmas) - 1
    solver = _DPMSolver()
    t_start, t_end = -math.log(s_max), -math.log(s_min)
    m = nfe // 3 + 1
    grid = torch.linspace(t_start, t_end, m + 1, dtype=torch.float64).tolist()
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        t, t_next = grid[i], grid[i + 1]
        x, eps = yield from solver.eps(x, t)
        if order == 1:
            x = solver.first(x, t, t_next, eps)
        elif order == 2:
            x = yield from solver.second(x, t, t_next, eps, 1 / 2, {})
        else:
            x = yield from solver.third(x, t, t_next, eps, {})
    return x


class _PID:
    """k-diffusion's PID step-size controller with dpm_adaptive's defaults (I controller, order 3)."""

    def __init__(self, h: float, order: float, accept_safety: float = 0.81, eps: float = 1e-8) -> None:
        self.h = h
        self.b1 = 1.0 / order  # (pcoeff + icoeff + dcoeff) / order with (0, 1, 0)
        self.accept_safety = accept_safety
        self.eps = eps

    def propose(self, error: float) -> bool:
        factor = (1.0 / (error + self.eps)) ** self.b1
        factor = 1.0 + math.atan(factor - 1.0)
        self.h *= factor
        return factor >= self.accept_safety


# The programs' arithmetic runs in float64: the latents are small next to the UNet, and
# dpm_adaptive's error estimate is a difference of two nearly equal solutions, which float32
# resolves to only a few digits (its step sizes then wander by ~0.1%).
_WORK_DTYPE = torch.float64

ADAPTIVE_RTOL = 0.05
ADAPTIVE_ATOL = 0.0078
ADAPTIVE_H_INIT = 0.05
_MAX_GROWTH = 1.0 + math.pi / 2  # supremum of the controller's step factor 1 + atan(f - 1)


def dpm_adaptive(x: torch.Tensor, sigmas: Sequence[float], noise: NoiseSampler, budget: int) -> Program:
    """DPM-Solver-23 with adaptive step size, eta = 0 (ComfyUI sample_dpm_adaptive defaults:
    rtol 0.05, atol 0.0078, h_init 0.05, I-controller, accept_safety 0.81), run within a budget.

    ComfyUI lets the controller take as many evaluations as it likes. Here the run has `budget`
    evaluations, 3 per attempt. The controller runs unchanged as long as it could still reach
    sigma_min in the attempts left, even growing its step at the controller's maximum rate
    (x (1 + pi/2) per attempt) with every attempt accepted. Once even that is impossible, i.e.
    ComfyUI's run provably would not fit, the rest of the interval is split evenly over the
    attempts left and each of those steps is accepted whatever its error estimate, so the last
    attempt lands on sigma_min. A run that fits is exactly ComfyUI's; the evaluations left over
    once sigma_min is reached are spent idle (the latents come back unchanged) so that `timesteps`
    keeps its announced length. As in ComfyUI the error norm is taken over the whole batch, so the
    items of a batch share their step sizes.
    """
    s_min, s_max = _fast_bounds(sigmas)
    solver = _DPMSolver()
    s, t_end = -math.log(s_max), -math.log(s_min)
    attempts = budget // 3
    pid = _PID(ADAPTIVE_H_INIT, order=3)
    x_prev = x
    while s < t_end - 1e-5 and attempts > 0:
        remaining = t_end - s
        reachable = pid.h * (_MAX_GROWTH**attempts - 1) / (_MAX_GROWTH - 1)
        forced = reachable < remaining
        t = s + remaining / attempts if forced else min(t_end, s + pid.h)
        cache: dict[str, torch.Tensor] = {}
        x, eps = yield from solver.eps(x, s)
        x_low = yield from solver.second(x, s, t, eps, 1 / 3, cache)
        x_high = yield from solver.third(x, s, t, eps, cache)
        delta = torch.clamp(ADAPTIVE_RTOL * torch.maximum(x_low.abs(), x_prev.abs()), min=ADAPTIVE_ATOL)
        error = float(torch.linalg.norm((x_low - x_high) / delta)) / x.numel() ** 0.5
        accepted = pid.propose(error)
        if accepted or forced:
            x_prev = x_low
            x = x_high
            s = t
        attempts -= 1
    for _ in range(3 * attempts):
        yield from _evaluate(x, solver.sigma(s))
    return x


# By name, as the registry's "kdiffusion.<program>" entries name them.
PROGRAMS: dict[str, ProgramFn] = {
    "heunpp2": heunpp2,
    "dpm_fast": dpm_fast,
    "dpm_adaptive": dpm_adaptive,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "ddpm": ddpm,
}


def program_of(sampler: str) -> ProgramFn | None:
    """The program that runs `sampler`; None: the registry runs it otherwise, or has no such name."""
    spec = SAMPLER_SPECS.get(sampler)
    return PROGRAMS.get(spec.implementation) if spec is not None and spec.module == "kdiffusion" else None


def dry_run_call_sigmas(sampler: str, sigmas: Sequence[float]) -> list[float]:
    """The sigma of every model call a fixed-plan program makes (it does not depend on the data)."""
    if sampler_spec(sampler).adaptive:
        raise ValueError(f"{sampler} chooses its evaluation points while it runs")
    run = program_of(sampler)
    assert run is not None, sampler
    program = run(torch.zeros(1, dtype=torch.float64), sigmas, lambda a, b: torch.zeros(1), 0)
    calls: list[float] = []
    try:
        x, sigma = next(program)
        while True:
            calls.append(sigma)
            x, sigma = program.send((x, torch.zeros_like(x)))
    except StopIteration:
        return calls


class KDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs one of the `PROGRAMS` on a ComfyUI sigma schedule.

    Latents are in the k-diffusion parameterisation (x = x0 + sigma * noise); the UNet input is
    x / sqrt(sigma^2 + 1) and `timesteps` are ComfyUI's (nearest training timestep of each call's
    sigma). One `step()` per model call; `len(timesteps)` is the number of calls.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        sampler: str = "heunpp2",
    ) -> None:
        if program_of(sampler) is None:
            raise ValueError(f"KDiffusionScheduler has no sampler {sampler!r}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.table_sigmas = model_sigmas(dict(self.config))
        self.timesteps = torch.zeros(0)
        self.sigmas = torch.zeros(0, dtype=torch.float64)
        self.seeds: list[int] = []
        self.step_generators: list[torch.Generator] = []
        self.noise_sampler: NoiseSampler | None = None
        self.num_inference_steps: int | None = None
        self._begin_index: int | None = None
        self._reset()

    def _reset(self) -> None:
        self._program: Program | None = None
        self._pending: tuple[torch.Tensor, float] | None = None
        self._calls = 0
        self._final_sigma = 0.0
        self.finished = False

    # --- setup -------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """diffusers-style entry point: the ComfyUI "normal" schedule for `num_inference_steps`."""
        from models.sampling.schedules import compute_sigmas

        self.load_schedule(compute_sigmas("normal", dict(self.config), num_inference_steps), [0], device or "cpu")

    def load_schedule(self, sigmas: torch.Tensor, seeds: Sequence[int], device: torch.device | str) -> None:
        """Run the sampler on `sigmas` (with trailing zero); `seeds` seed the step noise per item."""
        self._reset()
        sampler = self.config.sampler
        self.sigmas = sigmas.to(torch.float64).cpu()
        self.num_inference_steps = len(sigmas) - 1
        self.seeds = [int(s) for s in seeds]
        spec = sampler_spec(sampler)
        self.step_generators = step_generators(self.seeds) if spec.noise is Noise.GAUSSIAN else []
        sig_list = self.sigmas.tolist()
        if spec.adaptive:
            self._budget = model_evaluations(spec, self.num_inference_steps)
            s_min, s_max = _fast_bounds(sig_list)
            # Placeholders until each evaluation point is chosen; overwritten in place as the run
            # goes (see `step`). A log-uniform ramp keeps them monotone and plausible.
            call_sigmas = torch.logspace(math.log10(s_max), math.log10(s_min), self._budget, dtype=torch.float64)
            self._final_sigma = s_min
        else:
            self._budget = 0
            call_sigmas = torch.tensor(dry_run_call_sigmas(sampler, sig_list), dtype=torch.float64)
            self._final_sigma = _fast_bounds(sig_list)[0] if sampler == "dpm_fast" else sig_list[-1]
        self.call_sigmas = call_sigmas
        self.timesteps = sigma_to_timestep(call_sigmas, self.table_sigmas).to(device=device, dtype=torch.float32)
        self._begin_index = 0

    # --- diffusers scheduler interface ------------------------------------------------------------

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    @property
    def step_index(self) -> int:
        return self._calls

    @property
    def init_noise_sigma(self) -> float:
        # Pure-noise start for a full-strength run, as ComfyUI scales it (and diffusers' Euler
        # with "leading" spacing): sqrt(sigma_max^2 + 1).
        return math.sqrt(float(self.sigmas[0]) ** 2 + 1.0)

    @property
    def latent_sigma(self) -> float:
        """Noise level of the latents between calls: the next call's sigma (0, or sigma_min for
        dpm_fast / dpm_adaptive, once done)."""
        if self._pending is not None:
            return self._pending[1]
        if self.finished:
            return self._final_sigma
        return float(self.sigmas[0])

    def _start(self, sample: torch.Tensor) -> None:
        x = sample.to(_WORK_DTYPE)
        self._like = x
        run = program_of(self.config.sampler)
        assert run is not None
        program = run(x, self.sigmas.tolist(), self._noise, self._budget)
        self._program = program
        self._pending = next(program)

    def _noise(self, sigma: float, sigma_next: float) -> torch.Tensor:
        if self.noise_sampler is not None:
            return self.noise_sampler(sigma, sigma_next)
        return gaussian_like(self._like, self.step_generators)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        # Only scales: `sample` may be the CFG-doubled batch, so it must not start the program.
        return sample / math.sqrt(self.latent_sigma**2 + 1.0)

    def _denoised(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: float) -> torch.Tensor:
        if self.config.prediction_type == "epsilon":
            return sample - sigma * model_output
        return sample / (sigma**2 + 1.0) - model_output * (sigma / math.sqrt(sigma**2 + 1.0))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        return_dict: bool = True,
        **unused: Any,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        if self.finished:
            raise RuntimeError("step() called after the last timestep")
        if self._program is None:
            self._start(sample)
        assert self._program is not None and self._pending is not None
        dtype = sample.dtype
        x = sample.to(_WORK_DTYPE)
        sigma = self._pending[1]
        denoised = self._denoised(model_output.to(_WORK_DTYPE), x, sigma)
        try:
            self._pending = self._program.send((x, denoised))
            out = self._pending[0]
        except StopIteration as stop:
            self._pending = None
            self.finished = True
            out = stop.value
        self._calls += 1
        if self._pending is not None and sampler_spec(self.config.sampler).adaptive:
            # Written in place: iterating a tensor yields views of its storage, so a loop already
            # running over `timesteps` sees the newly chosen point before it calls the UNet.
            t_next = sigma_to_timestep(self._pending[1], self.table_sigmas)
            self.timesteps[self._calls] = t_next.to(self.timesteps.device, self.timesteps.dtype)[0]
            self.call_sigmas[self._calls] = self._pending[1]
        prev = out.to(dtype)
        if not return_dict:
            return prev, denoised.to(dtype)
        return SchedulerOutput(prev_sample=prev)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        # `timesteps` is accepted for the diffusers signature; the level is the scheduler's state.
        return original_samples + noise * self.latent_sigma

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)


def make_kdiffusion(base_config: Mapping[str, Any], sampler: str) -> KDiffusionScheduler:
    keys = (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "prediction_type",
    )
    kwargs = {k: base_config[k] for k in keys if k in base_config}
    return KDiffusionScheduler(sampler=sampler, **kwargs)
