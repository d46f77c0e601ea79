"""The contract's bodies: the request, with every field's default and range, and the responses."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)

from models.names import DEFAULT_SAMPLER, DEFAULT_SCHEDULER, DEFAULT_STYLES, SAMPLERS, SCHEDULERS
from models.seeds import MAX_SEED
from models.styles import StyleRegistry, UnknownStyle, default_registry
from server.jobs.contract import OUTPUT_FORMATS, Delivery, JobParams

# The one place the API checks sampler, scheduler and style names (styles: against the registry).
Sampler = enum.Enum("Sampler", {name: name for name in SAMPLERS}, type=str)  # type: ignore[misc]
Scheduler = enum.Enum("Scheduler", {name: name for name in SCHEDULERS}, type=str)  # type: ignore[misc]
Side = Annotated[StrictInt, Field(ge=0, le=1024, description="pixels to add on this side")]
# Field descriptions of what the hosted API does not have start with this (docs/extensions.md).
EXTENSION = "Extension of the hosted API: "
OutputFormat = Literal["jpeg", "png", "webp"]
assert set(OutputFormat.__args__) == set(OUTPUT_FORMATS)  # type: ignore[attr-defined]


def _known(value: Any, names: tuple[str, ...], what: str) -> Any:
    if isinstance(value, str) and value not in names:
        raise ValueError(f"unknown {what} {value!r}; one of {', '.join(names)}")
    return value


class SegBeyondRequest(BaseModel):
    """The request body of `POST /v1/seg-beyond` and `POST /v2/seg-beyond`; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    input_image: StrictStr = Field(
        min_length=1, description="the image: an http(s) URL, base64 of its bytes, or a data: URL (PNG, JPEG, WebP)"
    )
    prompt: StrictStr = Field(description="what the new area should show")
    negative_prompt: StrictStr | None = Field(None, description="what it should not show")
    steps: Annotated[StrictInt, Field(ge=20, le=100, description="denoising steps")] = 30
    samples: Annotated[StrictInt, Field(ge=1, le=4, description="number of images, seeds seed, seed+1, ...")] = 1
    styles: StrictStr = Field(
        DEFAULT_STYLES, description="comma-separated style names (GET /v1/styles); V2 is the prompt expansion"
    )
    seed: Annotated[StrictInt, Field(ge=-1, le=MAX_SEED, description="-1 draws a random seed")] = -1
    # NaN, Infinity and 1e999 are JSON to Python: "must be finite" rather than "less than or equal to 25".
    guidance_scale: Annotated[
        StrictFloat, Field(ge=1, le=25, allow_inf_nan=False, description="classifier-free guidance")
    ] = 4.0
    scheduler: Scheduler = Field(Scheduler(DEFAULT_SCHEDULER), description="noise schedule (ComfyUI's names)")
    sampler: Sampler = Field(Sampler(DEFAULT_SAMPLER), description="sampler (ComfyUI's names)")
    left: Side = 0
    right: Side = 0
    top: Side = 0
    bottom: Side = 0
    base64: StrictBool = Field(False, description="true: images inline as base64 instead of bytes (v1) or URLs (v2)")

    # Extensions (docs/extensions.md): a request that sends none of them is served exactly as before.
    output_format: OutputFormat = Field(
        "jpeg",
        description=EXTENSION + "the images' format: jpeg (the hosted API's), png (lossless: the input's pixels are"
        " kept bit for bit outside the seam band) or webp",
    )
    output_quality: Annotated[
        StrictInt, Field(ge=1, le=100, description=EXTENSION + "encoder quality of jpeg and webp (png ignores it)")
    ] = 95
    webhook_url: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description=EXTENSION + "an http(s) URL the server POSTs the final result to (the body GET /v2/requests/{id}"
        " answers), signed per Standard Webhooks; needs BEYOND_WEBHOOK_SECRET on the server",
    )

    @field_validator("input_image", "prompt", "negative_prompt", "styles", "webhook_url")
    @classmethod
    def _valid_text(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                # JSON's \ud800 escapes decode to lone surrogates, which no text encoder can take.
                raise ValueError("not valid Unicode text (a lone surrogate)") from None
        return value

    @field_validator("scheduler", mode="before")
    @classmethod
    def _known_scheduler(cls, value: Any) -> Any:
        return _known(value, SCHEDULERS, "scheduler")

    @field_validator("sampler", mode="before")
    @classmethod
    def _known_sampler(cls, value: Any) -> Any:
        return _known(value, SAMPLERS, "sampler")

    @field_validator("styles")
    @classmethod
    def _known_styles(cls, value: str, info: ValidationInfo) -> str:
        # The server passes its registry (built-ins plus BEYOND_STYLES_DIR) as validation context.
        registry: StyleRegistry = (info.context or {}).get("registry") or default_registry()
        try:
            registry.parse(value)
        except UnknownStyle as exc:
            raise ValueError(f"unknown style '{exc.name}'; GET /v1/styles lists the known ones") from None
        return value

    def delivery(self, base_url: str | None) -> Delivery:
        """How the results reach the client; `base_url` (the public base the client used) is kept only for a
        webhook, whose body carries absolute output URLs."""
        webhook = self.webhook_url.strip() if self.webhook_url else None
        return Delivery(
            output_format=self.output_format,
            output_quality=self.output_quality,
            webhook_url=webhook,
            base_url=base_url if webhook else None,
        )

    def job_params(self, registry: StyleRegistry, seed: int) -> JobParams:
        """The job's parameters, built once: stored with the job and echoed in results."""
        return JobParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or "",
            steps=self.steps,
            samples=self.samples,
            styles=tuple(registry.parse(self.styles)),
            seed=seed,
            guidance_scale=float(self.guidance_scale),
            scheduler=self.scheduler.value,
            sampler=self.sampler.value,
            left=self.left,
            right=self.right,
            top=self.top,
            bottom=self.bottom,
        )


Status = Literal["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]


class ErrorBody(BaseModel):
    error: str = Field(description="what went wrong; for bad input it starts with the field's name")


class FailedBody(BaseModel):
    status: Literal["FAILED"]
    request_id: str
    error: str = Field(description="why the request failed ('cancelled' when it was cancelled)")


class SubmitResponse(BaseModel):
    request_id: str
    status: Status
    status_url: str = Field(description="absolute URL to poll: GET it for the status")
    response_url: str = Field(description="absolute URL of the result")


class StatusResponse(BaseModel):
    status: Status
    request_id: str
    queue_position: int | None = Field(None, description="QUEUED: requests ahead of this one")
    progress: float | None = Field(None, ge=0, le=1, description="PROCESSING: share of the denoising steps done")
    preview: str | None = Field(None, description="PROCESSING: URL of a small JPEG of the current latents, once made")


class RunMetrics(BaseModel):
    inference_time: float = Field(description="engine seconds")
    queue_time: float = Field(description="seconds from acceptance to start")
    total_time: float = Field(description="seconds from acceptance to completion")


class Prompts(BaseModel):
    positive: list[str] = Field(description="the prompt encoded for each sample, styles applied")
    negative: list[str]


class WebhookStatus(BaseModel):
    delivered: bool = Field(description="the receiver answered 2xx")
    attempts: int = Field(description="attempts made so far (up to 5, within about ten minutes)")
    last_status: int | None = Field(None, description="the HTTP status of the last attempt (none: no answer)")
    error: str | None = Field(None, description="why the last attempt failed")


class ResultResponse(BaseModel):
    status: Status
    request_id: str
    created_at: str | None = None
    started_at: str | None = None
    parameters: dict[str, Any] = Field(description="the request's parameters as run (the seed drawn for -1)")
    output: str | None = Field(None, description="the first image: its URL, or base64 with base64: true")
    outputs: list[str] | None = Field(None, description="every image, in seed order")
    seeds: list[int] | None = None
    width: int | None = None
    height: int | None = None
    completed_at: str | None = None
    expires_at: str | None = Field(None, description="when the result and its images are deleted")
    metrics: RunMetrics | None = None
    prompts: Prompts | None = None
    styles: list[str] | None = Field(None, description="the styles applied")
    notes: dict[str, Any] | None = None
    working_size: list[int] | None = Field(None, description="the size the model worked at")
    webhook: WebhookStatus | None = Field(
        None, description=EXTENSION + "only for a request with a webhook_url: how its delivery went"
    )


class ListedRequest(BaseModel):
    request_id: str
    status: Status
    created_at: str
    completed_at: str | None = Field(None, description="COMPLETED or FAILED: when it ended")
    outputs: list[str] | None = Field(None, description="COMPLETED: the output URLs")
    error: str | None = Field(None, description="FAILED: why")


class RequestList(BaseModel):
    requests: list[ListedRequest] = Field(description="the caller's requests, newest first")
    next_cursor: str | None = Field(None, description="pass as cursor for the next page; none: this is the last")


class CancelResponse(BaseModel):
    request_id: str
    status: Status
    cancel_requested: bool
    error: str | None = None
