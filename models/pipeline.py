"""The SDXL outpainting denoise loop: one readable `__call__` over the model's components."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from models.components import Components
from models.errors import NonFiniteOutput
from models.prompts import PromptEmbeddings
from models.sampling import build_scheduler
from models.speed import SpeedOptions, apply_speedups

StepCallback = Callable[[int, int], None]


class OutpaintPipeline:
    def __init__(
        self,
        components: Components,
        device: torch.device,
        dtype: torch.dtype,
        speed: SpeedOptions | None = None,
    ) -> None:
        self.c = components
        self.device, self.dtype = device, dtype
        vae_cfg = components.vae.config
        # The SDXL VAE overflows in fp16; its config says so with force_upcast. bf16 has fp32's range.
        self.vae_dtype = (
            torch.float32 if dtype == torch.float16 and vae_cfg.get("force_upcast", True) else dtype
        )
        self.vae_scale = 2 ** (len(vae_cfg.block_out_channels) - 1)
        components.unet.to(device=device, dtype=dtype)
        components.text_encoder.to(device=device, dtype=dtype)
        components.text_encoder_2.to(device=device, dtype=dtype)
        components.vae.to(device=device, dtype=self.vae_dtype)
        # None is auto: knobs on for CUDA, off on a CPU.
        self.speedups = apply_speedups(components, device, dtype, speed, self.vae_dtype)

    @property
    def inpainting_unet(self) -> bool:
        return self.c.unet.config.in_channels == 9

    @property
    def native_area(self) -> int:
        side = self.c.unet.config.sample_size * self.vae_scale
        return side * side

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        cfg = self.c.vae.config
        dist = self.c.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
        latents = (dist.mean - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor
        return latents.to(self.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.c.vae.config
        latents = latents.to(self.vae_dtype) / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
        return (self.c.vae.decode(latents).sample.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        prompts: PromptEmbeddings,
        seeds: list[int],
        steps: int,
        guidance_scale: float,
        sampler: str,
        schedule: str,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """Outpaint one canvas into len(seeds) images.

        image: (1, 3, H, W) in [-1, 1], the pre-filled canvas at working size.
        mask: (1, 1, H, W), 1 where pixels are generated.
        Returns (len(seeds), 3, H, W) in [0, 1].
        """
        batch, device, dtype = len(seeds), self.device, self.dtype
        mask = mask.to(device)
        image_latents = self.encode_image(image)
        latent_mask = F.max_pool2d(mask, self.vae_scale).to(dtype)  # any new pixel makes its latent new
        masked_latents = self.encode_image(image * (mask < 0.5)) if self.inpainting_unet else None

        # Noise for sample i depends on seeds[i] alone, so a sample is the same alone or in a batch.
        noise = torch.cat(
            [torch.randn(image_latents.shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        ).to(device, dtype)
        scheduler = build_scheduler(
            sampler, schedule, dict(self.c.scheduler.config), steps, seeds=seeds, device=device
        )
        timesteps = scheduler.timesteps
        # As in ComfyUI at denoise 1.0: the pre-filled canvas plus noise at the highest sigma, so the
        # new area starts from the extended colours rather than from nothing.
        latents = scheduler.add_noise(image_latents.expand(batch, -1, -1, -1), noise, timesteps[:1])

        cfg = guidance_scale > 1.0
        embeds, pooled = prompts.prompt_embeds, prompts.pooled
        if cfg:
            embeds = torch.cat([prompts.negative_embeds, embeds])
            pooled = torch.cat([prompts.negative_pooled, pooled])
        height, width = image.shape[-2:]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
        conditioning = {"text_embeds": pooled, "time_ids": time_ids.expand(embeds.shape[0], -1)}
        copies = 2 if cfg else 1
        if masked_latents is not None:
            extra = torch.cat([latent_mask, masked_latents], dim=1).expand(batch * copies, -1, -1, -1)

        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents] * copies) if cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            if masked_latents is not None:
                model_in = torch.cat([model_in, extra], dim=1)
            pred = self.c.unet(
                model_in, t, encoder_hidden_states=embeds, added_cond_kwargs=conditioning, return_dict=False
            )[0]
            if cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
            if masked_latents is None:
                # A plain SDXL UNet knows nothing of the mask: re-impose the known region at the
                # noise level of the next step (clean after the last one).
                known = (
                    scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
                    if i + 1 < len(timesteps)
                    else image_latents.expand(batch, -1, -1, -1)
                )
                latents = latent_mask * latents + (1 - latent_mask) * known
            if on_step is not None:
                on_step(i + 1, len(timesteps))
        images = self.decode_latents(latents)
        # One check at the end rather than per step: a per-step check would sync the GPU every step.
        if not torch.isfinite(images).all():
            raise NonFiniteOutput(str(dtype).removeprefix("torch."))
        return images
