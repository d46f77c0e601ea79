"""Seeded step noise for the stochastic samplers.

Every random number a sampler draws comes from a source seeded by the request's per-sample seeds,
one independent stream per batch item, so sample i of a batch equals the same seed run alone and a
run is reproducible. The step-noise seeds are derived from the request seed (not the seed itself)
so that a stream never replays the initial-noise stream the pipeline draws from the same seed.

Two kinds, as in ComfyUI:
- Gaussian per-step noise (euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral, ddpm): one CPU
  `torch.Generator` per item, drawn in float32 on the CPU (so CPU and CUDA runs agree) and moved.
- Brownian-tree noise (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde and their `_gpu` twins): one
  `torchsde.BrownianTree` per item over [sigma_min, sigma_max], queried for the increment between two
  sigmas and normalised to unit variance. The plain samplers keep the tree on the CPU; the `_gpu`
  ones keep it on the latents' device. That is their only difference, so on a CPU they coincide.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch

NoiseSampler = Callable[[float, float], torch.Tensor]

GAUSSIAN_STREAM = "step-noise"
BROWNIAN_STREAM = "brownian-tree"
_TREE_TOL = 1e-6  # torchsde's default, as k-diffusion uses it


def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for `stream`, a fixed function of the request seed (stable across platforms)."""
    digest = hashlib.blake2b(f"beyond/{stream}/{int(seed)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per batch item for Gaussian step noise."""
    return [torch.Generator("cpu").manual_seed(derive_seed(s, GAUSSIAN_STREAM)) for s in seeds]


def gaussian_like(sample: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like `sample`, item i drawn from generators[i].

    Drawn exactly as diffusers' `randn_tensor` draws with a list of CPU generators in float32, so the
    stock ancestral schedulers and ours consume the streams identically.
    """
    if sample.shape[0] != len(generators):
        raise ValueError(f"batch of {sample.shape[0]} latents but {len(generators)} seeds")
    shape = (1, *sample.shape[1:])
    parts = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(parts).to(sample.device)


class BrownianNoise:
    """k-diffusion's Brownian-tree noise sampler with one tree (and seed) per batch item."""

    def __init__(
        self,
        sample: torch.Tensor,
        sigma_min: float,
        sigma_max: float,
        seeds: Sequence[int],
        tree_device: torch.device | str,
    ) -> None:
        import torchsde  # required: without it the SDE samplers have no reproducible noise

        if sample.shape[0] != len(seeds):
            raise ValueError(f"batch of {sample.shape[0]} latents but {len(seeds)} seeds")
        self.t0, self.t1 = (float(sigma_min), float(sigma_max))
        if self.t0 > self.t1:
            self.t0, self.t1 = self.t1, self.t0
        self.out_device = sample.device
        self.shape = tuple(sample.shape)
        w0 = torch.zeros(sample.shape[1:], dtype=torch.float32, device=torch.device(tree_device))
        self.trees = [
            torchsde.BrownianTree(self.t0, w0, self.t1, entropy=derive_seed(s, BROWNIAN_STREAM), tol=_TREE_TOL)
            for s in seeds
        ]
        # The tree stores its end points rounded to the tolerance's digits and clamps (with a
        # warning) any query outside them, which includes sigma_max itself; clamp first instead.
        digits = -int(math.log10(_TREE_TOL))
        self.lo, self.hi = round(self.t0, digits), round(self.t1, digits)

    def _clamp(self, t: float) -> float:
        return min(max(t, self.lo), self.hi)

    def __call__(self, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor) -> torch.Tensor:
        a, b = self._clamp(float(sigma)), self._clamp(float(sigma_next))
        if a == b:  # a zero-length interval (repeated sigma): no increment, and no 0/0
            return torch.zeros(self.shape, dtype=torch.float32, device=self.out_device)
        sign = 1.0
        if a > b:
            a, b, sign = b, a, -1.0
        w = torch.stack([tree(a, b) for tree in self.trees])
        # k-diffusion's convention: the increment W(hi) - W(lo), negated for a downward query (the
        # usual case, sigma > sigma_next), normalised to unit variance by sqrt(|dt|).
        return (w * (sign / (b - a) ** 0.5)).to(device=self.out_device, dtype=torch.float32)
