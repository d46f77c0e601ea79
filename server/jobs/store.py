"""The job store's interface: what the API, the input stage and the supervisor ask of it.

Two implementations: embedded SQLite for one box (`server/jobs/sqlite_store.py`) and Redis shared by
many nodes (`server/jobs/redis_store.py`); build_store in `server/commands/startup.py` picks one in one
place. Whatever the store has accepted survives a `kill -9` of the API or of the worker. What each method
does to a job, and when it changes nothing, is the lifecycle table of `server/jobs/lifecycle.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from server.jobs.contract import Delivery, FailureKind, ImageSource, Job, JobParams, JobResult, JobState, JobStatus
from server.jobs.events import JobEvents
from server.jobs.lifecycle import MAX_ATTEMPTS as MAX_ATTEMPTS  # the lifecycle's, named here as before


class StoreError(Exception):
    """The store cannot do what was asked for a reason of its own (not the caller's); 503 or 507."""


class StoreUnavailable(StoreError):
    """The store is broken or gone (corrupt file, replaced file, unreachable server)."""


class DiskFull(StoreError):
    """No space left to keep a job's files or rows."""


class StoreCorrupt(StoreUnavailable):
    """Found at start-up: the store file is not a usable database, or is missing beside its jobs' files."""

    def __init__(self, path: str, detail: str, problem: str = "damaged") -> None:
        super().__init__(f"the job store {path} is {problem} ({detail})")
        self.path, self.detail, self.problem = path, detail, problem


class FileGone(Exception):
    """A job's stored file (input, output) is no longer there."""


class InsufficientBalance(Exception):
    def __init__(self, balance: int, cost: int) -> None:
        super().__init__(f"balance {balance} is less than the cost {cost} (credit units)")
        self.balance, self.cost = balance, cost


class QueueFull(Exception):
    pass


class JobStore(Protocol):
    events: JobEvents

    # Submission. Queue bound and credit charge are checked in the transaction that queues the job.
    def create(
        self,
        params: JobParams,
        source: ImageSource,
        *,
        image: bytes | None,
        base64: bool,
        owner: str | None,
        cost: int = 0,
        max_queued: int | None = None,
        delivery: Delivery | None = None,
    ) -> Job: ...

    # The read side.
    def get(self, job_id: str) -> Job | None: ...
    def state(self, job_id: str) -> JobState | None: ...
    def queue_position(self, seq: int) -> int: ...
    def list_jobs(
        self, owner: str | None, *, status: JobStatus | None = None, limit: int = 20, before: int | None = None
    ) -> list[Job]: ...
    def queued_count(self) -> int: ...
    # Unexpired jobs whose delivery names a webhook_url, finished or not (the webhook relay's start-up scan).
    def webhook_jobs(self) -> list[Job]: ...
    def read_file(self, job_id: str, name: str) -> bytes: ...
    def put_file(self, job_id: str, name: str, data: bytes) -> None: ...
    def has_file(self, job_id: str, name: str) -> bool: ...
    def balance(self, owner: str) -> int | None: ...
    def health(self) -> str | None: ...

    # The input stage: URL inputs fetched ahead of the worker, each by one node at a time. `lease_input` says
    # whether this node is to fetch it now (the job waits for its input and no other node holds its fetch);
    # a shared store's lease lasts `reclaim_after`, asked for again to hold it longer.
    def awaiting_input(self) -> list[Job]: ...
    def lease_input(self, job_id: str) -> bool: ...
    def attach_input(self, job_id: str, image: bytes) -> bool: ...

    # The worker side. Writes are fenced by attempt: a stale attempt changes nothing.
    def claim_next(self) -> Job | None: ...
    # Both answer True when the job's worker should stop: cancelled, or no longer this attempt's.
    def mark_started(self, job_id: str, attempt: int) -> bool: ...
    def set_progress(self, job_id: str, attempt: int, progress: float) -> bool: ...
    def complete(self, job_id: str, attempt: int, result: JobResult, files: dict[str, bytes]) -> bool: ...
    def fail(self, job_id: str, error: str, kind: FailureKind, attempt: int | None = None) -> bool: ...
    # `attempt`'s worker died: the job is queued again or fails; answers its status after. Fenced too: a job
    # since taken over by another attempt (on another node) is left as it is.
    def release(self, job_id: str, reason: str, attempt: int) -> JobStatus: ...
    # A graceful stop: each held job is handed back as if never claimed (False: being cancelled, or not this
    # attempt's; it is then released), then the node leaves (a shared store forgets it as a reader).
    def hand_back(self, job_id: str, attempt: int) -> bool: ...
    def leave(self) -> None: ...
    def processing(self) -> list[Job]: ...

    # A job whose worker shows no sign of life for `reclaim_after` seconds is taken over by another node
    # (None: never; one node releases its dead worker's jobs itself). A live worker's supervisor shows
    # every job it holds (id -> attempt: running, prepared ahead or finishing) alive with `keep_alive`,
    # which returns those that attempt no longer holds (taken over, or ended).
    reclaim_after: float | None

    def keep_alive(self, held: Mapping[str, int]) -> set[str]: ...

    # Both sides.
    def request_cancel(self, job_id: str) -> Job | None: ...
    def purge_expired(self, now: float | None = None) -> int: ...
    def open_account(self, owner: str, granted: int) -> None: ...
