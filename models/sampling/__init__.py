"""ComfyUI's samplers and schedules, run on diffusers schedulers.

    sched = build_scheduler("dpmpp_2m_sde_gpu", "karras", pipe.scheduler.config, 30, seeds=[7], device=dev)

See docs/samplers.md for which class runs each name and how exactly it matches ComfyUI. The
implementations (torch, diffusers) are imported on first use of their names, so that the torch-free
registry (`models.sampling.registry`, the samplers' names and facts) stays cheap to import.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "KDiffusionScheduler": "kdiffusion",
    "derive_seed": "noise",
    "SAMPLER_SPECS": "registry",
    "SamplerSpec": "registry",
    "sampler_spec": "registry",
    "build_scheduler": "samplers",
    "model_calls": "samplers",
    "SCHEDULE_NAMES": "schedules",
    "alphas_cumprod_from_config": "schedules",
    "compute_sigmas": "schedules",
    "model_sigmas": "schedules",
    "sampler_sigmas": "schedules",
    "sigma_to_timestep": "schedules",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'models.sampling' has no attribute {name!r}")
    return getattr(import_module(f"models.sampling.{module}"), name)
