"""Live previews: the current latents as a small RGB picture, by a fixed linear map (no VAE decode).

The 4x3 matrix is InvokeAI's published SDXL latent-to-RGB factors (SDXL_LATENT_RGB_FACTORS in
invokeai/app/util/step_callback.py, Apache-2.0 licensed). It maps SDXL's scaled latents to RGB in
about [-1, 1]; for other latents (the random test models) it still gives a picture, just not a
meaningful one. It costs one small matrix product per preview, on the latents' device.
"""

from __future__ import annotations

import torch

SDXL_LATENT_RGB = (
    (0.3816, 0.4930, 0.5320),
    (-0.3753, 0.1631, 0.1739),
    (0.1770, 0.3588, -0.2048),
    (-0.4350, -0.2644, -0.4289),
)


@torch.no_grad()
def latent_rgb(latents: torch.Tensor) -> torch.Tensor:
    """(C, h, w) latents -> (h, w, 3) uint8 on the CPU; channels past the map's four are ignored."""
    factors = torch.tensor(SDXL_LATENT_RGB, device=latents.device, dtype=torch.float32)
    channels = min(latents.shape[0], factors.shape[0])
    rgb = latents[:channels].float().permute(1, 2, 0) @ factors[:channels]
    return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu()
