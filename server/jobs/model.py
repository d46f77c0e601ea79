"""A job, as the store keeps it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class JobStatus(str, Enum):
    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class FailureKind(str, Enum):
    INPUT = "input"  # the client's input cannot be used: v1 answers 400
    CANCELLED = "cancelled"
    ENGINE = "engine"  # the model failed on this job (out of memory, NaNs, a bug)
    WORKER_DIED = "worker_died"
    TIMEOUT = "timeout"


@dataclass
class Job:
    id: str
    seq: int
    status: JobStatus
    params: dict[str, Any]
    # Where the image comes from: {"kind": "file"} (stored beside the job) or {"kind": "url", "url": ...}.
    source: dict[str, Any]
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
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in (JobStatus.COMPLETED, JobStatus.FAILED)
