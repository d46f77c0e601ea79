"""The supervisor: feeds ready jobs to the engine process and keeps it alive.

It runs in a thread of the API process (or of `beyond worker`) and sleeps until something happens: a
message or the death of the engine process, a job becoming ready (the store wakes it), or the next purge
of expired results. A job that becomes ready while the loop sleeps is claimed and sent by the thread that
made it ready, under the same lock, so a request does not wait for the loop's thread to wake.
It keeps the engine process fed ahead: up to two batches' worth of jobs in flight (the running batch and
the next, which the engine process prepares meanwhile), claimed in queue order. On a store shared with
other workers a free worker takes one batch, and a busy one claims the next only when no other worker is
idle or in its running batch's last steps, so that no job waits here long while another worker idles.
The engine process may die at any moment (a segfault, an OOM kill); the supervisor then puts every job
it held back in the queue (once each) and starts a new one, while the API goes on answering. (In the
code below, "the worker" is this supervisor's engine process.)

One cohesive thing past 450 lines: one loop that owns one engine process (its start and restarts, its
messages, the jobs it holds and what the store hears of them); split, each part would reach into the
others' state under the same lock.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import multiprocessing
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from server.jobs.contract import PREVIEW_NAME, FailureKind, JobStatus
from server.jobs.engine_process import worker_main
from server.jobs.messages import (
    Cancel,
    JobDone,
    JobFailed,
    LoadFailed,
    Preview,
    Progress,
    Ready,
    RunJob,
    Shutdown,
    Started,
    WorkerConfig,
)
from server.jobs.store import FileGone, JobStore, StoreError, StoreUnavailable
from server.logs import RateLimitedLog
from server.metrics import Metrics

log = logging.getLogger("beyond.supervisor")
MAX_BACKOFF = 60.0
STORE_RETRY = 1.0  # seconds between tries while the store is broken
# A finished job's outcome is held this long while the store is unreachable (a Redis restart), not dropped.
FINISH_RETRY_FOR = 30.0
# How often the jobs waiting in the worker are checked for a cancel, at most (a running job's
# cancel is seen with its progress, at every step).
WAITING_CANCEL_CHECK = 0.25
# On a shared store a busy worker claims its next batch in the running batch's last steps: once that batch
# is expected to end within this many seconds (or one step), at its step rate so far. A job claimed so
# waits here about that long, while it is prepared.
PREFETCH_LEAD = 0.5
# How long an answer of `others_idle` (a read of the worker registry) is used before it is asked again.
IDLE_CHECK_INTERVAL = 0.25


class WorkerStatus(str, enum.Enum):
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class WorkerState:
    state: WorkerStatus = WorkerStatus.STARTING
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    pid: int | None = None
    restarts: int = 0
    # The jobs the worker holds (waiting, prepared or denoising), in queue order: id -> attempt.
    in_flight: dict[str, int] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)  # those of them that are denoising
    max_batch: int = 1

    @property
    def current_job(self) -> str | None:
        """The first job denoising, if any."""
        return next((job_id for job_id in self.in_flight if job_id in self.started), None)


@dataclass
class Denoising:
    """A denoising job's pace, from its progress messages (monotonic times)."""

    started: float
    step: int = 0
    total: int = 0
    at: float = 0.0

    def near_end(self, now: float) -> bool:
        """In its last steps: expected to end within PREFETCH_LEAD seconds, or one step."""
        if self.step <= 0 or self.total <= 0:
            return False
        per_step = (self.at - self.started) / self.step
        left = (self.total - self.step) * per_step - (now - self.at)
        return left <= max(PREFETCH_LEAD, per_step)


class Supervisor:
    def __init__(
        self,
        store: JobStore,
        config: WorkerConfig,
        *,
        purge_interval: float = 30.0,
        backoff: float = 2.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.purge_interval = purge_interval
        self.backoff = backoff
        self.status = WorkerState()
        self.metrics = metrics
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._cancel_sent: set[str] = set()
        # Set when a job may be claimable (woken, or a slot came free): the loop does not ask the
        # store on every message from the worker.
        self._work_hint = True
        self._next_cancel_check = 0.0
        self._load_failures = 0
        self._last_heard = time.monotonic()  # the worker's last message, or the last job sent to it
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._errors = RateLimitedLog(log)
        # The worker's state and pipe: held by the loop while it handles anything, and by a writer's
        # thread that hands a new job to an idle worker itself (see _work_ready).
        self._lock = threading.Lock()
        # On a shared store: whether another worker is idle now (set with the worker registry; None: not
        # known, so taken as yes), and what to call when this worker becomes busy or idle (its registry
        # card is published then, not at the next heartbeat). See registry.share_state.
        self.others_idle: Callable[[], bool] | None = None
        self.on_busy_change: Callable[[], None] | None = None
        self._idle_answer: tuple[float, bool] = (0.0, True)  # (asked at, answer)
        self._busy = False
        self._denoising: dict[str, Denoising] = {}
        self._claimed_at: dict[str, float] = {}  # monotonic time each held job was claimed
        if metrics:
            metrics.track_worker(lambda: len(self.status.in_flight), self._oldest_held)
        store.events.on_work(self._work_ready)

    @property
    def ready(self) -> bool:
        return self.status.state == WorkerStatus.READY

    def wake(self) -> None:
        self._work_hint = True
        with contextlib.suppress(BlockingIOError, OSError):  # a byte is already waiting: awake anyway
            self._wake_w.send(b"\0")

    def _work_ready(self) -> None:
        """A job became ready to run, in its writer's thread (a submission, the input stage, Redis's
        listener). When the loop is not busy the job is claimed and sent from here, at once: waking the
        loop's thread first would cost the request a hand-over between threads. Else the loop does it."""
        self._work_hint = True
        if self.ready and self._lock.acquire(blocking=False):
            try:
                if not self._stop.is_set():
                    self._dispatch()
                    return
            except Exception:  # StoreError, a dead worker's pipe: the loop tries again and says why
                self._work_hint = True
            finally:
                self._lock.release()
        self.wake()

    def start(self) -> None:
        # Jobs left PROCESSING by a previous server that died: their worker is gone too.
        for job in self.store.processing():
            self.store.release(job.id, "the server stopped", job.attempts)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the worker: asked first, then terminated, then killed, within about 3 x timeout. On Linux the
        end of the loop's thread already kills it (its parent-death signal, server/jobs/lifeline.py): nothing
        would read what it still had to say.

        The jobs it held go back to the queue now rather than waiting to be found stale, handed back as if never
        claimed (no attempt spent, see the lifecycle's HAND_BACK): a stop is not the job's doing. Except a running
        job whose engine did not end as asked (silent when the stop came, dead already, or it or the loop outlived
        their time): that may be the job's doing, so it is released as for a death (that attempt counts). Then
        this node leaves the store's readers."""
        answering = self._proc is not None and self._proc.is_alive() and self._heard_from()
        self._stop.set()
        self.wake()
        self._thread.join(timeout)
        forced = self._thread.is_alive()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(Shutdown())
        if self._proc is not None:
            self._proc.join(timeout)
            if self._proc.is_alive():
                forced = True
                self._proc.terminate()
                self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout)
        self.status.state = WorkerStatus.STOPPED
        # A job handed back is claimed again under the same attempt number: only once nothing here can write
        # for its attempt any more (the engine and the loop's thread are gone) may it be, else it is released.
        quiet = not self._thread.is_alive() and (self._proc is None or not self._proc.is_alive())
        clean = quiet and answering and not forced
        with self._lock:
            for job_id, attempt in list(self.status.in_flight.items()):
                running = job_id in self.status.started
                self._job_finished(job_id)
                try:
                    if (clean if running else quiet) and self.store.hand_back(job_id, attempt):
                        log.info("job %s on stop: handed back (%s)", job_id, "running" if running else "not started")
                        continue
                    outcome = self.store.release(job_id, "the worker was stopped", attempt)
                    log.info("job %s on stop: %s", job_id, outcome.value)
                except StoreError as exc:
                    log.warning("could not give back job %s on stop: %s", job_id, exc)
            try:
                self.store.leave()
            except StoreError as exc:
                log.warning("could not leave the job store's readers: %s", exc)

    def _spawn(self) -> None:
        # The worker's parent-death signal fires when the thread that starts it ends: only the loop's thread,
        # which lasts as long as the supervisor, may start one (a request's thread would take it down with it).
        if threading.current_thread() is not self._thread:
            raise RuntimeError("only the supervisor's own thread starts the worker")
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=worker_main, args=(child, self.config), name="beyond-worker", daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        self.status.pid = self._proc.pid
        self.status.state = WorkerStatus.LOADING
        log.info("worker started (pid %s), loading %s", self._proc.pid, self.config.model)

    def _loop(self) -> None:
        next_purge = next_keep_alive = 0.0
        reclaim_after = self.store.reclaim_after
        while not self._stop.is_set():
            try:
                with self._lock:
                    if self._proc is None:
                        self._spawn()
                    if time.monotonic() >= next_purge:
                        next_purge = time.monotonic() + self.purge_interval
                        removed = self.store.purge_expired()
                        if removed:
                            log.info("purged %d expired requests", removed)
                    if self.ready:
                        self._dispatch()
                    if reclaim_after is not None and time.monotonic() >= next_keep_alive:
                        next_keep_alive = time.monotonic() + reclaim_after / 4
                        self._keep_alive()
                wake_at = next_purge if reclaim_after is None else min(next_purge, next_keep_alive)
                self._pump(max(0.0, wake_at - time.monotonic()))
            except StoreError as exc:
                self._errors.error("the job store failed: %s", exc)
                self._work_hint = True  # look again once it works
                self._stop.wait(STORE_RETRY)
            except Exception as exc:  # the loop must outlive any single surprise
                self._errors.exception("supervisor loop error: %s", type(exc).__name__)
                self._work_hint = True
                self._stop.wait(STORE_RETRY)

    def _pump(self, timeout: float) -> None:
        assert self._proc is not None and self._conn is not None
        ready = wait([self._conn, self._proc.sentinel, self._wake_r], timeout=timeout)
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while self._wake_r.recv(4096):
                    pass
        with self._lock:
            self._take(ready)

    def _take(self, ready: list[Any]) -> None:
        """What the worker said, or its death."""
        assert self._proc is not None and self._conn is not None
        if self._conn in ready:
            self._last_heard = time.monotonic()
            try:
                while self._conn.poll():
                    self._handle(self._conn.recv())
                return
            except (EOFError, OSError):
                pass
        if not self._proc.is_alive():
            self._on_death()

    def _handle(self, message: object) -> None:
        store = self.store
        if isinstance(message, Ready):
            self.status.state, self.status.info, self.status.error = WorkerStatus.READY, message.info, None
            self.status.max_batch = max(1, message.max_batch)
            self._work_hint = True
            self._load_failures = 0
            log.info("worker ready: %s", message.info)
        elif isinstance(message, LoadFailed):
            self.status.state, self.status.error = WorkerStatus.FAILED, message.error
            log.error("worker could not load the model: %s", message.error)
        elif isinstance(message, Started):
            if message.job_id in self.status.in_flight:
                self.status.started.add(message.job_id)
                self._denoising[message.job_id] = Denoising(time.monotonic())
                self._busy_changed()
            if store.mark_started(message.job_id, message.attempt):
                # Cancelled while it waited, before the worker heard (or taken over by another node): it
                # stops at its first step.
                self._send_cancel(message.job_id)
        elif isinstance(message, Progress):
            denoising = self._denoising.get(message.job_id)
            if denoising is not None:
                denoising.step, denoising.total, denoising.at = message.step, message.total, time.monotonic()
            if self.metrics:
                self.metrics.step_done()
            cancel = store.set_progress(message.job_id, message.attempt, message.step / max(message.total, 1))
            if cancel:
                self._send_cancel(message.job_id)
            self._check_waiting_cancels()
        elif isinstance(message, Preview):
            if self.status.in_flight.get(message.job_id) == message.attempt:
                store.put_file(message.job_id, PREVIEW_NAME, message.jpeg)
        elif isinstance(message, JobDone):
            try:
                done = self._finish(store.complete, message.job_id, message.attempt, message.result, message.files)
                if done and self.metrics:
                    self.metrics.job_done(message.result)
            finally:
                self._job_finished(message.job_id)
        elif isinstance(message, JobFailed):
            try:
                kind = FailureKind(message.kind)
                if self._finish(store.fail, message.job_id, message.error, kind, message.attempt) and self.metrics:
                    self.metrics.job_failed(message.kind)
            finally:
                self._job_finished(message.job_id)

    def _finish(self, write: Any, *args: Any) -> bool:
        """A job's outcome, written once the store answers again (for FINISH_RETRY_FOR at most): an
        image made during a short store outage is kept, not thrown away and made again."""
        deadline = time.monotonic() + FINISH_RETRY_FOR
        while True:
            try:
                return bool(write(*args))
            except StoreUnavailable as exc:
                if time.monotonic() >= deadline or self._stop.is_set():
                    raise
                self._errors.error("the job store failed: %s; holding a finished job's outcome", exc)
                self._stop.wait(STORE_RETRY)

    def _job_finished(self, job_id: str) -> None:
        self._work_hint = True
        self.status.in_flight.pop(job_id, None)
        self._claimed_at.pop(job_id, None)
        self._denoising.pop(job_id, None)
        if job_id in self.status.started:
            self.status.started.discard(job_id)
            self._busy_changed()
        self._cancel_sent.discard(job_id)

    def _busy_changed(self) -> None:
        """A job started or ended: the worker may have become busy (a job denoising or finishing) or idle."""
        busy = bool(self.status.started)
        if busy == self._busy:
            return
        self._busy = busy
        if self.metrics:
            self.metrics.worker_busy(busy)
        if self.on_busy_change:
            self.on_busy_change()

    def _oldest_held(self) -> float:
        """Seconds since the oldest job the worker holds was claimed; 0 when it holds none."""
        claimed = list(self._claimed_at.values())
        return time.monotonic() - min(claimed) if claimed else 0.0

    def _send_cancel(self, job_id: str) -> None:
        if job_id in self._cancel_sent or job_id not in self.status.in_flight or self._conn is None:
            return
        self._conn.send(Cancel(job_id))
        self._cancel_sent.add(job_id)

    def _keep_alive(self) -> None:
        """The jobs the worker holds are alive, also those waiting behind the running batch or finishing:
        no other node may take them for a dead worker's. One this attempt no longer holds is stopped.

        Only while the worker is heard from: an engine that is alive but silent (a hung driver) keeps
        nothing, so its jobs are taken over as a dead one's would be."""
        if not self.status.in_flight or not self._heard_from():
            return
        for job_id in self.store.keep_alive(dict(self.status.in_flight)):
            self._send_cancel(job_id)

    def _heard_from(self) -> bool:
        """The engine spoke lately: on a shared store, within 3/4 of reclaim_after (a step, a start, an answer,
        or a job sent to it). Else it is taken as hung: its jobs are no longer kept alive, and on a stop its
        running job is released, not handed back."""
        reclaim_after = self.store.reclaim_after
        return reclaim_after is None or time.monotonic() - self._last_heard <= 0.75 * reclaim_after

    def _check_waiting_cancels(self) -> None:
        """A job cancelled while it waits in the worker never starts: the worker is told early.

        The store ends such a job at once (it has not started), so its progress no longer reports
        the cancel: the worker is told of every held job that was cancelled or has ended.
        """
        now = time.monotonic()
        if now < self._next_cancel_check:
            return
        self._next_cancel_check = now + WAITING_CANCEL_CHECK
        for job_id in list(self.status.in_flight):
            if job_id in self._cancel_sent:
                continue
            job = self.store.get(job_id)
            if job is None or job.cancel_requested or job.status != JobStatus.PROCESSING:
                self._send_cancel(job_id)

    def _on_death(self) -> None:
        assert self._proc is not None
        code = self._proc.exitcode
        loading = self.status.state in (WorkerStatus.LOADING, WorkerStatus.FAILED)
        log.error("worker (pid %s) exited with code %s", self._proc.pid, code)
        if self.metrics:
            self.metrics.worker_died()
        held = list(self.status.in_flight.items())
        self._proc, self._conn = None, None
        self.status.restarts += 1
        # Every job it held goes back (once each), in the order they were claimed.
        for job_id, attempt in held:
            self._job_finished(job_id)
            outcome = self.store.release(job_id, f"the worker process died (exit code {code})", attempt)
            if outcome.value == "FAILED" and self.metrics:
                self.metrics.job_failed(FailureKind.WORKER_DIED.value)
            log.warning("job %s after worker death: %s", job_id, outcome.value)
        if loading:
            self._load_failures += 1
            delay = min(MAX_BACKOFF, self.backoff * 2 ** (self._load_failures - 1))
            self.status.state = WorkerStatus.FAILED
            self._stop.wait(delay)
        else:
            self.status.state = WorkerStatus.RESTARTING

    @property
    def shared(self) -> bool:
        """Other workers take jobs from the same store (Redis)."""
        return self.store.reclaim_after is not None

    @property
    def window(self) -> int:
        """Jobs kept in the worker: the running batch and the next one, being prepared."""
        return 2 * self.status.max_batch if self.config.prefetch else 1

    def _may_claim_ahead(self) -> bool:
        """On a shared store a job claimed while this worker is busy waits here for the running batch:
        only when no other worker is idle to take it now, or in the running batch's last steps."""
        now = time.monotonic()
        if any(job.near_end(now) for job in self._denoising.values()):
            return True
        if self.others_idle is None:
            return False
        asked, idle = self._idle_answer
        if now - asked >= IDLE_CHECK_INTERVAL:
            idle = self.others_idle()
            self._idle_answer = (now, idle)
        return not idle

    def _dispatch(self) -> None:
        limit = self.window
        if self.shared and not self.status.in_flight:
            limit = min(limit, self.status.max_batch)  # a free worker takes one batch
        elif self.shared and self._work_hint and len(self.status.in_flight) < limit and not self._may_claim_ahead():
            return  # asked again at the worker's next message (a step) or the next wake-up
        while self._work_hint and len(self.status.in_flight) < limit and self._conn is not None:
            self._work_hint = False  # cleared before asking, so a wake-up meanwhile is not lost
            job = self.store.claim_next()
            if job is None:
                return
            self._work_hint = True  # there may be more
            try:
                image = self.store.read_file(job.id, "input")
            except FileGone:
                self.store.fail(job.id, "input_image: the stored input is gone", FailureKind.INPUT, job.attempts)
                continue
            self.status.in_flight[job.id] = job.attempts
            self._claimed_at[job.id] = time.monotonic()
            self._conn.send(RunJob(job.id, job.attempts, job.params, image, job.delivery))
            self._last_heard = time.monotonic()  # its claim made its entry fresh; the worker answers soon
