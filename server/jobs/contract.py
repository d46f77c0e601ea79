"""The job contract: one typed form of a job from submission to result.

The store keeps these types, the worker messages carry them and the result bodies are made from them.
Each has one JSON form (`to_json` / `from_json`), the one the store writes and the API echoes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from models.params import OutpaintParams

# Credits are kept as integers of this many units each, so balances never drift (0.1 + 0.2 != 0.3).
CREDIT_UNITS = 10_000


def to_units(credits: float) -> int:
    return round(credits * CREDIT_UNITS)


def from_units(units: int) -> float:
    return units / CREDIT_UNITS


# A job's input image, as its store keeps it.
INPUT_NAME = "input"
# The live preview of a PROCESSING job, a file beside its input (replaced as the job goes on).
PREVIEW_NAME = "preview.jpg"


def output_name(index: int, extension: str = "jpg") -> str:
    return f"output-{index}.{extension}"


class JobStatus(str, Enum):
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class FailureKind(str, Enum):
    INPUT = "input"  # the client's input cannot be used: v1 answers 400
    CANCELLED = "cancelled"
    ENGINE = "engine"  # the model failed on this job (a bug, or an unexpected error)
    OUT_OF_MEMORY = "out_of_memory"
    NON_FINITE = "non_finite"
    WORKER_DIED = "worker_died"
    TIMEOUT = "timeout"


# What the engine needs besides the image, as validated from the request (seed already drawn): the
# engine's one list of parameters, stored as its JSON form (the keys the first release wrote).
JobParams = OutpaintParams


@dataclass(frozen=True)
class ImageSource:
    """Where the input comes from. A URL is fetched by the input stage, then stored like a base64 input."""

    url: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": "url", "url": self.url} if self.url else {"kind": "file"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageSource:
        return cls(url=data.get("url") if data.get("kind") == "url" else None)


OUTPUT_FORMATS = {"jpeg": ("jpg", "image/jpeg"), "png": ("png", "image/png"), "webp": ("webp", "image/webp")}


@dataclass(frozen=True)
class Delivery:
    """How results reach the client: extensions of the hosted API, none of them in `parameters`, so a
    request that sends none of them reads exactly as on the hosted API."""

    output_format: str = "jpeg"  # a key of OUTPUT_FORMATS
    output_quality: int = 95  # for the lossy formats
    webhook_url: str | None = None
    base_url: str | None = None  # the absolute base the client reached this server at (for webhook bodies)

    @property
    def extension(self) -> str:
        return OUTPUT_FORMATS[self.output_format][0]

    @property
    def media_type(self) -> str:
        return OUTPUT_FORMATS[self.output_format][1]

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v != getattr(Delivery, k, None)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Delivery:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class JobResult:
    """What a completed job produced. `outputs` are names in the job's file area."""

    outputs: tuple[str, ...]
    seeds: tuple[int, ...]
    width: int
    height: int
    working_size: tuple[int, int]
    inference_time: float
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    styles: tuple[str, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)
    gpu_peak_memory: int = 0

    def to_json(self) -> dict[str, Any]:
        data = dict(vars(self))
        for name in ("outputs", "seeds", "working_size", "positive_prompts", "negative_prompts", "styles"):
            data[name] = list(data[name])
        data["notes"] = dict(self.notes)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobResult:
        return cls(
            outputs=tuple(data["outputs"]),
            seeds=tuple(data["seeds"]),
            width=int(data["width"]),
            height=int(data["height"]),
            working_size=tuple(data.get("working_size") or (0, 0)),  # type: ignore[arg-type]
            inference_time=float(data["inference_time"]),
            positive_prompts=tuple(data.get("positive_prompts", ())),
            negative_prompts=tuple(data.get("negative_prompts", ())),
            styles=tuple(data.get("styles", ())),
            notes=dict(data.get("notes") or {}),
            gpu_peak_memory=int(data.get("gpu_peak_memory", 0)),
        )


@dataclass(frozen=True)
class JobState:
    """The small part of a job the status endpoint needs: read without the job's JSON columns."""

    id: str
    seq: int
    status: JobStatus
    owner: str | None
    progress: float
    error: str | None
    error_kind: str | None
    expires_at: float | None
    started: bool = True  # False while QUEUED, or PROCESSING but still waiting in the worker

    @property
    def finished(self) -> bool:
        return self.status in (JobStatus.COMPLETED, JobStatus.FAILED)


@dataclass(frozen=True)
class Job:
    id: str
    seq: int
    status: JobStatus
    params: JobParams
    source: ImageSource
    base64: bool = False
    owner: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    progress: float = 0.0
    error: str | None = None
    error_kind: str | None = None
    cancel_requested: bool = False
    expires_at: float | None = None
    input_ready: bool = True
    cost: int = 0  # credit units charged at submission
    delivery: Delivery = field(default_factory=Delivery)
    result: JobResult | None = None

    @property
    def started(self) -> bool:
        """Denoising has begun (False while QUEUED, or PROCESSING but still waiting in the worker)."""
        return self.status in (JobStatus.COMPLETED, JobStatus.FAILED) or self.started_at is not None

    @property
    def finished(self) -> bool:
        return self.status in (JobStatus.COMPLETED, JobStatus.FAILED)

    @property
    def cancelled(self) -> bool:
        return self.error_kind == FailureKind.CANCELLED.value
