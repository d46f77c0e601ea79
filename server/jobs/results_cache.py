"""Finished jobs never change: an LRU of them keeps repeated polls of a result off the store."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from server.jobs.contract import Job

CACHE_SIZE = 1024


class FinishedJobs:
    """An LRU of finished jobs by id: a result polled a hundred times is read from the store once."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.expires_at is not None and job.expires_at <= time.time():
                del self._jobs[job_id]
                return None
            self._jobs.move_to_end(job_id)
            return job

    def put(self, job: Job) -> None:
        if not job.finished:
            return
        with self._lock:
            self._jobs[job.id] = job
            self._jobs.move_to_end(job.id)
            while len(self._jobs) > self.size:
                self._jobs.popitem(last=False)
