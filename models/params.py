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
from dataclasses import MISSING, dataclass, field, fields
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


def param(
    default: Any = MISSING,
    *,
    description: str,
    ge: int | float | None = None,
    le: int | float | None = None,
    choices: tuple[str, ...] = (),
    per_job: bool = False,
    extension: bool = False,
) -> Any:
    """A field of `OutpaintParams` with its `Param` (no default: the parameter is required)."""
    return field(default=default, metadata={"param": Param(description, ge, le, choices, per_job, extension)})


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

    def to_json(self) -> dict[str, Any]:
        """The JSON form the job stores keep and results echo as `parameters` (a tuple as a list)."""
        # Flat fields: a shallow copy does (asdict's deep copy costs ~25 us on every request's path).
        data = {name: getattr(self, name) for name in NAMES}
        for name in _TUPLES:
            data[name] = list(data[name])
        for name, default in _EXTENSION_DEFAULTS.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutpaintParams:
        """Read a `to_json` form, also one an older release wrote: unknown keys are dropped, missing
        ones take their default."""
        values = {k: v for k, v in data.items() if k in NAMES}
        for name in _TUPLES:
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def values(self) -> dict[str, Any]:
        """The parameters by name (only these, in a subclass too)."""
        return {name: getattr(self, name) for name in NAMES}

    def batch_values(self) -> tuple[Any, ...]:
        """What jobs must share to be denoised in one batch: every parameter not marked per_job."""
        return tuple(getattr(self, name) for name in BATCHED)

    def canvas_size(self, width: int, height: int) -> tuple[int, int]:
        return width + self.left + self.right, height + self.top + self.bottom


def _parameters() -> dict[str, tuple[Any, Any, Param]]:
    hints = typing.get_type_hints(OutpaintParams)
    return {f.name: (hints[f.name], f.default, f.metadata["param"]) for f in fields(OutpaintParams)}


# Each parameter in order: its name -> (type, default or dataclasses.MISSING when required, Param).
PARAMETERS: dict[str, tuple[Any, Any, Param]] = _parameters()
NAMES: tuple[str, ...] = tuple(PARAMETERS)
BATCHED: tuple[str, ...] = tuple(name for name, (_, _, info) in PARAMETERS.items() if not info.per_job)
_TUPLES = tuple(name for name, (kind, _, _) in PARAMETERS.items() if typing.get_origin(kind) is tuple)
_EXTENSION_DEFAULTS = {name: default for name, (_, default, info) in PARAMETERS.items() if info.extension}
