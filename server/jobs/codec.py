"""A Job as flat fields, the one form both stores keep: SQLite's columns and Redis's hash fields.

Each field is a scalar: JSON text for the nested parts (params, source, delivery, result), 0 or 1 for
flags, numbers for counters and times (seconds since the epoch). A value that is not set (None) is left
out: Redis keeps no field for it, SQLite a NULL or its column's default. Read back, SQLite gives typed
values and Redis gives bytes; `job_from_fields` and `state_from_fields` read either.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from server.jobs.contract import Delivery, ImageSource, Job, JobParams, JobResult, JobState, JobStatus

Value = str | bytes | int | float | None  # as read back: SQLite gives typed values, Redis bytes

JOB_FIELDS = (
    "id", "seq", "status", "params", "source", "base64", "owner", "created_at", "started_at", "finished_at",
    "attempts", "progress", "error", "error_kind", "cancel_requested", "expires_at", "input_ready", "cost",
    "delivery", "result",
)  # fmt: skip
# What the status endpoint reads: a job without its JSON fields.
STATE_FIELDS = ("id", "seq", "status", "owner", "progress", "error", "error_kind", "expires_at", "started_at")


def encode_result(result: JobResult) -> str:
    return json.dumps(result.to_json())


def job_fields(job: Job) -> dict[str, str | int | float]:
    """The job as stored (the values that are set)."""
    fields: dict[str, str | int | float | None] = {
        "id": job.id,
        "seq": job.seq,
        "status": job.status.value,
        "params": json.dumps(job.params.to_json()),
        "source": json.dumps(job.source.to_json()),
        "base64": int(job.base64),
        "owner": job.owner,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "attempts": job.attempts,
        "progress": job.progress,
        "error": job.error,
        "error_kind": job.error_kind,
        "cancel_requested": int(job.cancel_requested),
        "expires_at": job.expires_at,
        "input_ready": int(job.input_ready),
        "cost": job.cost,
        "delivery": json.dumps(job.delivery.to_json()),
        "result": None if job.result is None else encode_result(job.result),
    }
    return {name: value for name, value in fields.items() if value is not None}


# Set by a store in the write that accepts a job: its place in the queue, and the time by the store's clock.
ASSIGNED = ("seq", "created_at")


def submitted_fields(
    job_id: str,
    params: JobParams,
    source: ImageSource,
    *,
    base64: bool,
    owner: str | None,
    cost: int,
    input_ready: bool,
    delivery: Delivery,
) -> dict[str, str | int | float]:
    """What a submission writes: the new job (QUEUED, no attempt yet) less its ASSIGNED fields. `cost` is
    what its owner is to be charged: the store sets 0 when the owner has no account."""
    job = Job(
        id=job_id,
        seq=0,
        status=JobStatus.QUEUED,
        params=params,
        source=source,
        base64=base64,
        owner=owner,
        input_ready=input_ready,
        cost=cost,
        delivery=delivery,
    )
    return {name: value for name, value in job_fields(job).items() if name not in ASSIGNED}


def _text(value: Value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value: Value) -> float | None:
    return None if value is None or value == b"" or value == "" else float(value)


_TRUE = frozenset({1, "1", b"1"})  # a set flag, as SQLite and Redis give it back


def _flag(value: Value) -> bool:
    return value in _TRUE


def _json(value: Value, default: str) -> object:
    return json.loads(default if value is None else value)


def job_from_fields(fields: Mapping[str, Value]) -> Job | None:
    """The job its stored fields describe; None when there is none (no fields, or no status)."""
    status = fields.get("status")
    if status is None:
        return None
    result = _json(fields.get("result"), "{}")
    return Job(
        id=_text(fields["id"]),  # type: ignore[arg-type]
        seq=int(fields["seq"]),  # type: ignore[arg-type]
        status=JobStatus(_text(status)),
        params=JobParams.from_json(_json(fields["params"], "{}")),  # type: ignore[arg-type]
        source=ImageSource.from_json(_json(fields["source"], "{}")),  # type: ignore[arg-type]
        base64=_flag(fields.get("base64")),
        owner=_text(fields.get("owner")),
        created_at=float(fields["created_at"]),  # type: ignore[arg-type]
        started_at=_float(fields.get("started_at")),
        finished_at=_float(fields.get("finished_at")),
        attempts=int(fields.get("attempts") or 0),
        progress=float(fields.get("progress") or 0),
        error=_text(fields.get("error")),
        error_kind=_text(fields.get("error_kind")),
        cancel_requested=_flag(fields.get("cancel_requested")),
        expires_at=_float(fields.get("expires_at")),
        input_ready=_flag(fields.get("input_ready")),
        cost=int(fields.get("cost") or 0),
        delivery=Delivery.from_json(_json(fields.get("delivery"), "{}")),  # type: ignore[arg-type]
        result=JobResult.from_json(result) if result else None,  # type: ignore[arg-type]
    )


def state_from_fields(fields: Mapping[str, Value]) -> JobState | None:
    """The status endpoint's part of a job, from its STATE_FIELDS; None when there is no job."""
    status = fields.get("status")
    if status is None:
        return None
    return JobState(
        id=_text(fields["id"]),  # type: ignore[arg-type]
        seq=int(fields["seq"]),  # type: ignore[arg-type]
        status=JobStatus(_text(status)),
        owner=_text(fields.get("owner")),
        progress=float(fields.get("progress") or 0),
        error=_text(fields.get("error")),
        error_kind=_text(fields.get("error_kind")),
        expires_at=_float(fields.get("expires_at")),
        started=fields.get("started_at") is not None,
    )
