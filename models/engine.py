"""The outpainting engine: a request in, images out. Used by the server's worker and from plain Python."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from models.canvas import (
    SEAM_BAND,
    Padding,
    build_canvas,
    match_colors,
    original_weight,
    paste_back,
    split_alpha,
    working_size,
)
from models.composer import ComposedPrompts, PromptComposer
from models.devices import resolve_device, resolve_dtype
from models.errors import Cancelled, NoLoraFolder, OutOfMemory
from models.names import SAMPLERS, SCHEDULERS
from models.params import LoraRef, OutpaintParams
from models.pipeline import LatentInputs, OutpaintPipeline, StepCallback, check_finite
from models.prompts import encode_prompts
from models.sampling.registry import SAMPLER_SPECS
from models.seeds import draw_seed, sample_seeds
from models.speed import SpeedOptions

if TYPE_CHECKING:
    from models.lora_weights import EngineLoras

__all__ = ["Cancelled", "OutOfMemory", "OutpaintEngine", "OutpaintRequest", "OutpaintResult", "PreparedJob"]
# Bytes of LoRA weights the engine keeps loaded by default (models/lora_weights.py LoraCache).
DEFAULT_LORA_CACHE = 1 << 30


@dataclass(frozen=True, kw_only=True)
class OutpaintRequest(OutpaintParams):
    """The parameters (models/params.py) and the image they apply to."""

    image: Image.Image

    @classmethod
    def of(cls, image: Image.Image, params: OutpaintParams) -> OutpaintRequest:
        return cls(image=image, **params.values())

    @property
    def padding(self) -> Padding:
        return Padding(self.left, self.right, self.top, self.bottom)


@dataclass
class PreparedJob:
    """A request made ready for the denoising loop by `OutpaintEngine.prepare`."""

    request: OutpaintRequest
    seeds: list[int]
    original: Image.Image
    composed: ComposedPrompts
    canvas: tuple[int, int]  # the padded canvas (width, height)
    inputs: LatentInputs | None = None  # None: nothing to outpaint
    # With transparent pixels: the original's weight in the paste-back, per pixel (None: the seam feather).
    weight: np.ndarray | None = None
    alpha: np.ndarray | None = None  # the input's alpha, when some pixel is transparent
    busy: float = 0.0  # seconds of engine work spent on this job so far

    @property
    def rows(self) -> int:
        return len(self.seeds)

    @property
    def canvas_size(self) -> tuple[int, int]:
        return self.request.padding.canvas_size(*self.original.size)

    @property
    def working_size(self) -> tuple[int, int]:
        if self.inputs is None:
            return self.original.size
        height, width = self.inputs.size
        return width, height

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can be denoised in one batch; None: this one runs alone."""
        r = self.request
        if self.inputs is None or not SAMPLER_SPECS[r.sampler].batchable:
            return None
        # Every parameter but the per-job ones (prompts, seeds, padding: each row has its own).
        return (self.inputs.size, self.inputs.tokens, *r.batch_values())


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
        self.loras: EngineLoras | None = None  # enable_loras; None: a request with LoRAs is refused

    def enable_loras(self, folder: str | Path | None, cache_bytes: int = DEFAULT_LORA_CACHE) -> EngineLoras:
        """Take LoRAs by name from `folder` (*.safetensors files), keeping up to `cache_bytes` of them loaded."""
        from models.lora_files import LoraLibrary
        from models.lora_weights import EngineLoras, model_layout

        if self.loras is not None:  # the model as it was, before new patches take note of its weights
            self.loras.text.apply((), [])
            self.loras.unet.apply((), [])
        components = self.pipeline.c
        library = LoraLibrary(Path(folder) if folder is not None else None, model_layout(components))
        self.loras = EngineLoras(library, components, self.device, self.dtype, cache_bytes)
        return self.loras

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
        from models.loading import RANDOM_SPECS, load_components
        from models.random_models import build_random

        dev = resolve_device(device)
        if spec in RANDOM_SPECS:
            # Random weights drawn on the device itself: 3.5 B of them take long on a CPU.
            components = build_random(spec, device=dev)
        else:
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

    def run(self, request: OutpaintRequest, on_step: Callable[[int, int], None] | None = None) -> OutpaintResult:
        """One request alone: prepare, denoise, finish."""
        job = self.prepare(request)
        (images,) = self.denoise([job], [on_step])
        return self.finish(job, images)

    def prepare(self, request: OutpaintRequest) -> PreparedJob:
        """Everything before the denoising: seeds, prompts, canvas, mask, text embeddings, latents."""
        if request.sampler not in SAMPLERS:
            raise ValueError(f"sampler: unknown {request.sampler!r}")
        if request.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler: unknown {request.scheduler!r}")
        if request.loras:
            self._lora_set().check(request.loras)
        started = time.perf_counter()
        first = draw_seed() if request.seed == -1 else request.seed
        seeds = sample_seeds(first, request.samples)
        original, alpha = split_alpha(request.image)
        pad = request.padding
        composed = self.composer.compose(request.prompt, request.negative_prompt, request.styles, seeds)
        job = PreparedJob(request, seeds, original, composed, original.size, alpha=alpha)
        # Transparent pixels are generated like padding: an image with some has something to outpaint.
        if pad.any or alpha is not None:
            out_of_memory = None
            band = request.seam_width
            try:
                if alpha is not None:
                    job.weight = original_weight(*original.size, pad, alpha, band)
                job.canvas, job.inputs = self._prepare_latents(
                    original, pad, composed, seeds, alpha, job.weight, band, request.loras
                )
            except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
                out_of_memory = str(exc) or type(exc).__name__
            if out_of_memory is not None:
                self._raise_out_of_memory(out_of_memory, len(seeds), job.canvas_size)
        job.busy = time.perf_counter() - started
        return job

    def denoise(
        self,
        jobs: list[PreparedJob],
        on_steps: list[StepCallback | None] | None = None,
        on_latents: Callable[[torch.Tensor], None] | None = None,
    ) -> list[torch.Tensor | None]:
        """Denoise compatible prepared jobs (`batch_key` equal) in one batch; each job's images.

        `on_steps[i]` is job i's progress callback; a job whose callback raises Cancelled leaves the
        batch: its rows go on being computed (a scheduler's per-item state cannot drop rows) but
        its callback is not called again and its entry in the answer is None; the batch stops
        (Cancelled) once every job in it has. `on_latents` sees the whole batch's latents after
        each step (rows in job order, `PreparedJob.rows` each). Jobs with nothing to outpaint get
        None here too and their images from `finish`.
        """
        callbacks = list(on_steps) if on_steps is not None else [None] * len(jobs)
        active = [i for i, job in enumerate(jobs) if job.inputs is not None]
        answers: list[torch.Tensor | None] = [None] * len(jobs)
        if not active:
            return answers
        keys = {jobs[i].batch_key for i in active}
        if len(keys) != 1 or None in keys and len(active) > 1:
            raise ValueError("these jobs cannot share a batch")
        request = jobs[active[0]].request
        cancelled: set[int] = set()

        def on_step(step: int, total: int) -> None:
            for i in active:
                callback = callbacks[i]
                if i in cancelled or callback is None:
                    continue
                try:
                    callback(step, total)
                except Cancelled:
                    cancelled.add(i)
            if len(cancelled) == len(active):
                raise Cancelled()

        started = time.perf_counter()
        out_of_memory = None
        try:
            if self.loras is not None or request.loras:
                self._lora_set().activate_unet(request.loras)
            images = self.pipeline.denoise(
                [jobs[i].inputs for i in active],
                request.steps,
                request.guidance_scale,
                request.sampler,
                request.scheduler,
                on_step,
                on_latents,
            )
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            out_of_memory = str(exc) or type(exc).__name__
        if out_of_memory is not None:
            first = jobs[active[0]]
            self._raise_out_of_memory(out_of_memory, sum(jobs[i].rows for i in active), first.canvas_size)
        spent = time.perf_counter() - started
        for i, part in zip(active, images, strict=True):
            jobs[i].busy += spent
            if i not in cancelled:
                answers[i] = part
        return answers

    def finish(self, job: PreparedJob, images: torch.Tensor | None) -> OutpaintResult:
        """The denoised images of `job` back on its canvas, pasted over the original."""
        started = time.perf_counter()
        if job.inputs is None:
            # Nothing to outpaint: the answer is the input, untouched.
            pictures = [job.original.copy() for _ in job.seeds]
        else:
            if images is None:
                raise Cancelled()
            check_finite(images, self.dtype)
            request = job.request
            pad = request.padding
            arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
            pictures = []
            for a in arrays:
                generated = Image.fromarray(a).resize(job.canvas, Image.Resampling.LANCZOS)
                if request.color_match:
                    generated = Image.fromarray(match_colors(np.asarray(generated), job.original, pad, job.alpha))
                pictures.append(paste_back(generated, job.original, pad, request.seam_width, job.weight))
        job.busy += time.perf_counter() - started
        composed = job.composed
        return OutpaintResult(
            images=pictures,
            seeds=job.seeds,
            positive_prompts=composed.positives,
            negative_prompts=composed.negatives,
            styles=composed.styles,
            working_size=job.working_size,
            inference_time=job.busy,
            notes=composed.notes,
        )

    def _lora_set(self) -> EngineLoras:
        if self.loras is None:
            raise NoLoraFolder()
        return self.loras

    @contextlib.contextmanager
    def _text_encoders(self, loras: tuple[LoraRef, ...]) -> Iterator[None]:
        """The text encoders under the request's LoRAs while its prompts are encoded."""
        if self.loras is None and not loras:
            yield
            return
        with self._lora_set().text_encoders(loras):
            yield

    def _raise_out_of_memory(self, detail: str, samples: int, canvas: tuple[int, int]) -> None:
        # Called outside the except block, so the traceback no longer holds the failed run's
        # tensors: their cached blocks go back to the device for the next request.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise OutOfMemory(str(self.device), samples, canvas, detail)

    def _prepare_latents(
        self,
        original: Image.Image,
        pad: Padding,
        composed: ComposedPrompts,
        seeds: list[int],
        alpha: np.ndarray | None = None,
        weight: np.ndarray | None = None,
        band: int = SEAM_BAND,
        loras: tuple[LoraRef, ...] = (),
    ) -> tuple[tuple[int, int], LatentInputs]:
        canvas, mask = build_canvas(original, pad, alpha, weight, band)
        # A compiled UNet has graphs for a fixed set of sizes: the nearest of them (else unchanged).
        work_w, work_h = self.pipeline.snap(working_size(*canvas.size, self.pipeline.native_area), canvas.size)
        pixels = np.asarray(canvas.resize((work_w, work_h), Image.Resampling.LANCZOS), dtype=np.float32)
        image = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)[None]
        # Bilinear then "any part new" keeps the overlap band inside the mask after downscaling.
        mask_small = Image.fromarray((mask * 255).astype(np.uint8)).resize((work_w, work_h), Image.Resampling.BILINEAR)
        mask_t = torch.from_numpy((np.asarray(mask_small) > 0).astype(np.float32))[None, None]
        with self._text_encoders(loras):
            embeddings = encode_prompts(
                self.pipeline.c, composed.positives, composed.negatives, self.device, self.dtype
            )
        return canvas.size, self.pipeline.prepare(image, mask_t, embeddings, seeds)
