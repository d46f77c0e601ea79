"""The parts of an SDXL inpainting model, however they were loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    # The model's own noise table and prediction type live in this scheduler's config; the
    # sampler of each request is built from it.
    scheduler: SchedulerMixin

    def save(self, folder: str | Path) -> None:
        """Write a diffusers-layout folder (model_index.json and one sub-folder per component)."""
        from diffusers import StableDiffusionXLInpaintPipeline

        StableDiffusionXLInpaintPipeline(**self.as_pipeline_kwargs()).save_pretrained(str(folder))

    def as_pipeline_kwargs(self) -> dict:
        return {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "tokenizer": self.tokenizer,
            "tokenizer_2": self.tokenizer_2,
            "scheduler": self.scheduler,
        }
