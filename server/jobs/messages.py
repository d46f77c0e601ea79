"""The few typed messages between the supervisor (API process) and the worker (engine process)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.images import ImageLimits


@dataclass(frozen=True)
class WorkerConfig:
    model: str
    device: str
    dtype: str
    limits: ImageLimits
    styles_dir: Path | None = None
    expansion_model: Path | None = None
    cpu_threads: int | None = None
    # The speed knobs as text (auto | 1 | 0, and a compile mode): parsed in the worker, so the API
    # process never imports torch.
    channels_last: str = "auto"
    fuse_qkv: str = "auto"
    compile: str = "0"


# supervisor -> worker
@dataclass(frozen=True)
class RunJob:
    job_id: str
    params: dict[str, Any]
    source: dict[str, Any]
    folder: Path


@dataclass(frozen=True)
class Cancel:
    job_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


# worker -> supervisor
@dataclass(frozen=True)
class Ready:
    info: dict[str, Any]


@dataclass(frozen=True)
class LoadFailed:
    error: str


@dataclass(frozen=True)
class Progress:
    job_id: str
    step: int
    total: int


@dataclass(frozen=True)
class JobDone:
    job_id: str
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobFailed:
    job_id: str
    error: str
    kind: str
