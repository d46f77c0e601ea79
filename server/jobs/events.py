"""In-process notifications between the store's writers and whoever waits on them.

A finished job wakes its v1 waiter and its event streams at once; a new job wakes the dispatcher at
once. Nothing on the request path sleeps and re-reads. Writers may be any thread; waiters are
asyncio tasks (on any loop) or plain callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator

from server.jobs.contract import Job


class Watch:
    """A wake-up signal for one asyncio waiter (made on its loop), set from any thread. Clear, re-read
    the state, then wait.

    A writer in this process may hand over the finished job itself (`outcome`, kept once set: a job ends
    once), so a v1 waiter needs no store read to see its job end. A watch that waits only for the end
    (`ends_only`) is not woken at all while its job runs on (claimed, started, a step further)."""

    def __init__(self, ends_only: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        self.outcome: Job | None = None
        self.ends_only = ends_only

    def set(self, outcome: Job | None = None, running: bool = False) -> None:
        if running and self.ends_only:
            return
        with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits any more
            self.loop.call_soon_threadsafe(self._wake, outcome)

    def set_here(self) -> None:
        """`set` from the waiter's own loop: no hand-over to schedule (nor the loop's self-pipe to write)."""
        self.event.set()

    def _wake(self, outcome: Job | None) -> None:
        # On the waiter's loop, so clear() never races a wake-up.
        if outcome is not None:
            self.outcome = outcome
        self.event.set()

    def clear(self) -> None:
        self.event.clear()

    async def wait(self, timeout: float | None) -> bool:
        """True when it was set, False when `timeout` seconds (None: no limit) passed first."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


class JobEvents:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Changes that said nothing runs on (a job ended, was put back in the queue, or was asked to stop):
        # with the count of waiting jobs, what tells the streams of queued jobs that the queue may have
        # moved (server/http/routes/events.py). A job's claim, start and steps are `running` changes.
        self.settled = 0
        self._watches: dict[str, set[Watch]] = {}
        self._work: list[Callable[[], None]] = []
        self._changes: list[Callable[[str], None]] = []

    @contextlib.contextmanager
    def watch(self, job_id: str, *, ends_only: bool = False) -> Iterator[Watch]:
        watch = Watch(ends_only)
        with self._lock:
            self._watches.setdefault(job_id, set()).add(watch)
        try:
            yield watch
        finally:
            with self._lock:
                watchers = self._watches.get(job_id)
                if watchers is not None:
                    watchers.discard(watch)
                    if not watchers:
                        del self._watches[job_id]

    def job_changed(self, job_id: str, outcome: Job | None = None, running: bool = False) -> None:
        """`outcome`: the job as its writer just finished it; `running`: the job runs on (it was claimed,
        started, or moved a step): nothing that may have ended it."""
        with self._lock:
            if not running:
                self.settled += 1
            watchers = list(self._watches.get(job_id, ()))
            changes = list(self._changes)
        for watch in watchers:
            watch.set(outcome, running)
        for callback in changes:
            callback(job_id)

    def on_change(self, callback: Callable[[str], None]) -> None:
        """`callback(job_id)` runs (in the writer's thread) after every change of any job; it must be quick."""
        with self._lock:
            self._changes.append(callback)

    def remove_on_change(self, callback: Callable[[str], None]) -> None:
        with self._lock:
            if callback in self._changes:
                self._changes.remove(callback)

    def on_work(self, callback: Callable[[], None]) -> None:
        """`callback` runs (in the writer's thread) whenever a job becomes ready to run."""
        with self._lock:
            self._work.append(callback)

    def work_available(self) -> None:
        with self._lock:
            callbacks = list(self._work)
        for callback in callbacks:
            callback()
