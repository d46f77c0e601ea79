"""The contract's bodies: the request, with every field's default and range, and the responses."""

from __future__ import annotations

import enum
import typing
from collections.abc import Mapping
from dataclasses import MISSING, is_dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    create_model,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema
from starlette.responses import Response

from models.errors import LoraError, NoLoraFolder, UnknownLora
from models.lora_files import LoraLibrary
from models.names import DEFAULT_STYLES
from models.params import PARAMETERS, LoraRef, Param, parameters_of
from models.styles import StyleRegistry, UnknownStyle, default_registry
from server.jobs.contract import OUTPUT_FORMATS, Delivery, JobParams

# Field descriptions of what the hosted API does not have start with this (docs/extensions.md).
EXTENSION = "Extension of the hosted API: "
OutputFormat = Literal["jpeg", "png", "webp"]
assert set(OutputFormat.__args__) == set(OUTPUT_FORMATS)  # type: ignore[attr-defined]

# The engine's parameters (models/params.py) in the request body. A parameter's JSON type follows its
# type; one with choices is an enum named after it (the one place the API checks sampler and scheduler
# names); a list of dataclass items (loras) is an array of objects with the item's own fields, its
# length at most max_items. Where the hosted API's form is not the engine's, the body has its own field
# (_HOSTED_FORMS).
_STRICT: dict[Any, Any] = {int: StrictInt, float: StrictFloat, str: StrictStr, bool: StrictBool}
_HOSTED_FORMS: dict[str, tuple[Any, Any]] = {
    "negative_prompt": (StrictStr | None, Field(None, description=PARAMETERS["negative_prompt"][2].description)),
    # Validated against the registry (styles: built-ins plus BEYOND_STYLES_DIR), then parsed into names.
    "styles": (
        StrictStr,
        Field(DEFAULT_STYLES, description="comma-separated style names (GET /v1/styles); V2 is the prompt expansion"),
    ),
}


def _body_field(name: str) -> tuple[Any, Any]:
    """(annotation, FieldInfo) of an engine parameter in the request body."""
    if name in _HOSTED_FORMS:
        return _HOSTED_FORMS[name]
    kind, default, info = PARAMETERS[name]
    return _field(name, kind, default, info)


def _field(name: str, kind: Any, default: Any, info: Param) -> tuple[Any, Any]:
    """(annotation, FieldInfo) of a field made with models.params.param: a parameter, or a list item's field."""
    limits: dict[str, Any] = {key: value for key, value in (("ge", info.ge), ("le", info.le)) if value is not None}
    if typing.get_origin(kind) is tuple:
        (item, _) = typing.get_args(kind)
        annotation = list[_item_model(item)]  # type: ignore[misc]
        if info.max_items is not None:
            limits["max_length"] = info.max_items
    else:
        annotation = _STRICT[kind]
    if info.choices:
        title = "".join(part.title() for part in name.split("_"))
        annotation = enum.Enum(title, {choice: choice for choice in info.choices}, type=str)  # type: ignore[misc]
        default = default if default is MISSING else annotation(default)
    if kind is float:
        # NaN, Infinity and 1e999 are JSON to Python: "must be finite" rather than "less than or equal to 25".
        limits["allow_inf_nan"] = False
    description = (EXTENSION if info.extension else "") + info.description
    return annotation, Field(... if default is MISSING else default, description=description, **limits)


def _item_model(item: type) -> type[BaseModel]:
    """The body form of a list's items, from the item type's own fields (a JSON object with no other keys)."""
    if not is_dataclass(item):
        raise TypeError(f"a list parameter's items must be a dataclass of models.params.param fields, not {item}")
    fields = {name: _field(name, *spec) for name, spec in parameters_of(item).items()}
    return create_model(item.__name__, __config__=ConfigDict(extra="forbid"), **fields)  # type: ignore[call-overload]


_FIELDS = {name: _body_field(name) for name in PARAMETERS}
_CHOICES = tuple(name for name, (_, _, info) in PARAMETERS.items() if info.choices)
_TEXTS = tuple(name for name, (annotation, _) in _FIELDS.items() if annotation in (StrictStr, StrictStr | None))


def _known(value: Any, names: tuple[str, ...], what: str) -> Any:
    if isinstance(value, str) and value not in names:
        raise ValueError(f"unknown {what} {value!r}; one of {', '.join(names)}")
    return value


class _Image(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_image: StrictStr = Field(
        min_length=1, description="the image: an http(s) URL, base64 of its bytes, or a data: URL (PNG, JPEG, WebP)"
    )


# input_image, then the engine's parameters in their order, then SegBeyondRequest's own fields.
_WithParameters = create_model("_WithParameters", __base__=_Image, **_FIELDS)  # type: ignore[call-overload]


class SegBeyondRequest(_WithParameters):  # type: ignore[misc,valid-type]
    """The request body of `POST /v1/seg-beyond` and `POST /v2/seg-beyond`; unknown fields are ignored."""

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

    @field_validator("input_image", *_TEXTS, "webhook_url")
    @classmethod
    def _valid_text(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                # JSON's \ud800 escapes decode to lone surrogates, which no text encoder can take.
                raise ValueError("not valid Unicode text (a lone surrogate)") from None
        return value

    @field_validator(*_CHOICES, mode="before")
    @classmethod
    def _known_choice(cls, value: Any, info: ValidationInfo) -> Any:
        return _known(value, PARAMETERS[info.field_name][2].choices, info.field_name)

    @field_validator("loras")
    @classmethod
    def _usable_loras(cls, value: tuple[Any, ...], info: ValidationInfo) -> tuple[Any, ...]:
        # The server passes its LoRA folder (BEYOND_LORA_DIR) as validation context: unknown names and
        # files that do not fit the served model are refused here, before a job exists.
        if not value:
            return value
        library: LoraLibrary | None = (info.context or {}).get("loras")
        try:
            if library is None or not library.configured:
                raise NoLoraFolder()
            library.check(LoraRef(item.name, item.scale) for item in value)
        except NoLoraFolder:
            raise ValueError("this server has no LoRA folder (BEYOND_LORA_DIR), so it takes no LoRAs") from None
        except UnknownLora as exc:
            raise ValueError(f"{exc}; GET /v1/loras lists the LoRAs of this server") from None
        except LoraError as exc:
            raise ValueError(str(exc)) from None
        return value

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
        values = {}
        for name, (kind, _, _) in PARAMETERS.items():
            value = getattr(self, name)
            values[name] = value.value if isinstance(value, enum.Enum) else float(value) if kind is float else value
        values["loras"] = tuple(LoraRef(item.name, float(item.scale)) for item in self.loras)
        values["negative_prompt"] = self.negative_prompt or ""
        values["styles"] = tuple(registry.parse(self.styles))
        values["seed"] = seed
        return JobParams(**values)


Status = Literal["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]
# What a body that is not the 422 FAILED one can say of a request.
LiveStatus = Literal["QUEUED", "PROCESSING", "COMPLETED"]


def _absent_if_none(value: object) -> bool:
    return value is None


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # a member left out has no value, not null


T = TypeVar("T")
# A member that is left out of the body where it does not apply: never null, so the schema does not offer null.
Absent = Annotated[T | SkipJsonSchema[None], Field(exclude_if=_absent_if_none, json_schema_extra=_no_default)]


class Body(BaseModel):
    """A JSON body the server answers. Every one is rendered from its model, the model its route documents,
    so the documentation and the bytes cannot differ. Members are in the order their fields are declared."""

    model_config = ConfigDict(extra="forbid")

    def render(self) -> bytes:
        return self.__pydantic_serializer__.to_json(self)

    def data(self) -> dict[str, Any]:
        """The body as JSON-ready values (for what is not sent as an HTTP body: event data)."""
        return self.model_dump(mode="json")


class BodyResponse(Response):
    """An HTTP answer whose body is one of the documented models."""

    media_type = "application/json"

    def __init__(self, body: Body, status_code: int = 200, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(body.render(), status_code, headers)


class ErrorBody(Body):
    status: Absent[Status] = Field(None, description="a 409 of a cancel only: the state the request ended in")
    error: str = Field(description="what went wrong; for bad input it starts with the field's name")


class WebhookStatus(Body):
    delivered: bool = Field(description="the receiver answered 2xx")
    attempts: int = Field(ge=0, description="attempts made so far (up to 5, within about ten minutes)")
    last_status: int | None = Field(description="the HTTP status of the last attempt (none: no answer)")
    error: str | None = Field(description="why the last attempt failed")


WEBHOOK = EXTENSION + "only for a request with a webhook_url: how its delivery went"


class FailedBody(Body):
    status: Literal["FAILED"]
    request_id: str
    webhook: Absent[WebhookStatus] = Field(None, description=WEBHOOK)
    error: str = Field(description="why the request failed ('cancelled' when it was cancelled)")


class SubmitResponse(Body):
    request_id: str
    status: Status
    status_url: str = Field(description="absolute URL to poll: GET it for the status")
    response_url: str = Field(description="absolute URL of the result")


class StatusResponse(Body):
    status: LiveStatus = Field(description="FAILED is answered as 422 with FailedBody")
    request_id: str
    queue_position: Absent[Annotated[int, Field(ge=0)]] = Field(
        None, description="QUEUED only: requests ahead of this one"
    )
    progress: Absent[Annotated[float, Field(ge=0, le=1)]] = Field(
        None, description="PROCESSING only: share of the denoising steps done"
    )
    preview: Absent[str] = Field(
        None, description="PROCESSING only, once made: URL of a small JPEG of the current latents"
    )


class AppliedLora(Body):
    name: str = Field(description="the LoRA's name in the server's LoRA folder")
    scale: float = Field(description="its strength")


def _run_field(kind: Any, info: Param) -> tuple[Any, Any]:
    """(annotation, FieldInfo) of a parameter in a result's `parameters`: the value it was run with."""
    if typing.get_origin(kind) is tuple:
        (item, _) = typing.get_args(kind)
        annotation: Any = list[AppliedLora] if is_dataclass(item) else list[str]
    else:
        annotation = kind
    if info.extension:
        # Left out while it has its default (OutpaintParams.to_json): the body reads as the hosted API's.
        description = EXTENSION + "only when the request set it to other than its default"
        return Absent[annotation], Field(None, description=description)
    return annotation, Field()


# One field per engine parameter (models/params.py), in their order.
RunParameters = create_model(  # type: ignore[call-overload]
    "RunParameters",
    __base__=Body,
    __doc__="The request's parameters as run: the seed drawn for -1, the styles by their canonical names.",
    **{name: _run_field(kind, info) for name, (kind, _, info) in PARAMETERS.items()},
)


class RunMetrics(Body):
    inference_time: float = Field(description="engine seconds")
    queue_time: float = Field(description="seconds from acceptance to start")
    total_time: float = Field(description="seconds from acceptance to completion")


class Prompts(Body):
    positive: list[str] = Field(description="the prompt encoded for each sample, styles applied")
    negative: list[str]


class ResultResponse(Body):
    status: LiveStatus = Field(description="FAILED is answered as 422 with FailedBody")
    request_id: str
    created_at: str | None
    started_at: str | None = Field(description="none while QUEUED")
    parameters: RunParameters
    output: Absent[str] = Field(None, description="COMPLETED only: the first image, its URL (base64 with base64: true)")
    outputs: Absent[list[str]] = Field(None, description="COMPLETED only: every image, in seed order")
    seeds: Absent[list[int]] = Field(None, description="COMPLETED only")
    width: Absent[int] = Field(None, description="COMPLETED only")
    height: Absent[int] = Field(None, description="COMPLETED only")
    completed_at: Absent[str] = Field(None, description="COMPLETED only")
    expires_at: Absent[str] = Field(None, description="COMPLETED only: when the result and its images are deleted")
    metrics: Absent[RunMetrics] = Field(None, description="COMPLETED only")
    prompts: Absent[Prompts] = Field(None, description="COMPLETED only")
    styles: Absent[list[str]] = Field(None, description="COMPLETED only: the styles applied")
    notes: Absent[dict[str, Any]] = Field(
        None, description="COMPLETED only: what the styles did (notes.expansion: whether V2 ran)"
    )
    working_size: Absent[list[int]] = Field(None, description="COMPLETED only: the size the model worked at")
    webhook: Absent[WebhookStatus] = Field(None, description=WEBHOOK)


class SyncResult(ResultResponse):
    """POST /v1/seg-beyond's JSON answer (base64: true): the result with its images inline, also under
    `image` and `images`."""

    status: Literal["COMPLETED"]
    image: str = Field(description="the first image, base64")
    images: list[str] = Field(description="every image, base64, in seed order")


class ListedRequest(Body):
    request_id: str
    status: Status
    created_at: str | None
    completed_at: Absent[str] = Field(None, description="COMPLETED or FAILED only: when it ended")
    outputs: Absent[list[str]] = Field(None, description="COMPLETED only: the output URLs")
    error: Absent[str] = Field(None, description="FAILED only: why")


class RequestList(Body):
    requests: list[ListedRequest] = Field(description="the caller's requests, newest first")
    next_cursor: str | None = Field(description="pass as cursor for the next page; none: this is the last")


class CancelResponse(Body):
    request_id: str
    status: Status = Field(description="FAILED when it ended at once (it had not started)")
    cancel_requested: Literal[True]
    error: str | None = Field(description="'cancelled' when it ended at once; none while it stops")


class Style(Body):
    name: str
    aliases: list[str] = Field(description="other names a request may use for it")
    kind: Literal["template", "expansion"]
    positive: str = Field(description="the prompt template ({prompt} stands for the request's prompt)")
    negative: str = Field(description="added to the negative prompt")
    description: str
    source: str = Field(description="builtin, or the styles file it comes from")


class StyleList(Body):
    styles: list[Style]


class LoraInfo(Body):
    name: str = Field(description="what a request names it by in `loras`: its file name without .safetensors")
    size: int = Field(description="the file's size in bytes")
    format: Literal["kohya", "diffusers"] | None = Field(
        description="kohya (A1111, as on model sites) or diffusers (PEFT); none when the file cannot be used"
    )
    parts: list[str] | None = Field(
        None, description="the parts of the model it changes: unet, text_encoder, text_encoder_2"
    )
    error: str | None = Field(None, description="why it cannot be used (a request naming it gets 400)")


class LoraList(Body):
    loras: list[LoraInfo] = Field(description=EXTENSION + "the LoRAs of this server (BEYOND_LORA_DIR), by name")
