"""Every sampler's facts in one entry: its name, what runs it, its noise, its evaluations, whether it batches.

Torch-free, so that request validation reads the names from here without loading the implementations
(`models.names.SAMPLERS` is this registry's keys). A new sampler is one entry here plus its algorithm
in stock.py (a diffusers class made to follow ComfyUI) or kdiffusion.py (a program of our own).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Noise(str, Enum):
    """The step noise a sampler draws, one seeded source per batch item (see noise.py)."""

    NONE = "none"  # deterministic: its images depend on the initial noise alone
    GAUSSIAN = "gaussian"  # fresh Gaussian noise at each step
    BROWNIAN = "brownian"  # increments of a Brownian tree, its state kept on the CPU
    BROWNIAN_ON_DEVICE = "brownian_on_device"  # the same tree with its state on the latents' device (`_gpu`)


@dataclass(frozen=True)
class SamplerSpec:
    """How one ComfyUI sampler name is run."""

    name: str
    # What runs it: "stock.<class>", a diffusers scheduler subclass made to follow ComfyUI, or
    # "kdiffusion.<program>", a sampling loop of our own.
    algorithm: str
    noise: Noise
    # Model evaluations per schedule step; the last evaluations - 1 steps take one fewer each (the
    # step into sigma 0 is a single Euler evaluation). An adaptive sampler: evaluations per attempt.
    evaluations: int = 1
    # Chooses its evaluation points while it runs: its budget is the step count rounded up to whole
    # attempts, and its timesteps are filled in as it goes.
    adaptive: bool = False
    # A batch item's images do not depend on the other items (false: the job runs alone).
    batchable: bool = True
    # ComfyUI computes the schedule for steps + 1 and drops its second-to-last sigma.
    discard_penultimate_sigma: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)  # the stock class's configuration

    @property
    def module(self) -> str:
        return self.algorithm.partition(".")[0]

    @property
    def implementation(self) -> str:
        return self.algorithm.partition(".")[2]


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
_2M = {**_MULTISTEP, "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}
_2M_SDE = {**_MULTISTEP, "algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}
# The 3M SDE's second step (only two past outputs yet) is k-diffusion's phi_2 form, which is
# diffusers' "heun" second-order SDE update; the third-order update is fixed in the subclass.
_3M_SDE = {**_MULTISTEP, "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"}

_SPECS = (
    SamplerSpec("euler", "stock.ComfyEuler", Noise.NONE),
    SamplerSpec("euler_ancestral", "stock.ComfyEulerAncestral", Noise.GAUSSIAN),
    SamplerSpec("heun", "stock.ComfyHeun", Noise.NONE, evaluations=2),
    SamplerSpec("heunpp2", "kdiffusion.heunpp2", Noise.NONE, evaluations=3),
    SamplerSpec("dpm_2", "stock.ComfyKDPM2", Noise.NONE, evaluations=2, discard_penultimate_sigma=True),
    SamplerSpec(
        "dpm_2_ancestral", "stock.ComfyKDPM2Ancestral", Noise.GAUSSIAN, evaluations=2, discard_penultimate_sigma=True
    ),
    SamplerSpec("lms", "stock.ComfyLMS", Noise.NONE),
    SamplerSpec("dpm_fast", "kdiffusion.dpm_fast", Noise.NONE),
    # Its step sizes come from an error norm over the whole batch: batched, a job's images would
    # depend on its partners.
    SamplerSpec("dpm_adaptive", "kdiffusion.dpm_adaptive", Noise.NONE, evaluations=3, adaptive=True, batchable=False),
    SamplerSpec("dpmpp_2s_ancestral", "kdiffusion.dpmpp_2s_ancestral", Noise.GAUSSIAN, evaluations=2),
    SamplerSpec("dpmpp_sde", "stock.ComfyDPMSolverSDE", Noise.BROWNIAN, evaluations=2),
    SamplerSpec("dpmpp_sde_gpu", "stock.ComfyDPMSolverSDE", Noise.BROWNIAN_ON_DEVICE, evaluations=2),
    SamplerSpec("dpmpp_2m", "stock.ComfyDPMSolverMultistep", Noise.NONE, settings=_2M),
    SamplerSpec("dpmpp_2m_sde", "stock.ComfyDPMSolverMultistep", Noise.BROWNIAN, settings=_2M_SDE),
    SamplerSpec("dpmpp_2m_sde_gpu", "stock.ComfyDPMSolverMultistep", Noise.BROWNIAN_ON_DEVICE, settings=_2M_SDE),
    SamplerSpec("dpmpp_3m_sde", "stock.ComfyDPMSolverMultistep", Noise.BROWNIAN, settings=_3M_SDE),
    SamplerSpec("dpmpp_3m_sde_gpu", "stock.ComfyDPMSolverMultistep", Noise.BROWNIAN_ON_DEVICE, settings=_3M_SDE),
    SamplerSpec("ddpm", "kdiffusion.ddpm", Noise.GAUSSIAN),
)

# In the contract's order (the order the API lists them in).
SAMPLER_SPECS: dict[str, SamplerSpec] = {spec.name: spec for spec in _SPECS}
assert len(SAMPLER_SPECS) == len(_SPECS), "a sampler name is registered twice"
assert all(spec.module in ("stock", "kdiffusion") for spec in _SPECS)


def sampler_spec(name: str) -> SamplerSpec:
    """The registry's entry for `name`; ValueError for a name it does not have."""
    spec = SAMPLER_SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLER_SPECS)}")
    return spec


def model_evaluations(spec: SamplerSpec, schedule_steps: int) -> int:
    """The model evaluations `spec` makes on a schedule of `schedule_steps` steps (ending at sigma 0)."""
    e = spec.evaluations
    if spec.adaptive:
        return e * max(1, -(-schedule_steps // e))
    return sum(min(e, schedule_steps - i) for i in range(schedule_steps))
