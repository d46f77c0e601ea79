"""Independent references for tests/test_sampling.py.

Written from the published definitions (ComfyUI's schedules and its k-diffusion sampling loops),
in float64, without importing anything from `models.sampling`: the tests compare the package's
diffusers schedulers against these, so a mistake on either side shows up as a mismatch.

A sampler here is `fn(model, x, sigmas, noise) -> x`, where `model(x, sigma)` returns the denoised
prediction and `noise(sigma, sigma_next)` returns a standard-normal tensor shaped like x.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

Model = Callable[[torch.Tensor, float], torch.Tensor]
Noise = Callable[[float, float], torch.Tensor]

# --- the model's noise table and the schedules ------------------------------------------------


def sdxl_table(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """sigma per training timestep for a scaled_linear beta schedule (index 0 = sigma_min)."""
    betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def nearest_timestep(sigma: float, table: np.ndarray) -> int:
    return int(np.argmin(np.abs(np.log(table) - math.log(sigma))))


def _sigma_at(t: float, table: np.ndarray) -> float:
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    return math.exp((1 - w) * math.log(table[lo]) + w * math.log(table[hi]))


def schedule(name: str, table: np.ndarray, steps: int) -> np.ndarray:
    n = len(table)
    s_min, s_max = table[0], table[-1]
    if name == "karras":
        rho = 7.0
        out = [
            (s_max ** (1 / rho) + (i / max(steps - 1, 1)) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
            for i in range(steps)
        ]
    elif name == "exponential":
        out = [
            math.exp(math.log(s_max) + (i / max(steps - 1, 1)) * (math.log(s_min) - math.log(s_max)))
            for i in range(steps)
        ]
    elif name == "normal":
        last = n - 1
        out = [_sigma_at(last - i * last / max(steps - 1, 1), table) for i in range(steps)]
    elif name == "sgm_uniform":
        last = n - 1
        out = [_sigma_at(last - i * last / steps, table) for i in range(steps)]
    elif name == "simple":
        stride = n / steps  # multiplied as a float stride, as ComfyUI does (3 * (1000/30) = 99.99...)
        out = [table[n - 1 - int(i * stride)] for i in range(steps)]
    elif name == "ddim_uniform":
        stride = n // steps
        out = [table[t] for t in range(1, n, stride)][::-1]
    else:
        raise KeyError(name)
    return np.array([*out, 0.0])


# --- the toy problem ----------------------------------------------------------------------------


class GaussianToy:
    """Data x0 ~ N(mu, s^2) independently per element: the exact denoiser is linear in x,
    D(x, sigma) = mu + s^2 / (s^2 + sigma^2) * (x - mu)."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mu = (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5) * 2.0
        self.s = torch.rand(shape, generator=g, dtype=torch.float64) * 1.2 + 0.3

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)


class Recorder:
    """Wraps a model, logging the sigma of every call."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.sigmas: list[float] = []

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.sigmas.append(float(sigma))
        return self.model(x, float(sigma))


# --- samplers -------------------------------------------------------------------------------------


def _down_up(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    if sigma_to == 0:
        return 0.0, 0.0
    up = min(sigma_to, math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


def euler(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise) -> torch.Tensor:
    for i in range(len(sig) - 1):
        d = (x - model(x, sig[i])) / sig[i]
        x = x + d * (sig[i + 1] - sig[i])
    return x


def euler_ancestral(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise) -> torch.Tensor:
    for i in range(len(sig) - 1):
        den = model(x, sig[i])
        down, up = _down_up(sig[i], sig[i + 1])
        # Into sigma 0 the Euler step lands on the denoised prediction, with no noise.
        x = den if down == 0 else x + (x - den) / sig[i] * (down - sig[i]) + noise(sig[i], sig[i + 1]) * up
    return x


def heun(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise) -> torch.Tensor:
    for i in range(len(sig) - 1):
        d = (x - model(x, sig[i])) / sig[i]
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - model(x2, sig[i + 1])) / sig[i + 1]
            x = x + (d + d2) / 2 * dt
    return x


def heunpp2(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise) -> torch.Tensor:
    end = sig[-1]
    for i in range(len(sig) - 1):
        d = (x - model(x, sig[i])) / sig[i]
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == end:
            x = x + d * dt
        elif sig[i + 2] == end:
            x2 = x + d * dt
            d2 = (x2 - model(x2, sig[i + 1])) / sig[i + 1]
            w2 = sig[i + 1] / (2 * sig[0])
            x = x + ((1 - w2) * d + w2 * d2) * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - model(x2, sig[i + 1])) / sig[i + 1]
            x3 = x2 + d2 * (sig[i + 2] - sig[i + 1])
            d3 = (x3 - model(x3, sig[i + 2])) / sig[i + 2]
            w2, w3 = sig[i + 1] / (3 * sig[0]), sig[i + 2] / (3 * sig[0])
            x = x + ((1 - w2 - w3) * d + w2 * d2 + w3 * d3) * dt
    return x


def dpm_2(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise) -> torch.Tensor:
    for i in range(len(sig) - 1):
        d = (x - model(x, sig[i])) / sig[i]
        if sig[i + 1] == 0:
            x = x + d * (0 - sig[i])
        else:
            mid = math.sqrt(sig[i] * sig[i + 1])
            x2 = x + d * (mid - sig[i])
            d2 = (x2 - model(x2, mid)) / mid
            x = x + d2 * (sig[i + 1] - sig[i])
    return x


def dpm_2_ancestral(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise) -> torch.Tensor:
    for i in range(len(sig) - 1):
        d = (x - model(x, sig[i])) / sig[i]
        down, up = _down_up(sig[i], sig[i + 1])
        if down == 0:
            x = x + d * (0 - sig[i])
        else:
            mid = math.sqrt(sig[i] * down)
            x2 = x + d * (mid - sig[i])
            d2 = (x2 - model(x2, mid)) / mid
            x = x + d2 * (down - sig[i]) + noise(sig[i], sig[i + 1]) * up
    return x


def _lagrange_integral(nodes: list[float], j: int, a: float, b: float) -> float:
    # Integral over [a, b] of the Lagrange basis polynomial that is 1 at nodes[j], 0 at the others.
    others = [n for k, n in enumerate(nodes) if k != j]
    poly = np.poly1d([1.0])
    for n in others:
        poly = poly * np.poly1d([1.0, -n])
    poly = poly / np.prod([nodes[j] - n for n in others])
    antiderivative = poly.integ()
    return float(antiderivative(b) - antiderivative(a))


def lms(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise, *, denoise_last: bool = True) -> torch.Tensor:
    """Order-4 linear multistep in sigma; the step into 0 returns the denoised prediction
    (ComfyUI) or, with denoise_last=False, integrates the polynomial to 0 (diffusers' LMS)."""
    ds: list[torch.Tensor] = []
    for i in range(len(sig) - 1):
        den = model(x, sig[i])
        ds.append((x - den) / sig[i])
        ds = ds[-4:]
        if sig[i + 1] == 0 and denoise_last:
            x = den
            continue
        order = len(ds)
        nodes = [sig[i - k] for k in range(order)]  # newest first
        x = x + sum(_lagrange_integral(nodes, j, sig[i], sig[i + 1]) * ds[-1 - j] for j in range(order))
    return x


def dpmpp_2s_ancestral(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise) -> torch.Tensor:
    for i in range(len(sig) - 1):
        den = model(x, sig[i])
        down, up = _down_up(sig[i], sig[i + 1])
        if down == 0:
            x = den
        else:
            mid = math.sqrt(sig[i] * down)  # midpoint in log-sigma
            x2 = (mid / sig[i]) * x + (1 - mid / sig[i]) * den
            den2 = model(x2, mid)
            x = (down / sig[i]) * x + (1 - down / sig[i]) * den2
        if sig[i + 1] > 0:
            x = x + noise(sig[i], sig[i + 1]) * up
    return x


def dpmpp_sde(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise) -> torch.Tensor:
    for i in range(len(sig) - 1):
        den = model(x, sig[i])
        if sig[i + 1] == 0:
            x = den
            continue
        mid = math.sqrt(sig[i] * sig[i + 1])
        down, up = _down_up(sig[i], mid)
        x2 = (down / sig[i]) * x + (1 - down / sig[i]) * den + noise(sig[i], mid) * up
        den2 = model(x2, mid)
        down, up = _down_up(sig[i], sig[i + 1])
        x = (down / sig[i]) * x + (1 - down / sig[i]) * den2 + noise(sig[i], sig[i + 1]) * up
    return x


def dpmpp_2m(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise) -> torch.Tensor:
    old = None
    for i in range(len(sig) - 1):
        den = model(x, sig[i])
        if sig[i + 1] == 0:
            x = den
        else:
            h = math.log(sig[i] / sig[i + 1])
            if old is None:
                d = den
            else:
                r = math.log(sig[i - 1] / sig[i]) / h
                d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
            x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * d
        old = den
    return x


def dpmpp_2m_sde(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise) -> torch.Tensor:
    old, h_last = None, None
    h = None
    for i in range(len(sig) - 1):
        den = model(x, sig[i])
        if sig[i + 1] == 0:
            x = den
        else:
            h = math.log(sig[i] / sig[i + 1])
            x = (sig[i + 1] / sig[i]) * math.exp(-h) * x - math.expm1(-2 * h) * den
            if old is not None:
                x = x - 0.5 * math.expm1(-2 * h) * (h / h_last) * (den - old)
            x = x + noise(sig[i], sig[i + 1]) * sig[i + 1] * math.sqrt(-math.expm1(-2 * h))
        old, h_last = den, h
    return x


def dpmpp_3m_sde(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise) -> torch.Tensor:
    d_1 = d_2 = None
    h = h_1 = h_2 = None
    for i in range(len(sig) - 1):
        den = model(x, sig[i])
        if sig[i + 1] == 0:
            x = den
        else:
            h = math.log(sig[i] / sig[i + 1])
            he = 2 * h
            x = math.exp(-he) * x - math.expm1(-he) * den
            phi2 = math.expm1(-he) / he + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                a = (den - d_1) / r0
                b = (d_1 - d_2) / r1
                first = a + (a - b) * r0 / (r0 + r1)
                second = (a - b) / (r0 + r1)
                x = x + phi2 * first - (phi2 / he - 0.5) * second
            elif h_1 is not None:
                x = x + phi2 * (den - d_1) / (h_1 / h)
            x = x + noise(sig[i], sig[i + 1]) * sig[i + 1] * math.sqrt(-math.expm1(-2 * h))
        d_1, d_2 = den, d_1
        h_1, h_2 = h, h_1
    return x


def ddpm(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise) -> torch.Tensor:
    for i in range(len(sig) - 1):
        s, sp = sig[i], sig[i + 1]
        den = model(x, s)
        eps = (x - den) / s
        a, ap = 1 / (1 + s * s), 1 / (1 + sp * sp)
        alpha = a / ap
        mean = (x / math.sqrt(1 + s * s) - (1 - alpha) / math.sqrt(1 - a) * eps) / math.sqrt(alpha)
        if sp > 0:
            var = (1 - alpha) * (1 - ap) / (1 - a)
            x = (mean + math.sqrt(var) * noise(s, sp)) * math.sqrt(1 + sp * sp)
        else:
            x = mean
    return x


# DPM-Solver single-step updates, written in lambda = -log(sigma).


def _eps(model: Model, x: torch.Tensor, lam: float) -> torch.Tensor:
    sigma = math.exp(-lam)
    return (x - model(x, sigma)) / sigma


def _dpm1(x: torch.Tensor, lam: float, lam_next: float, e: torch.Tensor) -> torch.Tensor:
    return x - math.exp(-lam_next) * math.expm1(lam_next - lam) * e


def _dpm2(model: Model, x: torch.Tensor, lam: float, lam_next: float, e: torch.Tensor, r1: float) -> torch.Tensor:
    h = lam_next - lam
    u = x - math.exp(-(lam + r1 * h)) * math.expm1(r1 * h) * e
    e1 = _eps(model, u, lam + r1 * h)
    return x - math.exp(-lam_next) * math.expm1(h) * (e + (e1 - e) / (2 * r1))


def _dpm3(
    model: Model,
    x: torch.Tensor,
    lam: float,
    lam_next: float,
    e: torch.Tensor,
    e1: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    h = lam_next - lam
    if e1 is None:
        u1 = x - math.exp(-(lam + h / 3)) * math.expm1(h / 3) * e
        e1 = _eps(model, u1, lam + h / 3)
    s2 = lam + 2 * h / 3
    u2 = (
        x
        - math.exp(-s2) * math.expm1(2 * h / 3) * e
        - math.exp(-s2) * 2 * (math.expm1(2 * h / 3) / (2 * h / 3) - 1) * (e1 - e)
    )
    e2 = _eps(model, u2, s2)
    out = x - math.exp(-lam_next) * math.expm1(h) * e - math.exp(-lam_next) * 1.5 * (math.expm1(h) / h - 1) * (e2 - e)
    return out, e1


def _ends(sig: np.ndarray) -> tuple[float, float]:
    return (sig[-2] if sig[-1] == 0 else sig[-1]), sig[0]


def dpm_fast(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise) -> torch.Tensor:
    s_min, s_max = _ends(sig)
    nfe = len(sig) - 1
    m = nfe // 3 + 1
    lams = np.linspace(-math.log(s_max), -math.log(s_min), m + 1)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        lam, lam_next = lams[i], lams[i + 1]
        e = _eps(model, x, lam)
        if order == 1:
            x = _dpm1(x, lam, lam_next, e)
        elif order == 2:
            x = _dpm2(model, x, lam, lam_next, e, 0.5)
        else:
            x = _dpm3(model, x, lam, lam_next, e)[0]
    return x


def dpm_adaptive(model: Model, x: torch.Tensor, sig: np.ndarray, noise: Noise) -> torch.Tensor:
    """Unbounded, exactly as ComfyUI runs it (order 3, rtol 0.05, atol 0.0078, h_init 0.05,
    I-controller 1/3, limiter 1 + atan(f - 1), accept at >= 0.81)."""
    s_min, s_max = _ends(sig)
    lam, lam_end = -math.log(s_max), -math.log(s_min)
    h = 0.05
    x_prev = x
    while lam < lam_end - 1e-5:
        lam_next = min(lam_end, lam + h)
        e = _eps(model, x, lam)
        # The low-order solution reuses the first intermediate evaluation of the high-order one.
        h_step = lam_next - lam
        u1 = x - math.exp(-(lam + h_step / 3)) * math.expm1(h_step / 3) * e
        e1 = _eps(model, u1, lam + h_step / 3)
        low = x - math.exp(-lam_next) * math.expm1(h_step) * (e + (e1 - e) * 1.5)
        high, _ = _dpm3(model, x, lam, lam_next, e, e1)
        tol = torch.clamp(0.05 * torch.maximum(low.abs(), x_prev.abs()), min=0.0078)
        err = float(torch.linalg.norm((low - high) / tol)) / math.sqrt(x.numel())
        factor = 1 + math.atan((1 / (err + 1e-8)) ** (1 / 3) - 1)
        h *= factor
        if factor >= 0.81:
            x_prev, x, lam = low, high, lam_next
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "heunpp2": heunpp2,
    "dpm_2": dpm_2,
    "dpm_2_ancestral": dpm_2_ancestral,
    "lms": lms,
    "dpm_fast": dpm_fast,
    "dpm_adaptive": dpm_adaptive,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_sde": dpmpp_sde,
    "dpmpp_sde_gpu": dpmpp_sde,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": dpmpp_2m_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": dpmpp_3m_sde,
    "ddpm": ddpm,
}
GAUSSIAN_NOISE = {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "ddpm"}
BROWNIAN_NOISE = {s for s in SAMPLERS if "sde" in s}
DROPS_PENULTIMATE = {"dpm_2", "dpm_2_ancestral"}


def sampler_schedule(sampler: str, name: str, table: np.ndarray, steps: int) -> np.ndarray:
    if sampler in DROPS_PENULTIMATE:
        s = schedule(name, table, steps + 1)
        return np.concatenate([s[:-2], s[-1:]])
    return schedule(name, table, steps)
