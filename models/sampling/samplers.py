"""Which diffusers scheduler runs each ComfyUI sampler, and the factory that builds one per job."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import SchedulerMixin

from models.names import SAMPLERS, SCHEDULERS
from models.sampling.kdiffusion import PROGRAMS, dpm_adaptive_budget, dry_run_call_sigmas, make_kdiffusion
from models.sampling.schedules import (
    SCHEDULE_NAMES,
    alphas_cumprod_from_config,
    model_sigmas,
    sampler_sigmas,
)
from models.sampling.stock import (
    ComfyDPMSolverMultistep,
    ComfyDPMSolverSDE,
    ComfyEuler,
    ComfyEulerAncestral,
    ComfyHeun,
    ComfyKDPM2,
    ComfyKDPM2Ancestral,
    ComfyLMS,
    call_sigmas_for,
    make_stock,
)

assert tuple(SCHEDULERS) == SCHEDULE_NAMES, "models.names and the schedule implementations disagree"

_MULTISTEP: dict[str, Any] = {
    "final_sigmas_type": "zero",
    "euler_at_final": False,
    # k-diffusion never lowers the order before the last step; diffusers does for runs under 15
    # steps when this is on.
    "lower_order_final": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "variance_type": None,
    "lambda_min_clipped": -float("inf"),
}


@dataclass(frozen=True)
class SamplerMapping:
    """How one ComfyUI sampler name is run."""

    cls: type[SchedulerMixin] | None  # None: our KDiffusionScheduler
    overrides: dict[str, Any] = field(default_factory=dict)
    brownian_on_device: bool = False


MAPPINGS: dict[str, SamplerMapping] = {
    "euler": SamplerMapping(ComfyEuler),
    "euler_ancestral": SamplerMapping(ComfyEulerAncestral),
    "heun": SamplerMapping(ComfyHeun),
    "heunpp2": SamplerMapping(None),
    "dpm_2": SamplerMapping(ComfyKDPM2),
    "dpm_2_ancestral": SamplerMapping(ComfyKDPM2Ancestral),
    "lms": SamplerMapping(ComfyLMS),
    "dpm_fast": SamplerMapping(None),
    "dpm_adaptive": SamplerMapping(None),
    "dpmpp_2s_ancestral": SamplerMapping(None),
    "dpmpp_sde": SamplerMapping(ComfyDPMSolverSDE),
    "dpmpp_sde_gpu": SamplerMapping(ComfyDPMSolverSDE, brownian_on_device=True),
    "dpmpp_2m": SamplerMapping(
        ComfyDPMSolverMultistep,
        {**_MULTISTEP, "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
    ),
    "dpmpp_2m_sde": SamplerMapping(
        ComfyDPMSolverMultistep,
        {**_MULTISTEP, "algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
    ),
    "dpmpp_2m_sde_gpu": SamplerMapping(
        ComfyDPMSolverMultistep,
        {**_MULTISTEP, "algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
        brownian_on_device=True,
    ),
    # The 3M SDE's second step (only two past outputs yet) is k-diffusion's phi_2 form, which is
    # diffusers' "heun" second-order SDE update; the third-order update is fixed in the subclass.
    "dpmpp_3m_sde": SamplerMapping(
        ComfyDPMSolverMultistep,
        {**_MULTISTEP, "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"},
    ),
    "dpmpp_3m_sde_gpu": SamplerMapping(
        ComfyDPMSolverMultistep,
        {**_MULTISTEP, "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"},
        brownian_on_device=True,
    ),
    "ddpm": SamplerMapping(None),
}

assert tuple(MAPPINGS) == tuple(SAMPLERS), "models.names and the sampler mappings disagree"
assert all(MAPPINGS[name].cls is not None or name in PROGRAMS for name in MAPPINGS)


def _check_names(sampler: str, schedule: str) -> None:
    if sampler not in MAPPINGS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(MAPPINGS)}")
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"unknown scheduler {schedule!r}; expected one of {', '.join(SCHEDULE_NAMES)}")


def _check_steps(steps: int, base_config: Mapping[str, Any]) -> None:
    limit = int(base_config.get("num_train_timesteps", 1000))
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= limit:
        raise ValueError(f"steps must be an integer from 1 to {limit}, got {steps!r}")


def build_scheduler(
    sampler: str,
    schedule: str,
    base_config: Mapping[str, Any],
    steps: int,
    *,
    seeds: Sequence[int],
    device: torch.device | str = "cpu",
) -> SchedulerMixin:
    """A new scheduler running ComfyUI's `sampler` on ComfyUI's `schedule` for `steps` steps.

    `base_config` is the model's scheduler config (its noise table and prediction type); it is only
    read. `seeds` has one entry per batch item and seeds all of that item's step noise. The result
    is ready to use: `timesteps` holds one entry per model call (multi-evaluation samplers make
    more calls than `steps`), and `step()` needs no generator. Never share the result between jobs.
    """
    _check_names(sampler, schedule)
    _check_steps(steps, base_config)
    if not seeds or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in seeds):
        raise ValueError("seeds must be a non-empty list of integers, one per batch item")
    prediction_type = base_config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    alphas_cumprod = alphas_cumprod_from_config(base_config)
    sigmas = sampler_sigmas(sampler, schedule, alphas_cumprod, steps)
    mapping = MAPPINGS[sampler]
    if mapping.cls is None:
        sched = make_kdiffusion(base_config, sampler)
        sched.load_schedule(sigmas, list(seeds), device)
        return sched
    stock = make_stock(mapping.cls, base_config, **mapping.overrides)
    if mapping.brownian_on_device:
        stock.brownian_on_device = True
    stock.load_schedule(sigmas, model_sigmas(alphas_cumprod), list(seeds), device)
    return stock


def model_calls(
    sampler: str, steps: int, schedule: str = "karras", base_config: Mapping[str, Any] | None = None
) -> int:
    """UNet evaluations a run makes: `len(build_scheduler(...).timesteps)` without building one.

    `steps` counts schedule steps, as in ComfyUI: euler, lms, dpm++ 2M/3M and ddpm make one call per
    step; heun, dpm_2(_ancestral), dpmpp_2s_ancestral and dpmpp_sde two (one on the last step);
    heunpp2 three (two, then one on the last two steps); dpm_fast spends exactly one call per step;
    dpm_adaptive has a budget of `steps` rounded up to a multiple of 3. ddim_uniform can have one
    step more than asked (see schedules.py).
    """
    if base_config is None:
        from models.architectures import SCHEDULER as base_config
    _check_names(sampler, schedule)
    _check_steps(steps, base_config)
    sigmas = sampler_sigmas(sampler, schedule, base_config, steps)
    if MAPPINGS[sampler].cls is not None:
        return len(call_sigmas_for(sampler, sigmas))
    if sampler == "dpm_adaptive":
        return dpm_adaptive_budget(len(sigmas) - 1)
    return len(dry_run_call_sigmas(sampler, sigmas.tolist()))
