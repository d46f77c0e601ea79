"""The request body of the contract: every field with its default and range, in one model."""

from __future__ import annotations

from typing import Annotated, Any

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

Side = Annotated[StrictInt, Field(ge=0, le=1024)]


class SegBeyondRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_image: StrictStr = Field(min_length=1, description="http(s) URL, base64 or data: URL of the image")
    prompt: StrictStr
    negative_prompt: StrictStr | None = None
    steps: Annotated[StrictInt, Field(ge=20, le=100)] = 30
    samples: Annotated[StrictInt, Field(ge=1, le=4)] = 1
    styles: StrictStr = DEFAULT_STYLES
    seed: Annotated[StrictInt, Field(ge=-1, le=MAX_SEED)] = -1
    guidance_scale: Annotated[StrictFloat, Field(ge=1, le=25)] = 4.0
    scheduler: StrictStr = DEFAULT_SCHEDULER
    sampler: StrictStr = DEFAULT_SAMPLER
    left: Side = 0
    right: Side = 0
    top: Side = 0
    bottom: Side = 0
    base64: StrictBool = False

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {value!r}; one of {', '.join(SCHEDULERS)}")
        return value

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        if value not in SAMPLERS:
            raise ValueError(f"unknown sampler {value!r}; one of {', '.join(SAMPLERS)}")
        return value

    @field_validator("styles")
    @classmethod
    def _known_styles(cls, value: str, info: ValidationInfo) -> str:
        # The server passes its registry (built-ins plus BEYOND_STYLES_DIR) as validation context.
        registry: StyleRegistry = (info.context or {}).get("registry") or default_registry()
        try:
            registry.parse(value)
        except UnknownStyle as exc:
            raise ValueError(str(exc).removeprefix("styles: ")) from None
        return value

    def engine_params(self, registry: StyleRegistry) -> dict[str, Any]:
        """What the engine needs besides the image; stored with the job and echoed in results."""
        params = self.model_dump(exclude={"input_image", "base64"})
        params["negative_prompt"] = self.negative_prompt or ""
        params["guidance_scale"] = float(self.guidance_scale)
        params["styles"] = registry.parse(self.styles)
        return params
