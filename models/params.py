"""A generation request's parameters: the one list of them.

`OutpaintParams` holds every parameter with its default, and each field's metadata (`Param`) says
what it means, its range or its choices, and how the engine batches it. Everything else is derived
from this list: the request body of the API and its validation, the job store's JSON form, the
command line's options, and the engine's batch key. A new parameter is one field here, plus its use
in the engine (and its documentation).

Torch-free: the HTTP process validates requests into this type.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any

from models.names import DEFAULT_SAMPLER, DEFAULT_SCHEDULER, DEFAULT_STYLES, SAMPLERS, SCHEDULERS
from models.seeds import MAX_SEED


@dataclass(frozen=True)
class Param:
    """What the list says of one parameter, besides its name, type and default."""

    description: str
    ge: int | float | None = None  # the smallest value allowed
    le: int | float | None = None  # the largest value allowed
    choices: tuple[str, ...] = ()  # the only values allowed (a name)
    # Each job's own: jobs denoised in one batch may differ in it (each row gets its own). Every other
    # parameter is part of the batch key, so jobs that differ in it never share a batch.
    per_job: bool = False
    # Not a parameter of the hosted seg-beyond service: its JSON form leaves it out while it has its
    # default, so that a request that does not use it reads exactly as it would there.
    extension: bool = False
    max_items: int | None = None  # a list: the most items it may hold


def param(
    default: Any = MISSING,
    *,
    description: str,
    ge: int | float | None = None,
    le: int | float | None = None,
    choices: tuple[str, ...] = (),
    per_job: bool = False,
    extension: bool = False,
    max_items: int | None = None,
) -> Any:
    """A field of `OutpaintParams` (or of a list item's type) with its `Param` (no default: required)."""
    info = Param(description, ge, le, choices, per_job, extension, max_items)
    return field(default=default, metadata={"param": info})


# The seam band's default width, in pixels (models/canvas.py SEAM_BAND).
DEFAULT_SEAM_WIDTH = 16
MAX_LORAS = 4


@dataclass(frozen=True)
class LoraRef:
    """One LoRA of a request: a file of the server's LoRA folder, by name, and how strongly it applies."""

    name: str = param(description="the LoRA's name: its file name in the LoRA folder, without .safetensors")
    scale: float = param(
        1.0, description="its strength: 1 as trained, 0 leaves the model as it is, below 0 inverts it", ge=-2, le=2
    )


@dataclass(frozen=True)
class OutpaintParams:
    """What the engine needs besides the image. The order is the order of the API's fields."""

    prompt: str = param(description="what the new area should show", per_job=True)
    negative_prompt: str = param("", description="what it should not show", per_job=True)
    steps: int = param(30, description="denoising steps", ge=20, le=100)
    samples: int = param(
        1, description="number of images, seeds seed, seed+1, ... (after 999999999999999: 0)", ge=1, le=4, per_job=True
    )
    styles: tuple[str, ...] = param(
        tuple(DEFAULT_STYLES.split(",")),
        description="the styles applied, by name; V2 is the prompt expansion",
        per_job=True,
    )
    seed: int = param(-1, description="-1 draws a random seed", ge=-1, le=MAX_SEED, per_job=True)
    guidance_scale: float = param(4.0, description="classifier-free guidance", ge=1, le=25)
    scheduler: str = param(DEFAULT_SCHEDULER, description="noise schedule (ComfyUI's names)", choices=SCHEDULERS)
    sampler: str = param(DEFAULT_SAMPLER, description="sampler (ComfyUI's names)", choices=SAMPLERS)
    # Per job: the batch key holds the working size the padded canvas leads to.
    left: int = param(0, description="pixels to add on this side", ge=0, le=1024, per_job=True)
    right: int = param(0, description="pixels to add on this side", ge=0, le=1024, per_job=True)
    top: int = param(0, description="pixels to add on this side", ge=0, le=1024, per_job=True)
    bottom: int = param(0, description="pixels to add on this side", ge=0, le=1024, per_job=True)
    # Extensions (docs/extensions.md). Per job: each part of a batch has its own mask and paste-back.
    seam_width: int = param(
        DEFAULT_SEAM_WIDTH,
        description="pixels of the original, next to the new area, that the model redraws and the paste-back"
        " feathers into the original",
        ge=0,
        le=128,
        per_job=True,
        extension=True,
    )
    color_match: bool = param(
        False,
        description="match the colour of the generated area (mean and spread of each channel) to the"
        " original's next to the seam, measured on the original's own pixels",
        per_job=True,
        extension=True,
    )
    # Batched: a batch runs under one set of LoRAs, so jobs with different sets never share one.
    loras: tuple[LoraRef, ...] = param(
        (),
        description="LoRAs applied to the model for this request, each by name with its scale",
        max_items=MAX_LORAS,
        extension=True,
    )

    def to_json(self) -> dict[str, Any]:
        """The JSON form the job stores keep and results echo as `parameters` (a tuple as a list)."""
        # Flat fields: a shallow copy does (asdict's deep copy costs ~25 us on every request's path).
        data = {name: getattr(self, name) for name in NAMES}
        for name, default in _EXTENSION_DEFAULTS.items():
            if data[name] == default:
                del data[name]
        for name, item in _TUPLES.items():
            if name in data:
                data[name] = [asdict(v) for v in data[name]] if is_dataclass(item) else list(data[name])
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutpaintParams:
        """Read a `to_json` form, also one an older release wrote: unknown keys are dropped, missing
        ones take their default."""
        values = {k: v for k, v in data.items() if k in NAMES}
        for name, item in _TUPLES.items():
            if name in values:
                values[name] = tuple(item(**v) if is_dataclass(item) else v for v in values[name])
        return cls(**values)

    def values(self) -> dict[str, Any]:
        """The parameters by name (only these, in a subclass too)."""
        return {name: getattr(self, name) for name in NAMES}

    def batch_values(self) -> tuple[Any, ...]:
        """What jobs must share to be denoised in one batch: every parameter not marked per_job."""
        return tuple(getattr(self, name) for name in BATCHED)

    def canvas_size(self, width: int, height: int) -> tuple[int, int]:
        return width + self.left + self.right, height + self.top + self.bottom


def parameters_of(cls: type) -> dict[str, tuple[Any, Any, Param]]:
    """The fields of a dataclass made with `param` (OutpaintParams, LoraRef): name -> (type, default, Param)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.default, f.metadata["param"]) for f in fields(cls)}


# Each parameter in order: its name -> (type, default or dataclasses.MISSING when required, Param).
PARAMETERS: dict[str, tuple[Any, Any, Param]] = parameters_of(OutpaintParams)
NAMES: tuple[str, ...] = tuple(PARAMETERS)
BATCHED: tuple[str, ...] = tuple(name for name, (_, _, info) in PARAMETERS.items() if not info.per_job)
# Each list parameter (a tuple) -> the type of its items (str, or a dataclass such as LoraRef).
_TUPLES: dict[str, Any] = {
    name: typing.get_args(kind)[0] for name, (kind, _, _) in PARAMETERS.items() if typing.get_origin(kind) is tuple
}
_EXTENSION_DEFAULTS = {name: default for name, (_, default, info) in PARAMETERS.items() if info.extension}
