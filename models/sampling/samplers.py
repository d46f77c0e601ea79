"""The factory that builds a scheduler per job for a ComfyUI sampler (its facts: registry.py)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import SchedulerMixin

from models.names import SCHEDULERS
from models.sampling import stock
from models.sampling.kdiffusion import PROGRAMS, make_kdiffusion
from models.sampling.registry import SAMPLER_SPECS, Noise, SamplerSpec, model_evaluations
from models.sampling.schedules import (
    SCHEDULE_NAMES,
    alphas_cumprod_from_config,
    model_sigmas,
    sampler_sigmas,
)
from models.sampling.stock import make_stock

assert tuple(SCHEDULERS) == SCHEDULE_NAMES, "models.names and the schedule implementations disagree"


def stock_class(spec: SamplerSpec) -> type[SchedulerMixin] | None:
    """The diffusers scheduler class that runs `spec`; None: one of our programs (KDiffusionScheduler)."""
    return getattr(stock, spec.implementation) if spec.module == "stock" else None


assert all(
    issubclass(getattr(stock, spec.implementation), stock.ComfySchedule)
    if spec.module == "stock"
    else spec.implementation in PROGRAMS
    for spec in SAMPLER_SPECS.values()
), "a registered sampler has no implementation"


def _check_names(sampler: str, schedule: str) -> None:
    if sampler not in SAMPLER_SPECS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLER_SPECS)}")
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
    spec = SAMPLER_SPECS[sampler]
    cls = stock_class(spec)
    if cls is None:
        sched = make_kdiffusion(base_config, sampler)
        sched.load_schedule(sigmas, list(seeds), device)
        return sched
    runner = make_stock(cls, base_config, **spec.settings)
    if spec.noise is Noise.BROWNIAN_ON_DEVICE:
        runner.brownian_on_device = True
    runner.load_schedule(sigmas, model_sigmas(alphas_cumprod), list(seeds), device)
    return runner


def model_calls(
    sampler: str, steps: int, schedule: str = "karras", base_config: Mapping[str, Any] | None = None
) -> int:
    """UNet evaluations a run makes: `len(build_scheduler(...).timesteps)` without building one, from
    the registry's evaluations per step.

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
    return model_evaluations(SAMPLER_SPECS[sampler], len(sigmas) - 1)
