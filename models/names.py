"""The public names of samplers, schedules and default styles, as the contract lists them.

These live apart from their implementations so that request validation (in `server/`) and the
engine agree on one list without importing torch.
"""

from models.sampling.registry import SAMPLER_SPECS

# One entry per sampler in models/sampling/registry.py, which holds its facts.
SAMPLERS: tuple[str, ...] = tuple(SAMPLER_SPECS)

SCHEDULERS: tuple[str, ...] = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform")

DEFAULT_SAMPLER = "dpmpp_2m_sde_gpu"
DEFAULT_SCHEDULER = "karras"
DEFAULT_STYLES = "V2,Enhance,Sharp"

DEFAULT_MODEL = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
