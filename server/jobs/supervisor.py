"""The supervisor: feeds queued jobs to the worker process, one at a time, and keeps it alive.

It runs in a thread of the API process. The worker may die at any moment (a segfault, an OOM
kill); the supervisor then puts its job back in the queue (once) and starts a new worker, while
the API goes on answering.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from server.jobs.messages import (
    Cancel,
    JobDone,
    JobFailed,
    LoadFailed,
    Progress,
    Ready,
    RunJob,
    Shutdown,
    WorkerConfig,
)
from server.jobs.model import FailureKind
from server.jobs.store import JobStore
from server.jobs.worker import worker_main
from server.metrics import Metrics

log = logging.getLogger("beyond.supervisor")
TICK = 0.05
MAX_BACKOFF = 60.0


@dataclass
class WorkerState:
    state: str = "starting"  # starting, loading, ready, restarting, failed, stopped
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    pid: int | None = None
    restarts: int = 0
    current_job: str | None = None


class Supervisor:
    def __init__(
        self,
        store: JobStore,
        config: WorkerConfig,
        *,
        purge_interval: float = 30.0,
        backoff: float = 2.0,
        log_level: str = "info",
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.purge_interval = purge_interval
        self.backoff = backoff
        self.log_level = log_level
        self.status = WorkerState()
        self.metrics = metrics
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._cancel_sent: str | None = None
        self._load_failures = 0

    @property
    def ready(self) -> bool:
        return self.status.state == "ready"

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def start(self) -> None:
        # Jobs left PROCESSING by a previous server that died: their worker is gone too.
        for job in self.store.processing():
            self.store.release(job.id, "the server stopped")
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(Shutdown())
        if self._proc is not None:
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
        self.status.state = "stopped"

    def _spawn(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(
            target=worker_main, args=(child, self.config, self.log_level), name="beyond-worker", daemon=True
        )
        self._proc.start()
        child.close()
        self._conn = parent
        self.status.pid = self._proc.pid
        self.status.state = "loading"
        log.info("worker started (pid %s), loading %s", self._proc.pid, self.config.model)

    def _loop(self) -> None:
        last_purge = 0.0
        while not self._stop.is_set():
            try:
                if self._proc is None:
                    self._spawn()
                self._pump()
                if self.ready and self.status.current_job is None:
                    self._dispatch()
                self._forward_cancel()
                if time.monotonic() - last_purge > self.purge_interval:
                    last_purge = time.monotonic()
                    removed = self.store.purge_expired()
                    if removed:
                        log.info("purged %d expired requests", removed)
            except Exception:  # the loop must outlive any single surprise
                log.exception("supervisor loop error")
                time.sleep(TICK)

    def _pump(self) -> None:
        assert self._proc is not None and self._conn is not None
        ready = wait([self._conn, self._proc.sentinel], timeout=TICK)
        if self._conn in ready:
            try:
                while self._conn.poll():
                    self._handle(self._conn.recv())
                return
            except (EOFError, OSError):
                pass
        if not self._proc.is_alive():
            self._on_death()

    def _handle(self, message: object) -> None:
        if isinstance(message, Ready):
            self.status.state, self.status.info, self.status.error = "ready", message.info, None
            self._load_failures = 0
            log.info("worker ready: %s", message.info)
        elif isinstance(message, LoadFailed):
            self.status.state, self.status.error = "failed", message.error
            log.error("worker could not load the model: %s", message.error)
        elif isinstance(message, Progress):
            self.store.set_progress(message.job_id, message.step / max(message.total, 1))
        elif isinstance(message, JobDone):
            self.store.complete(message.job_id, message.result)
            if self.metrics:
                self.metrics.job_done(message.result)
            self._job_finished(message.job_id)
        elif isinstance(message, JobFailed):
            self.store.fail(message.job_id, message.error, FailureKind(message.kind))
            if self.metrics:
                self.metrics.job_failed(message.kind)
            self._job_finished(message.job_id)

    def _job_finished(self, job_id: str) -> None:
        if self.status.current_job == job_id:
            self.status.current_job = None
            self._cancel_sent = None

    def _on_death(self) -> None:
        assert self._proc is not None
        code = self._proc.exitcode
        loading = self.status.state in ("loading", "failed")
        log.error("worker (pid %s) exited with code %s", self._proc.pid, code)
        if self.status.current_job is not None:
            outcome = self.store.release(self.status.current_job, f"the worker process died (exit code {code})")
            if self.metrics:
                self.metrics.job_failed(FailureKind.WORKER_DIED.value)
            log.warning("job %s after worker death: %s", self.status.current_job, outcome.value)
            self._job_finished(self.status.current_job)
        self._proc, self._conn = None, None
        self.status.restarts += 1
        if loading:
            self._load_failures += 1
            delay = min(MAX_BACKOFF, self.backoff * 2 ** (self._load_failures - 1))
            self.status.state = "failed"
            self._stop.wait(delay)
        else:
            self.status.state = "restarting"

    def _dispatch(self) -> None:
        job = self.store.claim_next()
        if job is None:
            return
        assert self._conn is not None
        self.status.current_job = job.id
        self._conn.send(RunJob(job.id, job.params, job.source, self.store.job_dir(job.id)))

    def _forward_cancel(self) -> None:
        job_id = self.status.current_job
        if job_id is None or self._cancel_sent == job_id or self._conn is None:
            return
        job = self.store.get(job_id)
        if job is not None and job.cancel_requested:
            self._conn.send(Cancel(job_id))
            self._cancel_sent = job_id
