"""The SDXL outpainting denoise loop: `prepare` turns a canvas into its latent inputs, `denoise` runs
several compatible canvases in one UNet batch, and `__call__` is the two for a single canvas."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.compile_sizes import Size, default_sizes, snap
from models.components import Components
from models.errors import NonFiniteOutput
from models.prompts import PromptEmbeddings, encode_prompts
from models.sampling import build_scheduler
from models.speed import SpeedOptions, apply_speedups

log = logging.getLogger("beyond.pipeline")

StepCallback = Callable[[int, int], None]
# Called after every step with the current latents of the whole batch (for live previews).
LatentsCallback = Callable[[torch.Tensor], None]


@dataclass
class LatentInputs:
    """One canvas's part of a denoising batch, in latent space: everything the loop needs of it.

    Built by `OutpaintPipeline.prepare`; parts of the same size and text length (chunks) can be
    denoised together, each keeping its own rows, so each part's images are those it gets alone.
    """

    image_latents: torch.Tensor  # (1, C, h, w)
    latent_mask: torch.Tensor  # (1, 1, h, w), 1 where new
    masked_latents: torch.Tensor | None  # (1, C, h, w) for a 9-channel inpainting UNet
    noise: torch.Tensor  # (samples, C, h, w), sample i from seeds[i] alone
    prompts: PromptEmbeddings  # one row per sample
    seeds: list[int]
    size: tuple[int, int]  # (height, width) in pixels

    @property
    def rows(self) -> int:
        return len(self.seeds)

    @property
    def tokens(self) -> int:
        return self.prompts.prompt_embeds.shape[1]


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
        self.vae_dtype = torch.float32 if dtype == torch.float16 and vae_cfg.get("force_upcast", True) else dtype
        self.vae_scale = 2 ** (len(vae_cfg.block_out_channels) - 1)
        components.unet.to(device=device, dtype=dtype)
        components.text_encoder.to(device=device, dtype=dtype)
        components.text_encoder_2.to(device=device, dtype=dtype)
        components.vae.to(device=device, dtype=self.vae_dtype)
        # With compile: the working sizes the UNet is compiled for; every request is snapped to one.
        self.compiled_sizes: tuple[Size, ...] | None = None
        if speed is not None and speed.compile:
            self.compiled_sizes = speed.compile_sizes or default_sizes(self.native_area)
        self._warned_sizes: set[Size] = set()
        # None is auto: knobs on for CUDA, off on a CPU.
        self.speedups = apply_speedups(
            components, device, dtype, speed, self.vae_dtype, compile_sizes=self.compiled_sizes or ()
        )
        # A batch of parts in one UNet call (the speed-up batching is for) on accelerators; on a CPU
        # one call per part, which keeps every part's images bit-identical to its run alone.
        self.fused_batches = device.type != "cpu"

    @property
    def inpainting_unet(self) -> bool:
        return self.c.unet.config.in_channels == 9

    @property
    def native_area(self) -> int:
        side = self.c.unet.config.sample_size * self.vae_scale
        return side * side

    def snap(self, size: Size, canvas: Size | None = None) -> Size:
        """The working size to use for `size` (models.canvas.working_size's choice for `canvas`): when the
        UNet is compiled, the compiled size nearest to the canvas's aspect ratio; else `size` itself."""
        return snap(canvas or size, self.compiled_sizes) if self.compiled_sizes else size

    @torch.no_grad()
    def warm_up(self, sizes: Sequence[Size] | None = None) -> dict[Size, float]:
        """Compile the UNet for every compiled size (or those of `sizes`; one call each, two rows of one
        text chunk) before any request needs it; seconds per size. Nothing to do when it is not compiled."""
        seconds: dict[Size, float] = {}
        if not self.compiled_sizes:
            return seconds
        prompts = encode_prompts(self.c, [""], [""], self.device, self.dtype)
        embeds = torch.cat(_guided(prompts, True, pooled=False))
        pooled = torch.cat(_guided(prompts, True, pooled=True))
        # A float32 timestep on the device, as the schedulers give them (dynamo guards on its dtype).
        t = torch.tensor(float(self.c.scheduler.config.num_train_timesteps - 1), device=self.device)
        channels = self.c.unet.config.in_channels
        for width, height in self.compiled_sizes if sizes is None else sizes:
            started = time.perf_counter()
            shape = (2, channels, height // self.vae_scale, width // self.vae_scale)
            latents = torch.zeros(shape, device=self.device, dtype=self.dtype)
            ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype)
            self._unet(latents, t, embeds, pooled, ids.expand(2, -1), [2])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds[(width, height)] = time.perf_counter() - started
            log.info("UNet compiled for %dx%d in %.1f s", width, height, seconds[(width, height)])
        return seconds

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
    def prepare(
        self, image: torch.Tensor, mask: torch.Tensor, prompts: PromptEmbeddings, seeds: list[int]
    ) -> LatentInputs:
        """The latent-space inputs of one canvas: its encoded image and mask, and each sample's noise."""
        device, dtype = self.device, self.dtype
        image_latents = self.encode_image(image)
        masked_latents = self.encode_image(image * (mask < 0.5)) if self.inpainting_unet else None
        latent_mask = F.max_pool2d(mask.to(device), self.vae_scale).to(dtype)  # any new pixel makes its latent new
        # Noise for sample i depends on seeds[i] alone, so a sample is the same alone or in a batch.
        noise = torch.cat(
            [torch.randn(image_latents.shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        ).to(device, dtype)
        height, width = image.shape[-2:]
        return LatentInputs(image_latents, latent_mask, masked_latents, noise, prompts, list(seeds), (height, width))

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
        (images,) = self.denoise(
            [self.prepare(image, mask, prompts, seeds)], steps, guidance_scale, sampler, schedule, on_step
        )
        check_finite(images, self.dtype)
        return images

    @torch.no_grad()
    def denoise(
        self,
        parts: Sequence[LatentInputs],
        steps: int,
        guidance_scale: float,
        sampler: str,
        schedule: str,
        on_step: StepCallback | None = None,
        on_latents: LatentsCallback | None = None,
    ) -> list[torch.Tensor]:
        """Denoise several canvases of one size in one UNet batch; one (rows, 3, H, W) tensor in [0, 1] per part.

        Rows are the parts' samples in order. Every per-row input (noise, step noise, conditioning,
        mask) comes from its own part, so a part's images are the same as when it is denoised alone.
        """
        if len({p.size for p in parts}) != 1 or len({p.tokens for p in parts}) != 1:
            raise ValueError("a batch needs canvases of one size and prompts of one length")
        device, dtype = self.device, self.dtype
        graphs = _compiled_graphs() if self.compiled_sizes else 0
        if self.compiled_sizes:
            self._check_compiled_size(parts[0].size)
        seeds = [s for p in parts for s in p.seeds]

        def rows(tensor_of: Callable[[LatentInputs], torch.Tensor]) -> torch.Tensor:
            # Each part's single canvas tensor repeated for its samples, parts in order.
            return torch.cat([tensor_of(p).expand(p.rows, -1, -1, -1) for p in parts])

        image_latents = rows(lambda p: p.image_latents)
        latent_mask = rows(lambda p: p.latent_mask)
        noise = torch.cat([p.noise for p in parts])
        scheduler = build_scheduler(sampler, schedule, dict(self.c.scheduler.config), steps, seeds=seeds, device=device)
        timesteps = scheduler.timesteps
        # As in ComfyUI at denoise 1.0: the pre-filled canvas plus noise at the highest sigma, so the
        # new area starts from the extended colours rather than from nothing.
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1])

        # The UNet's rows, part by part: [negatives, positives] of each part under classifier-free
        # guidance, so each part's slice is exactly the batch it would be alone.
        cfg = guidance_scale > 1.0
        copies = 2 if cfg else 1
        sizes = [p.rows * copies for p in parts]
        embeds = torch.cat([t for p in parts for t in _guided(p.prompts, cfg, pooled=False)])
        pooled = torch.cat([t for p in parts for t in _guided(p.prompts, cfg, pooled=True)])
        height, width = parts[0].size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
        time_ids = time_ids.expand(embeds.shape[0], -1)
        inpainting = parts[0].masked_latents is not None
        if inpainting:
            extra = torch.cat(
                [
                    torch.cat([p.latent_mask, p.masked_latents], dim=1).expand(n, -1, -1, -1)
                    for p, n in zip(parts, sizes, strict=True)
                ]
            )

        for i, t in enumerate(timesteps):
            model_in = torch.cat([x for x in latents.split([p.rows for p in parts]) for _ in range(copies)])
            model_in = scheduler.scale_model_input(model_in, t)
            if inpainting:
                model_in = torch.cat([model_in, extra], dim=1)
            pred = self._unet(model_in, t, embeds, pooled, time_ids, sizes)
            if cfg:
                guided = []
                for part_pred in pred.split(sizes):
                    uncond, cond = part_pred.chunk(2)
                    guided.append(uncond + guidance_scale * (cond - uncond))
                pred = torch.cat(guided)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
            if not inpainting:
                # A plain SDXL UNet knows nothing of the mask: re-impose the known region at the
                # noise level of the next step (clean after the last one).
                known = (
                    scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
                    if i + 1 < len(timesteps)
                    else image_latents
                )
                latents = latent_mask * latents + (1 - latent_mask) * known
            if on_latents is not None:
                on_latents(latents)
            if on_step is not None:
                on_step(i + 1, len(timesteps))
        if self.compiled_sizes and _compiled_graphs() > graphs:
            height, width = parts[0].size
            log.warning(
                "the UNet compiled during a request (%dx%d, %d rows): it waited for it", width, height, len(seeds)
            )
        per_part = latents.split([p.rows for p in parts])
        if self.fused_batches:
            return list(self.decode_latents(latents).split([p.rows for p in parts]))
        return [self.decode_latents(x) for x in per_part]

    def _unet(
        self,
        model_in: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        time_ids: torch.Tensor,
        sizes: list[int],
    ) -> torch.Tensor:
        def call(x: torch.Tensor, e: torch.Tensor, p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            if self.compiled_sizes:
                return self._compiled_call(x, t, e, p, ids)
            cond = {"text_embeds": p, "time_ids": ids}
            return self.c.unet(x, t, encoder_hidden_states=e, added_cond_kwargs=cond, return_dict=False)[0]

        if self.fused_batches or len(sizes) == 1:
            return call(model_in, embeds, pooled, time_ids)
        # CPU matrix kernels choose their blocking by the row count, so one call over all parts
        # differs from each part's own call in the last bits: on a CPU each part gets its own call.
        inputs = zip(
            model_in.split(sizes), embeds.split(sizes), pooled.split(sizes), time_ids.split(sizes), strict=True
        )
        return torch.cat([call(*args) for args in inputs])

    def _compiled_call(
        self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor
    ) -> torch.Tensor:
        """The compiled UNet on one working size's graph, whatever the rows and the prompt's length."""
        import torch._dynamo

        rows = x.shape[0]
        if rows == 1:
            # Dynamo gives a dimension of size 1 a graph of its own: a copy of the row keeps the
            # request on the warmed-up graph (no guidance and one image: rare, and cheap next to a compile).
            x, embeds, pooled, time_ids = (torch.cat([v, v]) for v in (x, embeds, pooled, time_ids))
        # Contiguous, as dynamo guards on strides too (time_ids come expanded, a padded row makes a copy).
        x, embeds, pooled, time_ids = (v.contiguous() for v in (x, embeds, pooled, time_ids))
        for tensor in (x, embeds, pooled, time_ids):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(embeds, 1)  # 77 tokens per text chunk
        cond = {"text_embeds": pooled, "time_ids": time_ids}
        return self.c.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=cond, return_dict=False)[0][:rows]

    def _check_compiled_size(self, size: tuple[int, int]) -> None:
        height, width = size
        if (width, height) in self.compiled_sizes or (width, height) in self._warned_sizes:
            return
        self._warned_sizes.add((width, height))
        log.warning(
            "working size %dx%d is not among the %d compiled sizes: it compiles now, or runs eagerly once"
            " dynamo's recompile limit is reached",
            width,
            height,
            len(self.compiled_sizes),
        )


def _compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _guided(prompts: PromptEmbeddings, cfg: bool, *, pooled: bool) -> list[torch.Tensor]:
    if pooled:
        return [prompts.negative_pooled, prompts.pooled] if cfg else [prompts.pooled]
    return [prompts.negative_embeds, prompts.prompt_embeds] if cfg else [prompts.prompt_embeds]


def check_finite(images: torch.Tensor, dtype: torch.dtype) -> None:
    """One check at the end rather than per step: a per-step check would sync the GPU every step."""
    if not torch.isfinite(images).all():
        raise NonFiniteOutput(str(dtype).removeprefix("torch."))
