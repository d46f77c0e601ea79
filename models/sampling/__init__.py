"""ComfyUI's samplers and schedules, run on diffusers schedulers.

    sched = build_scheduler("dpmpp_2m_sde_gpu", "karras", pipe.scheduler.config, 30, seeds=[7], device=dev)

See docs/samplers.md for which class runs each name and how exactly it matches ComfyUI.
"""

from models.sampling.kdiffusion import KDiffusionScheduler
from models.sampling.noise import derive_seed
from models.sampling.samplers import MAPPINGS, build_scheduler, model_calls
from models.sampling.schedules import (
    SCHEDULE_NAMES,
    alphas_cumprod_from_config,
    compute_sigmas,
    model_sigmas,
    sampler_sigmas,
    sigma_to_timestep,
)

__all__ = [
    "MAPPINGS",
    "SCHEDULE_NAMES",
    "KDiffusionScheduler",
    "alphas_cumprod_from_config",
    "build_scheduler",
    "compute_sigmas",
    "derive_seed",
    "model_calls",
    "model_sigmas",
    "sampler_sigmas",
    "sigma_to_timestep",
]
