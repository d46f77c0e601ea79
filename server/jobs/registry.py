"""Which workers are alive, and what each is doing: the small API /health and v1 read.

Two implementations behind one Protocol, so /health and v1 are the same code on every node:

- `EmbeddedRegistry`: the local supervisor only (`beyond serve` on the embedded store).
- `RedisRegistry`: every worker node publishes itself under `beyond:workers:<name>` (JSON, see
  `WorkerInfo`) with a TTL, refreshed by a `Heartbeat` every few seconds; a worker that stops
  refreshing (killed, partitioned) drops out of the list when its key expires. Its running job is
  taken over by the store's reclaim (BEYOND_RECLAIM_AFTER), not by this module. A worker's card is also
  published as soon as it becomes busy or idle: a busy worker reads the cards to learn whether another
  one is idle before it claims a job ahead of its running one (`share_state`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from server.jobs.store import StoreUnavailable
from server.jobs.supervisor import Supervisor, WorkerStatus
from server.logs import RateLimitedLog

if TYPE_CHECKING:
    from server.jobs.redis_connection import RedisTLS

log = logging.getLogger("beyond.registry")
KEY_PREFIX = "beyond:workers:"
# The names ever published; a name whose key has expired is dropped from it when next listed.
NAMES_KEY = "beyond:workers"
REDIS_TIMEOUT = 2.0


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    state: str  # a WorkerStatus value: starting, loading, ready, restarting, failed, stopped
    model: str
    device: str
    dtype: str
    pid: int | None  # the worker node's process (the API process for `beyond serve`)
    engine_pid: int | None  # the engine process it supervises
    current_job: str | None
    since: float  # when it entered this state (Unix time)
    restarts: int = 0
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.state == WorkerStatus.READY.value

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerInfo:
        fields = cls.__dataclass_fields__
        return cls(**{key: value for key, value in data.items() if key in fields})


class WorkerRegistry(Protocol):
    def workers(self) -> list[WorkerInfo]:
        """The live workers, sorted by name. Raises StoreUnavailable when the registry cannot be read."""
        ...


class LocalWorker:
    """The card of the worker this process supervises, as the registry shows it."""

    def __init__(self, supervisor: Supervisor, name: str, pid: int) -> None:
        self.supervisor = supervisor
        self.name = name
        self.pid = pid
        self._state = supervisor.status.state
        self._since = time.time()
        self._lock = threading.Lock()

    def info(self) -> WorkerInfo:
        status = self.supervisor.status
        config = self.supervisor.config
        with self._lock:
            if status.state != self._state:
                self._state, self._since = status.state, time.time()
            since = self._since
        return WorkerInfo(
            name=self.name,
            state=status.state.value,
            model=config.model,
            device=str(status.info.get("device", config.device)),
            dtype=str(status.info.get("dtype", config.dtype)),
            pid=self.pid,
            engine_pid=status.pid,
            current_job=status.current_job,
            since=since,
            restarts=status.restarts,
            error=status.error,
        )


class EmbeddedRegistry:
    """One worker: the one this process supervises."""

    def __init__(self, local: LocalWorker) -> None:
        self.local = local

    def workers(self) -> list[WorkerInfo]:
        return [self.local.info()]


class RedisRegistry:
    """Every node's cards. A node with a worker of its own (`local`) describes that one from its supervisor,
    not from its last card: the card can say "ready" for up to a heartbeat after the engine died."""

    def __init__(self, url: str, *, ttl: float, local: LocalWorker | None = None, tls: RedisTLS | None = None) -> None:
        # Imported here: a single box (no Redis) never loads the Redis client.
        from server.jobs.redis_connection import connect, where

        self.ttl = ttl
        self.local = local
        self.where = where(url)
        self.client = connect(
            url, tls, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT, decode_responses=True
        )

    def _failure(self, exc: Exception, doing: str) -> StoreUnavailable:
        from server.jobs.redis_connection import RedisRefused, refusal

        refused = refusal(exc)
        if refused is not None:
            return RedisRefused(f"the worker registry cannot be {doing}: Redis at {self.where} {refused}")
        return StoreUnavailable(f"the worker registry cannot be {doing} ({type(exc).__name__})")

    def publish(self, info: WorkerInfo) -> None:
        import redis

        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(KEY_PREFIX + info.name, json.dumps(info.to_json()), px=int(self.ttl * 1000))
            pipe.sadd(NAMES_KEY, info.name)
            pipe.execute()
        except redis.RedisError as exc:
            raise self._failure(exc, "written") from None

    def remove(self, name: str) -> None:
        import redis

        try:
            self.client.delete(KEY_PREFIX + name)
            self.client.srem(NAMES_KEY, name)
        except redis.RedisError as exc:
            raise self._failure(exc, "written") from None

    def idle_besides(self, name: str) -> bool:
        """Whether a live worker other than `name` is ready and runs nothing. True also when the registry
        cannot be read: a job is then left for whichever worker is free rather than claimed ahead."""
        try:
            workers = self.workers()
        except StoreUnavailable:
            return True
        return any(worker.ready and worker.current_job is None and worker.name != name for worker in workers)

    def workers(self) -> list[WorkerInfo]:
        import redis

        try:
            names = sorted(self.client.smembers(NAMES_KEY))
            values = self.client.mget([KEY_PREFIX + name for name in names]) if names else []
            gone = [name for name, value in zip(names, values, strict=True) if value is None]
            if gone:
                self.client.srem(NAMES_KEY, *gone)
        except redis.RedisError as exc:
            raise self._failure(exc, "read") from None
        workers = [self.local.info()] if self.local else []
        for value in values:
            if value is None:
                continue
            try:
                info = WorkerInfo.from_json(json.loads(value))
            except (ValueError, TypeError):
                log.warning("ignoring an unreadable worker card")
                continue
            if self.local is None or info.name != self.local.name:
                workers.append(info)
        return sorted(workers, key=lambda worker: worker.name)


class Heartbeat:
    """Publishes the local worker's card every `interval` seconds until stopped, then removes it."""

    def __init__(self, registry: RedisRegistry, local: LocalWorker, interval: float) -> None:
        self.registry = registry
        self.local = local
        self.interval = interval
        self._stop = threading.Event()
        self._nudged = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._errors = RateLimitedLog(log)

    def start(self) -> None:
        self._thread.start()

    def nudge(self) -> None:
        """Publish the card now, not at the next beat (the worker became busy or idle)."""
        self._nudged.set()

    def beat(self) -> None:
        try:
            self.registry.publish(self.local.info())
        except StoreUnavailable as exc:
            self._errors.error("heartbeat of %s failed: %s", self.local.name, exc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._nudged.clear()
            self.beat()
            self._nudged.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._nudged.set()
        self._thread.join(self.interval + REDIS_TIMEOUT)
        try:
            self.registry.remove(self.local.name)
        except StoreUnavailable as exc:
            log.warning("could not remove %s from the worker registry: %s", self.local.name, exc)


def share_state(supervisor: Supervisor, registry: RedisRegistry, heartbeat: Heartbeat) -> None:
    """A worker on Redis: its supervisor asks the cards whether another worker is idle before it claims a
    job ahead of its running one, and its own card is published as soon as it becomes busy or idle."""
    name = heartbeat.local.name
    supervisor.others_idle = lambda: registry.idle_besides(name)
    supervisor.on_busy_change = heartbeat.nudge


def unavailable_reason(workers: list[WorkerInfo]) -> str | None:
    """Why no engine can take work now (None when one is ready), in words for a 502."""
    if any(worker.ready for worker in workers):
        return None
    if not workers:
        return "no live worker is known"
    first = workers[0]
    if first.state == WorkerStatus.FAILED.value and first.error:
        return first.error
    return f"the worker is {first.state}"


def worker_name(configured: str | None) -> str:
    """BEYOND_WORKER_NAME, or <hostname>-<pid>: unique per process, readable in /health."""
    return configured or f"{socket.gethostname()}-{os.getpid()}"
