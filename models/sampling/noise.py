"""Seeded step noise for the stochastic samplers.

Every random number a sampler draws comes from a source seeded by the request's per-sample seeds,
one independent stream per batch item, so sample i of a batch equals the same seed run alone and a
run is reproducible. The step-noise seeds are derived from the request seed (not the seed itself)
so that a stream never replays the initial-noise stream the pipeline draws from the same seed.

Two kinds, as in ComfyUI:
- Gaussian per-step noise (euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral, ddpm): one CPU
  `torch.Generator` per item, drawn in float32 on the CPU (so CPU and CUDA runs agree) and moved.
- Brownian noise (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde and their `_gpu` twins): one Brownian path
  per item, sampled exactly and lazily at the sigmas the sampler names (`BrownianNoise`: a bridge
  between the nearest known points, no tree), queried for the increment between two sigmas and
  normalised to unit variance, as k-diffusion uses its Brownian tree. The plain samplers keep the
  path and its generator on the CPU; the `_gpu` ones on the latents' device. That is their only
  difference, so on a CPU they coincide.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable, Sequence

import torch

NoiseSampler = Callable[[float, float], torch.Tensor]

GAUSSIAN_STREAM = "step-noise"
BROWNIAN_STREAM = "brownian-tree"


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
    """Brownian-motion noise for the SDE samplers: exact increments W(b) - W(a), one path per item.

    k-diffusion (and ComfyUI) take this noise from a `torchsde.BrownianTree` because the samplers
    query overlapping intervals: dpmpp_sde asks for (sigma_i, sigma_mid) and then (sigma_i,
    sigma_i+1), and those two increments must be the increments of one Brownian path, not two
    independent draws. A tree gets that by bisecting [sigma_min, sigma_max] down to a tolerance
    (1e-6: about 24 levels, each a bridge draw of the latents' size), on every query: on a 2-core
    CPU ~9 ms a step at random:tiny's latent size and 40-140 ms at SDXL's, and on a GPU dozens of
    small kernels a step.

    This class gets the same property exactly and without the bisection, from the Markov property
    of Brownian motion: given its values at finitely many known times, the path at a new time t
    depends only on the nearest known times on each side,
    - between a < t < b: the Brownian bridge, W(t) ~ N(W(a) + (t - a) / (b - a) * (W(b) - W(a)),
      (t - a)(b - t) / (b - a));
    - beyond every known time, nearest one c: W(t) ~ N(W(c), |t - c|).
    So each time a query names that is not known yet costs one draw of the latents' size (from
    the item's own generator) and is then remembered; a known time costs nothing. Drawing the times
    one by one this way samples exactly the finite-dimensional law of Brownian motion, in any query
    order, for any real times: no interval, clamping or tolerance. The path is pinned at
    W(anchor) = 0, the smallest sigma, so its values are small where the increments are small
    (float32 keeps their digits). What it draws depends on the order of the queries, which is a
    fixed function of the request (sampler, schedule, steps), so a request is reproducible. The
    generators live on `state_device` too: a CUDA generator draws other numbers than a CPU one, so
    on a GPU the `_gpu` samplers and their plain twins give different (each reproducible) images.

    Cost: one `normal_` per item and two or three elementwise ops per new time (the plain 2M/3M SDE
    samplers name one new time per step, dpmpp_sde two per step), against a tree walk per query.
    Memory: one latent-sized float32 tensor per distinct time queried (one per step, two for
    dpmpp_sde), on `state_device`; for SDXL at 1024x1024 that is ~0.25 MiB per item per time. A tree with a
    coarser tolerance would be cheaper than 1e-6 but still approximate the query times and still
    walk its levels; the bridge is both exact and cheaper (benchmarks/noise.py measures both).
    """

    def __init__(
        self,
        sample: torch.Tensor,
        anchor: float,
        seeds: Sequence[int],
        state_device: torch.device | str,
    ) -> None:
        if sample.shape[0] != len(seeds):
            raise ValueError(f"batch of {sample.shape[0]} latents but {len(seeds)} seeds")
        self.state_device = torch.device(state_device)
        self.out_device = sample.device
        self.shape = tuple(sample.shape)
        self.generators = [
            torch.Generator(self.state_device).manual_seed(derive_seed(s, BROWNIAN_STREAM)) for s in seeds
        ]
        # Known times (sorted) and W at each, shape (batch, *latent), float32 on state_device.
        self.times: list[float] = [float(anchor)]
        self.values: dict[float, torch.Tensor] = {
            float(anchor): torch.zeros(self.shape, dtype=torch.float32, device=self.state_device)
        }

    def _standard_normal(self) -> torch.Tensor:
        z = torch.empty(self.shape, dtype=torch.float32, device=self.state_device)
        for item, generator in zip(z, self.generators, strict=True):  # item i from generator i alone
            item.normal_(generator=generator)
        return z

    def value(self, t: float) -> torch.Tensor:
        """W(t) for every item, drawn conditioned on the known times if t is new."""
        t = float(t)
        known = self.values.get(t)
        if known is not None:
            return known
        k = bisect.bisect_left(self.times, t)
        z = self._standard_normal()
        if 0 < k < len(self.times):
            a, b = self.times[k - 1], self.times[k]
            weight = (t - a) / (b - a)
            w = z.mul_(math.sqrt((t - a) * (b - t) / (b - a))).add_(torch.lerp(self.values[a], self.values[b], weight))
        else:
            c = self.times[k - 1] if k > 0 else self.times[0]
            w = z.mul_(math.sqrt(abs(t - c))).add_(self.values[c])
        self.times.insert(k, t)
        self.values[t] = w
        return w

    def __call__(self, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        if a == b:  # a zero-length interval (repeated sigma): no increment, and no 0/0
            return torch.zeros(self.shape, dtype=torch.float32, device=self.out_device)
        # k-diffusion's convention: (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|), i.e.
        # for the usual downward query W(lo) - W(hi) normalised to unit variance.
        w_a = self.value(a)
        increment = torch.sub(self.value(b), w_a).mul_(1.0 / math.sqrt(abs(b - a)))
        return increment.to(self.out_device)
