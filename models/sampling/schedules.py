"""The model's noise table and the six ComfyUI noise schedules computed from it.

Everything here works in the "k-diffusion" parameterisation: a latent at noise level `sigma` is
`x = x0 + sigma * noise`, and `sigma(t) = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])` for
the model's training timesteps `t = 0 .. N-1`. The table is computed in float64 from the scheduler
config, as ComfyUI computes it, so the model's own sigma_min (t = 0) and sigma_max (t = N-1) are
the end points of every schedule; no diffusers `timestep_spacing` is involved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from models.sampling.registry import sampler_spec

SCHEDULE_NAMES: tuple[str, ...] = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform")

KARRAS_RHO = 7.0


@lru_cache(maxsize=32)
def _alphas_cumprod_cached(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: tuple[float, ...] | None,
) -> np.ndarray:
    n = num_train_timesteps
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    else:
        raise ValueError(f"unsupported beta_schedule {beta_schedule!r}")
    table = np.cumprod(1.0 - betas)
    # Shared between jobs through the cache: make accidental in-place edits fail loudly.
    table.setflags(write=False)
    return table


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """The model's alphas_cumprod (float64, index = training timestep) from a scheduler config."""
    if config.get("rescale_betas_zero_snr"):
        # A zero terminal SNR makes sigma_max infinite; none of the k-diffusion samplers handle it.
        raise ValueError("rescale_betas_zero_snr=True is not supported by the ComfyUI samplers")
    trained = config.get("trained_betas")
    table = _alphas_cumprod_cached(
        int(config.get("num_train_timesteps", 1000)),
        float(config.get("beta_start", 0.0001)),
        float(config.get("beta_end", 0.02)),
        str(config.get("beta_schedule", "linear")),
        tuple(float(b) for b in trained) if trained is not None else None,
    )
    return torch.from_numpy(table.copy())


def model_sigmas(table_or_config: torch.Tensor | Mapping[str, Any]) -> torch.Tensor:
    """sigma for each training timestep (float64, ascending: index 0 is sigma_min)."""
    if isinstance(table_or_config, Mapping):
        alphas_cumprod = alphas_cumprod_from_config(table_or_config)
    else:
        alphas_cumprod = table_or_config.detach().to("cpu", torch.float64)
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def sigma_to_timestep(sigma: torch.Tensor | float, table_sigmas: torch.Tensor) -> torch.Tensor:
    """ComfyUI's model timestep for a sigma: the training timestep whose log-sigma is nearest.

    This is the integer the UNet receives in ComfyUI; diffusers' own `_sigma_to_t` interpolates to
    a fractional timestep instead.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    log_table = table_sigmas.log()
    dists = (s.clamp_min(1e-30).log()[None, :] - log_table[:, None]).abs()
    return dists.argmin(dim=0).to(torch.float64)


def _timestep_to_sigma(timesteps: torch.Tensor, table_sigmas: torch.Tensor) -> torch.Tensor:
    # Linear interpolation of log-sigma between neighbouring training timesteps (ComfyUI's sigma()).
    t = timesteps.to(torch.float64).clamp(0, len(table_sigmas) - 1)
    low = t.floor().long()
    high = t.ceil().long()
    w = t - low.to(torch.float64)
    log_sigmas = table_sigmas.log()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _normal(table_sigmas: torch.Tensor, steps: int, sgm: bool) -> torch.Tensor:
    start = float(sigma_to_timestep(table_sigmas[-1], table_sigmas))
    end = float(sigma_to_timestep(table_sigmas[0], table_sigmas))
    if sgm:
        return _append_zero(
            _timestep_to_sigma(torch.linspace(start, end, steps + 1, dtype=torch.float64)[:-1], table_sigmas)
        )
    if math.isclose(float(table_sigmas[0]), 0, abs_tol=1e-5):
        # A table that already reaches ~0 ends on its own last sigma instead of an appended zero
        # (ComfyUI's rule; never the case for SDXL, whose sigma_min is 0.029).
        return _timestep_to_sigma(torch.linspace(start, end, steps + 1, dtype=torch.float64), table_sigmas)
    return _append_zero(_timestep_to_sigma(torch.linspace(start, end, steps, dtype=torch.float64), table_sigmas))


def _simple(table_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    n = len(table_sigmas)
    stride = n / steps
    picked = [float(table_sigmas[-(1 + int(i * stride))]) for i in range(steps)]
    return _append_zero(torch.tensor(picked, dtype=torch.float64))


def _ddim_uniform(table_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    # Every `stride`-th training sigma from timestep 1 upwards, reversed. With 1000 timesteps the
    # count is ceil(999 / (1000 // steps)), which is steps + 1 for e.g. steps = 30 (stride 33).
    n = len(table_sigmas)
    stride = max(n // steps, 1)
    picked = [float(table_sigmas[i]) for i in range(1, n, stride)][::-1]
    return _append_zero(torch.tensor(picked, dtype=torch.float64))


def _karras(sigma_min: float, sigma_max: float, steps: int) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv_rho = sigma_min ** (1 / KARRAS_RHO)
    max_inv_rho = sigma_max ** (1 / KARRAS_RHO)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO)


def _exponential(sigma_min: float, sigma_max: float, steps: int) -> torch.Tensor:
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64)
    return _append_zero(log_sigmas.exp())


def compute_sigmas(schedule: str, table_or_config: torch.Tensor | Mapping[str, Any], steps: int) -> torch.Tensor:
    """The ComfyUI schedule `schedule` for `steps` steps, with its trailing zero (float64, CPU).

    `table_or_config` is the model's alphas_cumprod or its scheduler config. The result has
    `steps + 1` entries, except ddim_uniform, whose count follows its integer stride (see above).
    """
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"unknown scheduler {schedule!r}; expected one of {', '.join(SCHEDULE_NAMES)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    table_sigmas = model_sigmas(table_or_config)
    sigma_min, sigma_max = float(table_sigmas[0]), float(table_sigmas[-1])
    if schedule == "karras":
        return _karras(sigma_min, sigma_max, steps)
    if schedule == "exponential":
        return _exponential(sigma_min, sigma_max, steps)
    if schedule == "normal":
        return _normal(table_sigmas, steps, sgm=False)
    if schedule == "sgm_uniform":
        return _normal(table_sigmas, steps, sgm=True)
    if schedule == "simple":
        return _simple(table_sigmas, steps)
    return _ddim_uniform(table_sigmas, steps)


def sampler_sigmas(
    sampler: str, schedule: str, table_or_config: torch.Tensor | Mapping[str, Any], steps: int
) -> torch.Tensor:
    """The sigmas a ComfyUI KSampler hands to `sampler`: the schedule, plus the dpm_2 adjustment.

    ComfyUI makes some samplers (the registry's discard_penultimate_sigma) compute one more step than
    asked and then drop the second-to-last sigma: their last step is a single Euler evaluation, so the
    extra step keeps the total spread."""
    if sampler_spec(sampler).discard_penultimate_sigma:
        sigmas = compute_sigmas(schedule, table_or_config, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return compute_sigmas(schedule, table_or_config, steps)
