"""diffusers' own schedulers, made to run a ComfyUI sigma schedule.

Most diffusers schedulers cannot be handed an arbitrary sigma list (only EulerDiscreteScheduler
takes `sigmas=`; some take integer `timesteps=`, which they map back to sigmas by linear
interpolation, so a Karras schedule does not survive the trip). The subclasses here take a freshly
constructed stock instance (whose constructor has already run `set_timesteps` once, so every
attribute exists), overwrite its sigma arrays with the schedule in the class's own layout
(interleaved for the two-stage ones), reset its per-run state, and keep the stock `step` math.
What they add:

- `timesteps` are the ones ComfyUI feeds the UNet: the nearest training timestep of each model
  call's sigma (diffusers would pass a fractional timestep).
- step noise comes from per-sample seeded sources (see `noise.py`); the pipeline passes no generator.
- `step` runs in float32 whatever the latents' dtype, and casts back.
- `add_noise` uses the noise level of the latents the scheduler will hand to the next model call
  (the midpoint for the two-stage samplers), which is what re-imposing a known region needs.

Where the stock update itself departs from ComfyUI it is corrected in the subclass and said so.
"""

from __future__ import annotations

import copy
import inspect
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    SchedulerMixin,
)
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from models.sampling.noise import BrownianNoise, NoiseSampler, step_generators
from models.sampling.schedules import sigma_to_timestep

# Settings that would make a stock class compute its own sigmas, clip, threshold or otherwise
# depart from the k-diffusion update; always overridden whatever the model's config says.
_NEUTRAL: dict[str, Any] = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "timestep_type": "discrete",
    "clip_sample": False,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}


_PROTOTYPES: dict[tuple[type, str], SchedulerMixin] = {}
_PROTOTYPES_LOCK = threading.Lock()


def make_stock(cls: type[SchedulerMixin], base_config: Mapping[str, Any], **overrides: Any) -> Any:
    """A new `cls` configured from the model's scheduler config (only the keys `cls` accepts).

    Some stock constructors run a 1000-step `set_timesteps` (KDPM2 takes ~0.5 s), so each
    configuration is constructed once and every job gets a deep copy of that untouched prototype.
    """
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in base_config.items() if k in accepted}
    kwargs.update({k: v for k, v in _NEUTRAL.items() if k in accepted})
    kwargs.update(overrides)
    key = (cls, repr(sorted(kwargs.items())))
    with _PROTOTYPES_LOCK:
        prototype = _PROTOTYPES.get(key)
        if prototype is None:
            prototype = _PROTOTYPES[key] = cls(**kwargs)
    return copy.deepcopy(prototype)


def _interleave(values: torch.Tensor, *, drop_last_pair: bool) -> torch.Tensor:
    # diffusers' two-stage layout: [v0, v1, v1, v2, v2, ...]; Heun and DPMSolverSDE stop the
    # repetition one entry earlier than KDPM2.
    middle = values[1:-1] if drop_last_pair else values[1:]
    return torch.cat([values[:1], middle.repeat_interleave(2), values[-1:]])


def _geometric_mid(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (0.5 * (a.log() + b.log())).exp()


def _ancestral(sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's ancestral split for eta = 1: (sigma_down, sigma_up)."""
    up = torch.minimum(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2).sqrt())
    return (sigma_to**2 - up**2).sqrt(), up


# Where a two-stage class evaluates the model a second time within the step from sigma to sigma_next.
SecondCall = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _at_next(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    return sigma_next


def _at_ancestral_mid(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    return _geometric_mid(sigma, _ancestral(sigma, sigma_next)[0])


def call_sigmas_for(sigmas: torch.Tensor, second: SecondCall | None = None) -> torch.Tensor:
    """The sigma of each model call a class makes for a schedule (float64): one per step, plus, for a
    two-stage class, its `second` within every step but the one into sigma 0."""
    s = sigmas.to(torch.float64)
    out: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        out.append(s[i])
        nxt = s[i + 1]
        if second is not None and nxt > 0:
            out.append(second(s[i], nxt))
    return torch.stack(out)


class ComfySchedule:
    """Mixin: bookkeeping shared by the stock subclasses (k-diffusion parameterisation)."""

    call_sigmas: torch.Tensor
    seeds: list[int]
    _step_index: int | None

    def _attach(
        self,
        sigmas: torch.Tensor,
        call_sigmas: torch.Tensor,
        table_sigmas: torch.Tensor,
        seeds: Sequence[int],
        device: torch.device | str,
    ) -> None:
        self.schedule_sigmas = sigmas.to(torch.float64).cpu()
        self.call_sigmas = call_sigmas.to(torch.float64).cpu()
        self.seeds = [int(s) for s in seeds]
        self.timesteps = sigma_to_timestep(self.call_sigmas, table_sigmas).to(device=device, dtype=torch.float32)
        self.num_inference_steps = len(sigmas) - 1
        self._step_index = None
        self.set_begin_index(0)  # type: ignore[attr-defined]

    @property
    def calls_done(self) -> int:
        return 0 if self._step_index is None else int(self._step_index)

    @property
    def latent_sigma(self) -> float:
        """Noise level of the latents between calls: the next call's sigma, or 0 once done."""
        k = self.calls_done
        return float(self.call_sigmas[k]) if k < len(self.call_sigmas) else float(self.schedule_sigmas[-1])

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        # `timesteps` is accepted for the diffusers signature; the level is the scheduler's state.
        return original_samples + noise * self.latent_sigma


def _f32_step(
    step: Any,
    model_output: torch.Tensor,
    timestep: Any,
    sample: torch.Tensor,
    return_dict: bool,
    **kwargs: Any,
) -> Any:
    dtype = sample.dtype
    out = step(model_output.float(), timestep, sample.float(), return_dict=False, **kwargs)
    prev = out[0].to(dtype)
    if return_dict:
        return SchedulerOutput(prev_sample=prev)
    return (prev, *out[1:])


class ComfyEulerAncestral(ComfySchedule, EulerAncestralDiscreteScheduler):
    """euler_ancestral: the stock update (eta = 1) with seeded per-sample Gaussian noise."""

    def load_schedule(
        self, sigmas: torch.Tensor, table_sigmas: torch.Tensor, seeds: Sequence[int], device: Any
    ) -> None:
        self.sigmas = sigmas.to(torch.float32).cpu()
        self.step_generators = step_generators(seeds)
        self._attach(sigmas, call_sigmas_for(sigmas), table_sigmas, seeds, device)

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: Any = None,
        return_dict: bool = True,
    ) -> Any:
        # k-diffusion skips the draw on the last step (sigma_up = 0 there); the stock class draws
        # and multiplies by 0. Same numbers; only the stream's position after the run differs.
        step = super().step
        return _f32_step(step, model_output, timestep, sample, return_dict, generator=self.step_generators)


class ComfyHeun(ComfySchedule, HeunDiscreteScheduler):
    """heun: the stock 2nd-order update; its last step (to sigma 0) is Euler, as in k-diffusion."""

    def load_schedule(
        self, sigmas: torch.Tensor, table_sigmas: torch.Tensor, seeds: Sequence[int], device: Any
    ) -> None:
        self.sigmas = _interleave(sigmas.to(torch.float32).cpu(), drop_last_pair=True)
        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self._attach(sigmas, call_sigmas_for(sigmas, _at_next), table_sigmas, seeds, device)

    def step(  # type: ignore[override]
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True
    ) -> Any:
        return _f32_step(super().step, model_output, timestep, sample, return_dict)


class ComfyKDPM2(ComfySchedule, KDPM2DiscreteScheduler):
    """dpm_2: the stock DPM-Solver-2 step with the log-space midpoint; Euler into sigma 0."""

    def load_schedule(
        self, sigmas: torch.Tensor, table_sigmas: torch.Tensor, seeds: Sequence[int], device: Any
    ) -> None:
        s = sigmas.to(torch.float32).cpu()
        interpol = s.log().lerp(s.roll(1).log(), 0.5).exp()  # midpoint between s[k-1] and s[k]
        self.sigmas = _interleave(s, drop_last_pair=False)
        self.sigmas_interpol = _interleave(interpol, drop_last_pair=False)
        self.sample = None
        self._attach(sigmas, call_sigmas_for(sigmas, _geometric_mid), table_sigmas, seeds, device)

    def step(  # type: ignore[override]
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True
    ) -> Any:
        return _f32_step(super().step, model_output, timestep, sample, return_dict)


class ComfyKDPM2Ancestral(ComfySchedule, KDPM2AncestralDiscreteScheduler):
    """dpm_2_ancestral: the stock update with seeded per-sample Gaussian noise."""

    def load_schedule(
        self, sigmas: torch.Tensor, table_sigmas: torch.Tensor, seeds: Sequence[int], device: Any
    ) -> None:
        s = sigmas.to(torch.float32).cpu()
        nxt = s.roll(-1)
        nxt[-1] = 0.0
        up = (nxt**2 * (s**2 - nxt**2) / s**2) ** 0.5
        down = (nxt**2 - up**2) ** 0.5
        down[-1] = 0.0
        interpol = s.log().lerp(down.log(), 0.5).exp()
        interpol[-2:] = 0.0  # the step into sigma 0 is a plain Euler step
        self.sigmas = _interleave(s, drop_last_pair=False)
        self.sigmas_interpol = _interleave(interpol, drop_last_pair=False)
        self.sigmas_up = _interleave(up, drop_last_pair=False)
        self.sigmas_down = _interleave(down, drop_last_pair=False)
        self.sample = None
        self.step_generators = step_generators(seeds)
        self._attach(sigmas, call_sigmas_for(sigmas, _at_ancestral_mid), table_sigmas, seeds, device)

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: Any = None,
        return_dict: bool = True,
    ) -> Any:
        step = super().step
        return _f32_step(step, model_output, timestep, sample, return_dict, generator=self.step_generators)


class ComfyLMS(ComfySchedule, LMSDiscreteScheduler):
    """lms (order 4): the stock update, except that the step into sigma 0 returns the denoised
    prediction, as ComfyUI's sample_lms does. The stock class integrates the Lagrange polynomial
    down to 0 instead (as older k-diffusion did)."""

    def load_schedule(
        self, sigmas: torch.Tensor, table_sigmas: torch.Tensor, seeds: Sequence[int], device: Any
    ) -> None:
        self.sigmas = sigmas.to(torch.float32).cpu()
        self.derivatives = []
        self._attach(sigmas, call_sigmas_for(sigmas), table_sigmas, seeds, device)

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        order: int = 4,
        return_dict: bool = True,
    ) -> Any:
        last = self.calls_done == len(self.call_sigmas) - 1 and float(self.schedule_sigmas[-1]) == 0.0

        def lms_step(mo: torch.Tensor, t: Any, x: torch.Tensor, return_dict: bool = False) -> tuple:
            prev, denoised = LMSDiscreteScheduler.step(self, mo, t, x, order=order, return_dict=False)
            return (denoised if last else prev, denoised)

        return _f32_step(lms_step, model_output, timestep, sample, return_dict)


class ComfyDPMSolverSDE(ComfySchedule, DPMSolverSDEScheduler):
    """dpmpp_sde(_gpu): the stock DPM-Solver++ SDE step (r = 1/2, eta = 1) with our Brownian noise."""

    brownian_on_device: bool = False

    def load_schedule(
        self, sigmas: torch.Tensor, table_sigmas: torch.Tensor, seeds: Sequence[int], device: Any
    ) -> None:
        self.sigmas = _interleave(sigmas.to(torch.float32).cpu(), drop_last_pair=True)
        self.sample = None
        self.mid_point_sigma = None
        self.noise_sampler: NoiseSampler | None = None
        self._attach(sigmas, call_sigmas_for(sigmas, _geometric_mid), table_sigmas, seeds, device)

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        return_dict: bool = True,
        s_noise: float = 1.0,
    ) -> Any:
        if self.noise_sampler is None:
            self.noise_sampler = _default_brownian(self, sample)
        return _f32_step(super().step, model_output, timestep, sample, return_dict, s_noise=s_noise)


def _default_brownian(sched: ComfySchedule, sample: torch.Tensor) -> BrownianNoise:
    s = sched.schedule_sigmas
    # Pinned at the smallest sigma (float32, as the sigmas it is queried at): see BrownianNoise.
    anchor = float(s[s > 0].min().float())
    state_device = sample.device if getattr(sched, "brownian_on_device", False) else torch.device("cpu")
    return BrownianNoise(sample, anchor, sched.seeds, state_device)


class ComfyDPMSolverMultistep(ComfySchedule, DPMSolverMultistepScheduler):
    """dpmpp_2m, dpmpp_2m_sde(_gpu), dpmpp_3m_sde(_gpu).

    Runs in diffusers' variance-preserving parameterisation (latents divided by sqrt(1 + sigma^2)),
    which is the same update written in other variables; `scale_model_input` and
    `init_noise_sigma` are the stock VP ones and `add_noise` returns VP latents too. The SDE
    variants take their noise from `BrownianNoise` (`variance_noise`; a generator or noise passed
    by the caller is ignored). For solver_order 3 the third-order SDE update is replaced (below).
    """

    brownian_on_device: bool = False

    def load_schedule(
        self, sigmas: torch.Tensor, table_sigmas: torch.Tensor, seeds: Sequence[int], device: Any
    ) -> None:
        self.sigmas = sigmas.to(torch.float32).cpu()
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self.noise_sampler: NoiseSampler | None = None
        self._attach(sigmas, call_sigmas_for(sigmas), table_sigmas, seeds, device)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self.latent_sigma
        return (original_samples + noise * sigma) / math.sqrt(1.0 + sigma * sigma)

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: Any = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        kwargs: dict[str, Any] = {}
        if self.config.algorithm_type == "sde-dpmsolver++":
            k = self.calls_done
            sigma, sigma_next = self.sigmas[k], self.sigmas[k + 1]
            if sigma_next > 0:
                if self.noise_sampler is None:
                    self.noise_sampler = _default_brownian(self, sample)
                kwargs["variance_noise"] = self.noise_sampler(float(sigma), float(sigma_next))
            else:
                # The step into sigma 0 returns the denoised prediction; no noise is drawn.
                kwargs["variance_noise"] = torch.zeros(sample.shape, dtype=torch.float32, device=sample.device)
        return _f32_step(super().step, model_output, timestep, sample, return_dict, **kwargs)

    def multistep_dpm_solver_third_order_update(  # type: ignore[override]
        self,
        model_output_list: list[torch.Tensor],
        *args: Any,
        sample: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """DPM-Solver++(3M) SDE as published in k-diffusion / ComfyUI.

        diffusers 0.42's sde-dpmsolver++ third-order branch gives the second-difference term D2 the
        coefficient alpha_t * ((1 - e^{-2h} - 2h) / (2h)^2 - 0.5); the published update subtracts
        alpha_t * phi_3 with phi_3 = (e^{-2h} - 1 + 2h) / (2h)^2 - 0.5, i.e. the same first part but
        +0.5 instead of -0.5. With eta = 1, h_eta = 2h.
        """
        if self.config.algorithm_type != "sde-dpmsolver++":
            return super().multistep_dpm_solver_third_order_update(
                model_output_list, *args, sample=sample, noise=noise, **kwargs
            )
        assert sample is not None and noise is not None
        k = self.calls_done
        sig = [self.sigmas[k + 1], self.sigmas[k], self.sigmas[k - 1], self.sigmas[k - 2]]
        lam = [-s.double().log() for s in sig]  # half log-SNR in the k-diffusion variables
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sig[0])
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(sig[1])
        h, h_0, h_1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
        r0, r1 = float(h_0 / h), float(h_1 / h)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d1_0 = (m0 - m1) / r0
        d1_1 = (m1 - m2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
        d2 = (d1_0 - d1_1) / (r0 + r1)
        h_eta = 2.0 * float(h)
        phi_1 = -math.expm1(-h_eta)
        phi_2 = math.expm1(-h_eta) / h_eta + 1.0
        phi_3 = phi_2 / h_eta - 0.5
        a_t, s_t, s_s0 = float(alpha_t), float(sigma_t), float(sigma_s0)
        return (
            (s_t / s_s0 * math.exp(-float(h))) * sample
            + (a_t * phi_1) * m0
            + (a_t * phi_2) * d1
            - (a_t * phi_3) * d2
            + (s_t * math.sqrt(phi_1)) * noise
        )


class ComfyEuler(ComfySchedule, EulerDiscreteScheduler):
    """euler: the stock class, given the schedule through its own `sigmas=` argument."""

    def load_schedule(
        self, sigmas: torch.Tensor, table_sigmas: torch.Tensor, seeds: Sequence[int], device: Any
    ) -> None:
        self.set_timesteps(sigmas=sigmas.to(torch.float32).tolist(), device=device)
        self._attach(sigmas, call_sigmas_for(sigmas), table_sigmas, seeds, device)
