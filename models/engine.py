"""The outpainting engine: a request in, images out. Used by the server's worker and from plain Python."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.canvas import Padding, build_canvas, paste_back, working_size
from models.composer import PromptComposer
from models.devices import resolve_device, resolve_dtype
from models.errors import Cancelled, OutOfMemory
from models.names import DEFAULT_SAMPLER, DEFAULT_SCHEDULER, SAMPLERS, SCHEDULERS
from models.pipeline import OutpaintPipeline
from models.prompts import encode_prompts
from models.seeds import draw_seed
from models.speed import SpeedOptions

__all__ = ["Cancelled", "OutOfMemory", "OutpaintEngine", "OutpaintRequest", "OutpaintResult"]


@dataclass
class OutpaintRequest:
    image: Image.Image
    prompt: str
    negative_prompt: str = ""
    steps: int = 30
    samples: int = 1
    styles: list[str] = field(default_factory=lambda: ["V2", "Enhance", "Sharp"])
    seed: int = -1
    guidance_scale: float = 4.0
    scheduler: str = DEFAULT_SCHEDULER
    sampler: str = DEFAULT_SAMPLER
    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0

    @property
    def padding(self) -> Padding:
        return Padding(self.left, self.right, self.top, self.bottom)


@dataclass
class OutpaintResult:
    images: list[Image.Image]
    seeds: list[int]
    positive_prompts: list[str]
    negative_prompts: list[str]
    styles: list[str]
    working_size: tuple[int, int]
    inference_time: float
    notes: dict = field(default_factory=dict)


class OutpaintEngine:
    def __init__(self, pipeline: OutpaintPipeline, spec: str, composer: PromptComposer | None = None) -> None:
        self.pipeline = pipeline
        self.spec = spec
        self.composer = composer or PromptComposer()

    @classmethod
    def load(
        cls,
        spec: str = "random:tiny",
        device: str = "auto",
        dtype: str = "auto",
        speed: SpeedOptions | None = None,
        *,
        tokenizer_dir: str | Path | None = None,
    ) -> OutpaintEngine:
        """`tokenizer_dir`: where a single-file checkpoint's tokenizers are looked for first."""
        from models.loading import load_components

        dev = resolve_device(device)
        components = load_components(spec, tokenizer_dir=tokenizer_dir)
        return cls(OutpaintPipeline(components, dev, resolve_dtype(dtype, dev), speed), spec)

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.dtype

    def describe(self) -> dict:
        return {
            "model": self.spec,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "inpainting_unet": self.pipeline.inpainting_unet,
            "native_area": self.pipeline.native_area,
        }

    def run(
        self, request: OutpaintRequest, on_step: Callable[[int, int], None] | None = None
    ) -> OutpaintResult:
        if request.sampler not in SAMPLERS:
            raise ValueError(f"sampler: unknown {request.sampler!r}")
        if request.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler: unknown {request.scheduler!r}")
        started = time.perf_counter()
        first = draw_seed() if request.seed == -1 else request.seed
        seeds = [first + i for i in range(request.samples)]
        original = request.image.convert("RGB")
        pad = request.padding
        composed = self.composer.compose(request.prompt, request.negative_prompt, request.styles, seeds)
        if not pad.any:
            # Nothing to outpaint: the answer is the input, untouched.
            images = [original.copy() for _ in seeds]
            size = original.size
        else:
            out_of_memory = None
            try:
                images, size = self._outpaint(
                    original, pad, composed.positives, composed.negatives, seeds, request, on_step
                )
            except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
                out_of_memory = str(exc) or type(exc).__name__
            if out_of_memory is not None:
                # Outside the except block, so the traceback no longer holds the failed run's
                # tensors: their cached blocks go back to the device for the next request.
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                canvas = pad.canvas_size(original.width, original.height)
                raise OutOfMemory(str(self.device), len(seeds), canvas, out_of_memory)
        return OutpaintResult(
            images=images,
            seeds=seeds,
            positive_prompts=composed.positives,
            negative_prompts=composed.negatives,
            styles=composed.styles,
            working_size=size,
            inference_time=time.perf_counter() - started,
            notes=composed.notes,
        )

    def _outpaint(
        self,
        original: Image.Image,
        pad: Padding,
        positives: list[str],
        negatives: list[str],
        seeds: list[int],
        request: OutpaintRequest,
        on_step: Callable[[int, int], None] | None,
    ) -> tuple[list[Image.Image], tuple[int, int]]:
        canvas, mask = build_canvas(original, pad)
        work_w, work_h = working_size(canvas.width, canvas.height, self.pipeline.native_area)
        pixels = np.asarray(canvas.resize((work_w, work_h), Image.Resampling.LANCZOS), dtype=np.float32)
        image = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)[None]
        # Bilinear then "any part new" keeps the overlap band inside the mask after downscaling.
        mask_small = Image.fromarray((mask * 255).astype(np.uint8)).resize(
            (work_w, work_h), Image.Resampling.BILINEAR
        )
        mask_t = torch.from_numpy((np.asarray(mask_small) > 0).astype(np.float32))[None, None]
        embeddings = encode_prompts(self.pipeline.c, positives, negatives, self.device, self.dtype)
        out = self.pipeline(
            image=image,
            mask=mask_t,
            prompts=embeddings,
            seeds=seeds,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            sampler=request.sampler,
            schedule=request.scheduler,
            on_step=on_step,
        )
        arrays = (out.permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
        images = [
            paste_back(Image.fromarray(a).resize(canvas.size, Image.Resampling.LANCZOS), original, pad)
            for a in arrays
        ]
        return images, (work_w, work_h)
