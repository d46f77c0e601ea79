"""The job lifecycle: every way a job moves, and what each move does, stated once.

Both stores implement these rules: SQLite in server/jobs/sqlite_store.py, Redis in the Lua scripts of
server/jobs/redis_scripts.py (one script per operation, so each move stays atomic across nodes). The
rules live here as data, `LIFECYCLE`, and tests/test_store_contract.py drives each store through every
row: it puts a job in the row's stage, applies the event, then checks the stage the job lands in and
each effect. It also checks that an event with no row for a stage changes nothing. A rule changes here
first; the contract tests then say which store does not follow it yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from server.jobs.contract import FailureKind, Job, JobStatus

# A job whose worker died gets one more attempt; a second death means the job itself kills its worker.
MAX_ATTEMPTS = 2

# The error of a job that ended by a cancel, and of one given up on after MAX_ATTEMPTS deaths of its
# worker (`GAVE_UP % (reason, attempts)`; the Lua formats it with string.format, which reads it the same).
CANCELLED_ERROR = "cancelled"
GAVE_UP = "%s while running this job, %d times; giving up"

# The statuses a job can still move from. A finished job (COMPLETED, FAILED) never changes again.
LIVE = (JobStatus.QUEUED, JobStatus.PROCESSING)


class Stage(str, Enum):
    """Where a job is: finer than its status, since what an event does depends on more than that."""

    ABSENT = "absent"  # no such job: not submitted yet, or deleted when its retention was over
    AWAITING_INPUT = "awaiting_input"  # QUEUED, its URL input still being fetched: no worker may take it
    QUEUED = "queued"  # QUEUED with its input: claims take such jobs oldest (lowest seq) first
    CLAIMED = "claimed"  # PROCESSING: handed to a worker, waiting there, not started
    RUNNING = "running"  # PROCESSING: its worker began denoising
    CANCELLING = "cancelling"  # PROCESSING, running, cancel asked for: its worker stops at its next step
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def status(self) -> JobStatus | None:
        return _STATUS[self]


_STATUS = {
    Stage.ABSENT: None,
    Stage.AWAITING_INPUT: JobStatus.QUEUED,
    Stage.QUEUED: JobStatus.QUEUED,
    Stage.CLAIMED: JobStatus.PROCESSING,
    Stage.RUNNING: JobStatus.PROCESSING,
    Stage.CANCELLING: JobStatus.PROCESSING,
    Stage.COMPLETED: JobStatus.COMPLETED,
    Stage.FAILED: JobStatus.FAILED,
}


def stage_of(job: Job | None) -> Stage:
    if job is None:
        return Stage.ABSENT
    if job.status == JobStatus.QUEUED:
        return Stage.QUEUED if job.input_ready else Stage.AWAITING_INPUT
    if job.status == JobStatus.PROCESSING:
        if job.cancel_requested:
            return Stage.CANCELLING
        return Stage.CLAIMED if job.started_at is None else Stage.RUNNING
    return Stage.COMPLETED if job.status == JobStatus.COMPLETED else Stage.FAILED


def expired(expires_at: float | None, now: float) -> bool:
    """A finished job is gone for its readers once its retention is over, before it is deleted."""
    return expires_at is not None and expires_at <= now


class Event(str, Enum):
    """What happens to a job, as the store method that says so. An event with no row for the job's
    stage changes nothing, and the method answers as noted."""

    SUBMIT = "submit"  # create()
    ATTACH_INPUT = "attach_input"  # attach_input(): the input stage stored the fetched URL input. Else False
    CLAIM = "claim"  # claim_next(): a worker takes the oldest ready job. Else another job, or None
    START = "start"  # mark_started(id, attempt): denoising began. Else True (stop)
    PROGRESS = "progress"  # set_progress(id, attempt, progress). Else True (stop)
    COMPLETE = "complete"  # complete(id, attempt, result, files). Else False
    FAIL = "fail"  # fail(id, error, kind, attempt): the worker's attempt failed. Else False
    ABORT = "abort"  # fail(id, error, kind): the server ends a job itself, whatever holds it. Else False
    CANCEL = "cancel"  # request_cancel(id): a client's cancel, or a v1 wait given up on. Else the job as is
    # release(id, reason, attempt) by the worker's own supervisor; on Redis also another node's claim_next,
    # when the job's stream entry was not kept alive for reclaim_after seconds. Else the job's status.
    WORKER_DIED = "worker_died"
    # hand_back(id, attempt): a worker that stops gracefully (SIGTERM) gives back a job it holds, claimed ahead
    # of its turn or running. Else False (the worker's supervisor then releases it: WORKER_DIED).
    HAND_BACK = "hand_back"
    EXPIRE = "expire"  # purge_expired(): the job's retention (the result TTL) is over. Else 0 removed


# A worker's writes name their attempt. One that names another attempt than the job's current one (a
# worker given up on and come back late) changes nothing; START and PROGRESS then answer "stop". Its release
# too: a worker whose job was taken over by another node, whose engine then dies or which is then stopped,
# gives back nothing of the new attempt.
FENCED = frozenset({Event.START, Event.PROGRESS, Event.COMPLETE, Event.FAIL, Event.WORKER_DIED, Event.HAND_BACK})


class Guard(str, Enum):
    """When a row applies, beyond the job's stage."""

    ALWAYS = "always"
    WITH_IMAGE = "with_image"  # submitted with its image (a file or base64)
    WITH_URL = "with_url"  # submitted with a URL: the input stage fetches it first
    RETRIES_LEFT = "retries_left"  # attempts < MAX_ATTEMPTS
    LAST_ATTEMPT = "last_attempt"  # attempts >= MAX_ATTEMPTS
    RETENTION_OVER = "retention_over"  # expires_at has passed


class Credits(str, Enum):
    KEEP = "keep"
    # The job's cost leaves its owner's balance, in the write that stores the job; short, nothing is stored
    # (InsufficientBalance). Only an owner with an account (a metered key) pays: without one, cost is 0.
    CHARGE = "charge"
    # The charge goes back to the owner: a client pays for results, never for a failure or a cancel.
    REFUND = "refund"


class Retention(str, Enum):
    KEEP = "keep"  # unchanged: a live job never expires
    START = "start"  # finished_at = now, expires_at = now + ttl (the result TTL)
    END = "end"  # the job and its files are deleted


class Files(str, Enum):
    KEEP = "keep"
    INPUT = "input"  # the input image is stored, as "input"
    OUTPUTS = "outputs"  # the outputs, stored in the same write as the COMPLETED status (never one alone)
    DELETE = "delete"  # every file of the job


class Progress(str, Enum):
    KEEP = "keep"
    RESET = "reset"  # 0: a new attempt starts from the first step
    REPORTED = "reported"  # the worker's value
    DONE = "done"  # 1.0


class Started(str, Enum):
    KEEP = "keep"
    SET = "set"  # started_at = now: the job no longer waits (queue position, queue bound)
    CLEAR = "clear"  # None: waiting again


@dataclass(frozen=True)
class Transition:
    event: Event
    source: Stage
    target: Stage
    when: Guard = Guard.ALWAYS
    attempts: int = 0  # added to the attempt counter
    credits: Credits = Credits.KEEP
    retention: Retention = Retention.KEEP
    files: Files = Files.KEEP
    progress: Progress = Progress.KEEP
    started: Started = Started.KEEP
    cancel_requested: bool = False  # the cancel flag is raised
    keeps_place: bool = False  # queued again ahead of the jobs submitted after it
    # FAILED: the error_kind the job ends with. Several: the caller's, which is one of them.
    kinds: tuple[FailureKind, ...] = ()
    stop: bool | None = None  # START, PROGRESS: the answer; True tells the job's worker to stop

    def __str__(self) -> str:
        guard = "" if self.when == Guard.ALWAYS else f" if {self.when.value}"
        return f"{self.event.value}: {self.source.value} -> {self.target.value}{guard}"


# What the worker reports (engine_process.py, the supervisor), as the kind of its attempt's failure. WORKER_DIED is
# never reported: a dead worker says nothing, its death is a row of its own.
REPORTED = tuple(kind for kind in FailureKind if kind != FailureKind.WORKER_DIED)
# What the input stage reports when it fails a job before it can run (inputs.py).
INPUT_STAGE = (FailureKind.INPUT, FailureKind.ENGINE)

# The rows, short: each effect not named is KEEP (nothing changes).
_ENDS = {"retention": Retention.START}  # every way into COMPLETED or FAILED starts the retention
_FAILS = {**_ENDS, "credits": Credits.REFUND}  # ... and every way into FAILED refunds the charge
_CANCELS = {**_FAILS, "cancel_requested": True, "kinds": (FailureKind.CANCELLED,)}
_COMPLETES = {**_ENDS, "progress": Progress.DONE, "files": Files.OUTPUTS}
_REQUEUES = {"progress": Progress.RESET, "started": Started.CLEAR, "keeps_place": True}
_DIES = {**_FAILS, "kinds": (FailureKind.WORKER_DIED,)}
_GONE = {"retention": Retention.END, "files": Files.DELETE}

LIFECYCLE: tuple[Transition, ...] = (
    # Submission: the queue bound, the charge and the job are one write (one Lua script on Redis), so
    # concurrent submissions on any number of nodes neither overfill the queue nor overdraw an account.
    # Refused (QueueFull, InsufficientBalance): nothing is stored and nothing is charged.
    Transition(Event.SUBMIT, Stage.ABSENT, Stage.QUEUED, Guard.WITH_IMAGE, credits=Credits.CHARGE, files=Files.INPUT),
    Transition(Event.SUBMIT, Stage.ABSENT, Stage.AWAITING_INPUT, Guard.WITH_URL, credits=Credits.CHARGE),
    # The fetched URL input is stored: the job may run now. (Its place: by its submission on SQLite, behind
    # the jobs already runnable on Redis, whose stream is in the order jobs became runnable.)
    Transition(Event.ATTACH_INPUT, Stage.AWAITING_INPUT, Stage.QUEUED, files=Files.INPUT),
    # Another node's input stage stored it first: that input stays, and the answer is still "ready".
    Transition(Event.ATTACH_INPUT, Stage.QUEUED, Stage.QUEUED),
    # Each claim is a new attempt; the worker's writes carry its number (see FENCED).
    Transition(Event.CLAIM, Stage.QUEUED, Stage.CLAIMED, attempts=1, progress=Progress.RESET),
    # Claimed, a job still counts as waiting (queue position, queue bound) until its worker starts it.
    Transition(Event.START, Stage.CLAIMED, Stage.RUNNING, started=Started.SET, stop=False),
    Transition(Event.START, Stage.RUNNING, Stage.RUNNING, started=Started.SET, stop=False),
    Transition(Event.START, Stage.CANCELLING, Stage.CANCELLING, started=Started.SET, stop=True),
    # Every step's write is also how a cancel asked for on any node reaches the worker: it answers "stop".
    Transition(Event.PROGRESS, Stage.CLAIMED, Stage.CLAIMED, progress=Progress.REPORTED, stop=False),
    Transition(Event.PROGRESS, Stage.RUNNING, Stage.RUNNING, progress=Progress.REPORTED, stop=False),
    Transition(Event.PROGRESS, Stage.CANCELLING, Stage.CANCELLING, progress=Progress.REPORTED, stop=True),
    # The result and its files are one write, kept for the retention, and the charge stands.
    Transition(Event.COMPLETE, Stage.CLAIMED, Stage.COMPLETED, **_COMPLETES),
    Transition(Event.COMPLETE, Stage.RUNNING, Stage.COMPLETED, **_COMPLETES),
    # It finished before it heard of the cancel: the images exist, so they are kept (and paid for).
    Transition(Event.COMPLETE, Stage.CANCELLING, Stage.COMPLETED, **_COMPLETES),
    # The worker's attempt failed (a cancel it stopped for is one, of kind CANCELLED): the charge goes back.
    Transition(Event.FAIL, Stage.CLAIMED, Stage.FAILED, kinds=REPORTED, **_FAILS),
    Transition(Event.FAIL, Stage.RUNNING, Stage.FAILED, kinds=REPORTED, **_FAILS),
    Transition(Event.FAIL, Stage.CANCELLING, Stage.FAILED, kinds=REPORTED, **_FAILS),
    # The server ends a live job itself, not fenced by attempt (the input stage, when a URL input cannot
    # be fetched or kept).
    Transition(Event.ABORT, Stage.AWAITING_INPUT, Stage.FAILED, kinds=INPUT_STAGE, **_FAILS),
    Transition(Event.ABORT, Stage.QUEUED, Stage.FAILED, kinds=INPUT_STAGE, **_FAILS),
    Transition(Event.ABORT, Stage.CLAIMED, Stage.FAILED, kinds=INPUT_STAGE, **_FAILS),
    Transition(Event.ABORT, Stage.RUNNING, Stage.FAILED, kinds=INPUT_STAGE, **_FAILS),
    Transition(Event.ABORT, Stage.CANCELLING, Stage.FAILED, kinds=INPUT_STAGE, **_FAILS),
    # A cancel ends a job nothing runs yet (waiting for its input, queued, or waiting in a worker, which
    # its supervisor then tells to drop it) at once ...
    Transition(Event.CANCEL, Stage.AWAITING_INPUT, Stage.FAILED, **_CANCELS),
    Transition(Event.CANCEL, Stage.QUEUED, Stage.FAILED, **_CANCELS),
    Transition(Event.CANCEL, Stage.CLAIMED, Stage.FAILED, **_CANCELS),
    # ... and flags a running one: its worker stops at its next step, and FAILs it as CANCELLED.
    Transition(Event.CANCEL, Stage.RUNNING, Stage.CANCELLING, cancel_requested=True),
    # Its worker died (its process ended, or on Redis it fell silent). The job goes back to the queue at
    # its old place, ahead of jobs submitted after it, for a new attempt ...
    Transition(Event.WORKER_DIED, Stage.CLAIMED, Stage.QUEUED, Guard.RETRIES_LEFT, **_REQUEUES),
    Transition(Event.WORKER_DIED, Stage.RUNNING, Stage.QUEUED, Guard.RETRIES_LEFT, **_REQUEUES),
    # ... unless it was the last one: a job that kills its worker every time must not kill every worker.
    Transition(Event.WORKER_DIED, Stage.CLAIMED, Stage.FAILED, Guard.LAST_ATTEMPT, **_DIES),
    Transition(Event.WORKER_DIED, Stage.RUNNING, Stage.FAILED, Guard.LAST_ATTEMPT, **_DIES),
    # Asked to stop anyway: it ends cancelled, never retried.
    Transition(Event.WORKER_DIED, Stage.CANCELLING, Stage.FAILED, kinds=(FailureKind.CANCELLED,), **_FAILS),
    # A worker stopping gracefully (scaled down, a rollout) gives back the jobs it holds: a stop is not the job's
    # doing, and the attempt limit is there for jobs that kill their worker. Each is as if never claimed (its
    # claim's attempt taken back), at its old place, for any worker at once; one it ran starts again from the
    # first step. Its next claim reuses that attempt's number: a worker hands back only once its engine and its
    # loop have ended, so nothing writes for the old one again. A running job it hands back only when its
    # engine was answering and ended as asked: one whose engine was silent (hung) or outlived the stop's time
    # may be the job's doing, and is released (WORKER_DIED: that attempt counts). So is one being cancelled,
    # which has no row here: it ends cancelled.
    Transition(Event.HAND_BACK, Stage.CLAIMED, Stage.QUEUED, attempts=-1, **_REQUEUES),
    Transition(Event.HAND_BACK, Stage.RUNNING, Stage.QUEUED, attempts=-1, **_REQUEUES),
    # A finished job and its files are kept for the result TTL, then deleted.
    Transition(Event.EXPIRE, Stage.COMPLETED, Stage.ABSENT, Guard.RETENTION_OVER, **_GONE),
    Transition(Event.EXPIRE, Stage.FAILED, Stage.ABSENT, Guard.RETENTION_OVER, **_GONE),
)


def transitions(event: Event, source: Stage) -> tuple[Transition, ...]:
    """The rows for an event on a job in a stage (none: the event changes nothing)."""
    return tuple(t for t in LIFECYCLE if t.event == event and t.source == source)
