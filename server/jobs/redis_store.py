"""The job store shared by several nodes: Redis, with delivery on a Redis stream.

Every node (API, worker, or both) keeps its state here and nowhere else: job rows, inputs, outputs and
previews, credit balances. Runnable jobs are entries of one stream read by one consumer group; each
node reads it under its own consumer name, so the stream hands every job to exactly one worker, in the
order jobs became runnable. An entry stays pending until its job's result is stored; while its worker
is heard from, its supervisor keeps fresh the entry of every job it holds (`keep_alive`: running,
being prepared or finishing), and an entry left idle for `reclaim_after` seconds (its worker died or
hung) is taken over by the next `claim_next` as a new attempt, at most MAX_ATTEMPTS in all.

Each write is one Lua script (server/jobs/redis_scripts.py), so a job is never half-written and the
lifecycle of server/jobs/lifecycle.py (queue bound, charge and refund, fencing by attempt, what a cancel
and a worker death do) holds across nodes. A script publishes what it
changed on one pub/sub channel; each store instance runs one listener thread that turns those messages
into the local `JobEvents`, so waiters and supervisors on every node are woken.

Key layout (prefix `beyond:` by default):
    seq                 counter of job seqs (INCR)
    job:<id>            hash: the job's fields (server/jobs/codec.py), and its stream entry and consumer
    files:<id>          hash: file name -> bytes (input, outputs, previews)
    stream              the stream of runnable jobs, entries {job: <id>}; group "workers", one consumer per
                        worker node that reads it (forgotten once it holds no entry and is gone: `leave`,
                        `purge_expired`)
    queued              zset by seq of the jobs waiting: QUEUED, or claimed but not started (queue bound, position)
    awaiting            zset of QUEUED URL jobs without their input yet, by seq
    fetch:<id>          string: the consumer name of the node fetching a URL job's input, for reclaim_after
    processing          zset of PROCESSING job ids by seq
    owner:=<owner>      zset of an owner's job ids by seq (`owner:-` for jobs without a key)
    expiry              zset of "<id> <owner key>" by expires_at: what purge_expired cleans up
    credits, granted    hashes owner -> balance units, owner -> granted units
    events              pub/sub channel: "<origin> w" (work available), "<origin> j <id>" (job changed),
                        "<origin> r <id>" (job claimed, started or a step further: still running)
Finished jobs and their files carry a Redis TTL (the result TTL); live jobs never expire.

Longer than most modules, as one cohesive thing: one implementation of the JobStore protocol
(server/jobs/store.py), whose methods share the connection, the key layout and the scripts; its Lua is in
server/jobs/redis_scripts.py, its connection in server/jobs/redis_connection.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from server.jobs.codec import STATE_FIELDS, encode_result, job_from_fields, state_from_fields, submitted_fields
from server.jobs.contract import (
    Delivery,
    FailureKind,
    ImageSource,
    Job,
    JobParams,
    JobResult,
    JobState,
    JobStatus,
)
from server.jobs.events import JobEvents
from server.jobs.lifecycle import expired
from server.jobs.redis_connection import RedisRefused, RedisTLS, connect, probe, store_error, where
from server.jobs.redis_scripts import GROUP, SCRIPTS
from server.jobs.store import DiskFull, FileGone, InsufficientBalance, QueueFull, StoreUnavailable

log = logging.getLogger("beyond.redis")

LISTENER_BACKOFF = (0.1, 5.0)  # first and longest wait between reconnections of the pub/sub listener


@dataclass(frozen=True)
class StreamStats:
    """The job stream as /metrics shows it (server/metrics.py)."""

    length: int  # its entries: the jobs waiting for a worker plus the jobs workers hold (XLEN)
    pending: int  # entries delivered to a worker and not yet done: the jobs workers hold
    # The group's lag as Redis reports it: entries not yet delivered. None where Redis cannot count it
    # (an entry past the group's read position was deleted); after such deletions it can also be too high.
    lag: int | None
    oldest_age: float  # seconds since the oldest job not started yet was submitted; 0 when none waits


def _pairs(flat: list[Any]) -> dict[str, bytes]:
    """A script's HGETALL answer, as the codec's fields."""
    return {name.decode(): value for name, value in zip(flat[::2], flat[1::2], strict=True)}


class RedisJobStore:
    def __init__(
        self,
        url: str,
        *,
        ttl: float = 3600.0,
        reclaim_after: float = 60.0,
        consumer: str | None = None,
        prefix: str = "beyond:",
        events: JobEvents | None = None,
        listen: bool = True,
        wait: float = 0.0,
        tls: RedisTLS | None = None,
    ) -> None:
        """`consumer` names this node in the consumer group. A stable name (the default of build_store:
        host and data dir) lets a restarted node release the jobs its previous life was running at once,
        instead of after `reclaim_after`; two live nodes must never share one. With `wait`, a Redis that
        is not up yet is waited for that many seconds (a node started with it), then StoreUnavailable; one
        that turns this node away (credentials, TLS) is not waited for: RedisRefused at once. `tls`: the
        files of a rediss:// connection."""
        self.url = url
        self.tls = tls
        self.where = where(url)
        self.ttl = ttl
        self.reclaim_after = reclaim_after
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.prefix = prefix
        self.events = events or JobEvents()
        self._origin = uuid.uuid4().hex
        self.redis = connect(
            url,
            tls,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            socket_connect_timeout=2.0,
            socket_timeout=30.0,
            health_check_interval=30,
        )
        self._scripts = {name: self.redis.register_script(source) for name, source in SCRIPTS.items()}
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._listener: threading.Thread | None = None
        up, deadline, delay = False, time.monotonic() + wait, 0.2
        while not up:
            try:
                probe(url, tls, f"the job store (Redis at {self.where})")
                self._ensure_group()
                self._check_config()
                up = True
            except StoreUnavailable as exc:  # not up (yet): /health says so; the first claim creates the group
                if wait > 0 and isinstance(exc, RedisRefused):
                    raise  # up, but it will not have this node: waiting changes nothing
                if time.monotonic() + delay > deadline:
                    if wait > 0:
                        raise
                    log.warning("%s", exc)
                    break
                log.info("waiting for %s", self.where)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        if listen:
            self._listener = threading.Thread(target=self._listen, name="redis-events", daemon=True)
            self._listener.start()
            if up:  # from here on this node hears every other node's writes
                self._listening.wait(5)

    # -- plumbing ---------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _owner_key(self, owner: str | None) -> str:
        return self._key("owner:=" + owner) if owner is not None else self._key("owner:-")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Redis's failures as the store's own (retries with backoff are done by then)."""
        try:
            yield
        except RedisError as exc:
            raise store_error(exc, f"the job store (Redis at {self.where})") from None

    def _run(self, name: str, *args: Any, now: float | None = None) -> Any:
        argv = [self.prefix, self._origin, "" if now is None else repr(now), *args]
        with self._errors():
            try:
                return self._scripts[name](args=argv)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The group is gone (a Redis that lost its data, or a first start while it was down).
                self._ensure_group()
                return self._scripts[name](args=argv)

    def _ensure_group(self) -> None:
        with self._errors():
            try:
                self.redis.xgroup_create(self._key("stream"), GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _check_config(self) -> None:
        """Warn about a Redis that can lose or evict accepted jobs (managed Redis may refuse CONFIG)."""
        with contextlib.suppress(RedisError):
            config = self.redis.config_get("appendonly")
            if config.get(b"appendonly", config.get("appendonly")) in (b"no", "no"):
                log.warning("Redis at %s runs without its append-only file: a restart loses jobs", self.where)
            config = self.redis.config_get("maxmemory-policy")
            policy = config.get(b"maxmemory-policy", config.get("maxmemory-policy"))
            if policy not in (None, b"noeviction", "noeviction"):
                log.warning("Redis at %s may evict jobs (maxmemory-policy %s; use noeviction)", self.where, policy)

    @staticmethod
    def _job(fields: dict[bytes, bytes]) -> Job | None:
        """A job from its hash as HGETALL reads it (bytes names and values)."""
        return job_from_fields({name.decode(): value for name, value in fields.items()})

    @staticmethod
    def _unexpired(job: Job | None) -> Job | None:
        return None if job is None or expired(job.expires_at, time.time()) else job

    def _jobs(self, ids: list[bytes]) -> list[Job | None]:
        with self._errors():
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self._key("job", job_id.decode()))
            return [self._job(fields) for fields in pipe.execute()]

    # -- the pub/sub listener ---------------------------------------------------------------------

    def _listen(self) -> None:
        """One thread per store: Redis's messages become this node's JobEvents. Reconnects with backoff;
        after a reconnection the supervisor is woken, since a message may have been missed meanwhile."""
        channel = self._key("events")
        client = connect(
            self.url,
            self.tls,
            socket_connect_timeout=2.0,
            health_check_interval=10,
            retry=Retry(ExponentialBackoff(), 0),
        )
        delay, lost = LISTENER_BACKOFF[0], False
        nudge_every = max(1.0, self.reclaim_after / 2)
        next_nudge = time.monotonic() + nudge_every
        while not self._stop.is_set():
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(channel)
                pubsub.get_message(timeout=5.0)  # the subscription's confirmation: listening from here
                self._listening.set()
                if lost:
                    log.info("the job store's events are back (Redis at %s)", self.where)
                    self.events.work_available()
                lost, delay = False, LISTENER_BACKOFF[0]
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message["data"])
                    if time.monotonic() >= next_nudge:
                        # Entries whose worker died are reclaimed by a claim: wake the supervisors now and then.
                        next_nudge = time.monotonic() + nudge_every
                        self.events.work_available()
            except RedisError as exc:
                if not lost:
                    log.warning("lost the job store's events (Redis at %s): %s", self.where, type(exc).__name__)
                lost = True
                self._stop.wait(delay)
                delay = min(delay * 2, LISTENER_BACKOFF[1])
            except Exception:  # a bug in a callback must not end the listener
                log.exception("job store event listener error")
                self._stop.wait(delay)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
        client.close()

    def _deliver(self, data: bytes) -> None:
        origin, _, rest = data.decode(errors="replace").partition(" ")
        if origin == self._origin:
            return  # this instance already told its own events
        kind, _, job_id = rest.partition(" ")
        if kind == "w":
            self.events.work_available()
        elif kind in ("j", "r") and job_id:
            self.events.job_changed(job_id, running=kind == "r")

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(RedisError):  # wakes the listener (its own origin: nothing delivered)
                self.redis.publish(self._key("events"), f"{self._origin} stop")
            self._listener.join(5)
        self.redis.close()

    # -- submission -------------------------------------------------------------------------------

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
    ) -> Job:
        """Queue a job, charge its owner's account and check the queue bound, in one script: concurrent
        submissions on any number of nodes can neither overdraw an account nor overfill the queue."""
        job_id = uuid.uuid4().hex
        fields = submitted_fields(
            job_id,
            params,
            source,
            base64=base64,
            owner=owner,
            cost=cost,
            input_ready=image is not None,
            delivery=delivery or Delivery(),
        )
        pairs = [value for pair in fields.items() for value in pair]
        answer = self._run("create", job_id, "" if max_queued is None else max_queued, image or b"", *pairs)
        if answer[0] == b"exists":  # a retry of a create whose answer was lost: the job is there once
            existing = self.get(job_id)
            assert existing is not None
            return existing
        if answer[0] == b"full":
            raise QueueFull()
        if answer[0] == b"balance":
            raise InsufficientBalance(int(answer[1]), cost)
        job = job_from_fields(_pairs(answer[1]))
        assert job is not None
        self.events.job_changed(job.id)
        if job.input_ready:
            self.events.work_available()
        return job

    def open_account(self, owner: str, granted: int) -> None:
        """A metered key's account. A new one starts at `granted`; an existing one keeps its balance
        across restarts and moves by the change in the grant, so raising a key's credits tops it up."""
        self._run("open_account", owner, granted)

    def balance(self, owner: str) -> int | None:
        with self._errors():
            value = self.redis.hget(self._key("credits"), owner)
        return None if value is None else int(value)

    # -- the read side ----------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self._errors():
            fields = self.redis.hgetall(self._key("job", job_id))
        return self._unexpired(self._job(fields))

    def state(self, job_id: str) -> JobState | None:
        with self._errors():
            values = self.redis.hmget(self._key("job", job_id), STATE_FIELDS)
        state = state_from_fields(dict(zip(STATE_FIELDS, values, strict=True)))
        return None if state is None or expired(state.expires_at, time.time()) else state

    def queue_position(self, seq: int) -> int:
        with self._errors():
            return int(self.redis.zcount(self._key("queued"), "-inf", f"({seq}"))

    def webhook_jobs(self) -> list[Job]:
        """Unexpired jobs with a webhook_url in their delivery, oldest first: the start-up scan of the
        webhook service (once per node start, so a SCAN of the job keys is affordable)."""
        pattern = self._key("job", "*")
        with self._errors():
            ids = [key[len(pattern) - 1 :] for key in self.redis.scan_iter(match=pattern, count=1000)]
        jobs = [self._unexpired(job) for job in self._jobs(ids)]
        return sorted((j for j in jobs if j is not None and j.delivery.webhook_url), key=lambda j: j.seq)

    def list_jobs(
        self, owner: str | None, *, status: JobStatus | None = None, limit: int = 20, before: int | None = None
    ) -> list[Job]:
        """The owner's jobs (None: those submitted without a key), newest first, below seq `before`."""
        key = self._owner_key(owner)
        found: list[Job] = []
        top = "+inf" if before is None else f"({before}"
        chunk = max(limit, 50)
        while len(found) < limit:
            with self._errors():
                members = self.redis.zrevrangebyscore(key, top, "-inf", start=0, num=chunk, withscores=True)
            if not members:
                break
            jobs = self._jobs([member for member, _ in members])
            gone = [member for (member, _), job in zip(members, jobs, strict=True) if job is None]
            if gone:  # expired by its TTL: its index entry goes too
                with self._errors():
                    self.redis.zrem(key, *gone)
            for job in jobs:
                job = self._unexpired(job)
                if job is not None and job.owner == owner and (status is None or job.status == status):
                    found.append(job)
            if len(members) < chunk:
                break
            top = f"({int(members[-1][1])}"
        return found[:limit]

    def queued_count(self) -> int:
        with self._errors():
            return int(self.redis.zcard(self._key("queued")))

    def stream_stats(self) -> StreamStats:
        stream = self._key("stream")
        with self._errors():
            pipe = self.redis.pipeline(transaction=False)
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            pipe.zrange(self._key("queued"), 0, 0)
            pipe.time()
            length, groups, oldest, (seconds, micros) = pipe.execute()
            created = self.redis.hget(self._key("job", oldest[0].decode()), "created_at") if oldest else None
        group = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), {})
        age = max(0.0, seconds + micros / 1e6 - float(created)) if created is not None else 0.0
        return StreamStats(int(length), int(group.get("pending", 0)), group.get("lag"), age)

    def read_file(self, job_id: str, name: str) -> bytes:
        with self._errors():
            data = self.redis.hget(self._key("files", job_id), name)
        if data is None:
            raise FileGone(name)
        return data

    def has_file(self, job_id: str, name: str) -> bool:
        with self._errors():
            return bool(self.redis.hexists(self._key("files", job_id), name))

    def put_file(self, job_id: str, name: str, data: bytes) -> None:
        """A file beside a live job (its preview); nothing when the job is gone."""
        self._run("put_file", job_id, name, data)

    def health(self) -> str | None:
        """None when the store works; else what is wrong, in words for /health. Never raises."""
        try:
            with self._errors():
                memory = self.redis.info("memory")
            if 0 < int(memory.get("maxmemory", 0)) <= int(memory.get("used_memory", 0)):
                return f"the job store (Redis at {self.where}) is out of memory"
        except (StoreUnavailable, DiskFull) as exc:
            return str(exc)
        except Exception as exc:  # health must answer whatever happens
            return f"the job store (Redis at {self.where}) failed: {type(exc).__name__}"
        return None

    # -- the input stage ---------------------------------------------------------------------------

    def awaiting_input(self) -> list[Job]:
        with self._errors():
            ids = self.redis.zrange(self._key("awaiting"), 0, -1)
        jobs = self._jobs(ids)
        return [j for j in jobs if j is not None and j.status == JobStatus.QUEUED and not j.input_ready]

    def lease_input(self, job_id: str) -> bool:
        """This node is to fetch the job's input now: True while the job waits for its input and no other
        node holds its fetch. The lease lasts reclaim_after; asking again holds it longer. A node restarted
        under the same consumer name holds its previous life's leases: it fetches again at once."""
        return bool(self._run("lease_input", job_id, self.consumer, int(self.reclaim_after * 1000)))

    def attach_input(self, job_id: str, image: bytes) -> bool:
        """The fetched input of a URL job: it enters the stream. False if the job ended meanwhile."""
        ready = bool(self._run("attach", job_id, image))
        if ready:
            self.events.job_changed(job_id)
            self.events.work_available()
        return ready

    # -- the worker side ---------------------------------------------------------------------------

    def claim_next(self) -> Job | None:
        fields = self._run("claim", self.consumer, int(self.reclaim_after * 1000), self.ttl)
        if not fields:
            return None
        job = job_from_fields(_pairs(fields))
        if job is not None:
            self.events.job_changed(job.id, running=True)
        return job

    def mark_started(self, job_id: str, attempt: int) -> bool:
        return self._touch(job_id, attempt, "", started=True)

    def set_progress(self, job_id: str, attempt: int, progress: float) -> bool:
        return self._touch(job_id, attempt, repr(float(progress)), started=False)

    def _touch(self, job_id: str, attempt: int, progress: str, started: bool) -> bool:
        """A running attempt's write, which also shows its worker is alive; True when its worker should stop
        (cancellation asked for on any node, or this attempt no longer the job's)."""
        cancel = bool(self._run("touch", job_id, attempt, self.consumer, progress, int(started)))
        self.events.job_changed(job_id, running=not cancel)
        return cancel

    def _finish(
        self, script: str, job_id: str, status: JobStatus, attempt: int | None, fields: dict[str, Any],
        files: dict[str, bytes] | None = None,
    ) -> bool:  # fmt: skip
        args: list[Any] = [job_id, status.value, "" if attempt is None else attempt, self.ttl, len(fields)]
        for name, value in fields.items():
            args += [name, value]
        for name, data in (files or {}).items():
            args += [name, data]
        answer = self._run(script, *args)
        # The job as it ended, for this process's waiters: a v1 waiter here needs no read of its own.
        job = job_from_fields(_pairs(answer)) if answer else None
        self.events.job_changed(job_id, job)
        return job is not None

    def complete(self, job_id: str, attempt: int, result: JobResult, files: dict[str, bytes]) -> bool:
        """The result and its files, stored together and only for the job's current attempt."""
        try:
            fields = {"result": encode_result(result), "progress": 1}
            return self._finish("complete", job_id, JobStatus.COMPLETED, attempt, fields, files)
        except DiskFull:
            self.fail(
                job_id, "the job store's memory is full; the images could not be kept", FailureKind.ENGINE, attempt
            )
            raise

    def fail(self, job_id: str, error: str, kind: FailureKind, attempt: int | None = None) -> bool:
        return self._finish("fail", job_id, JobStatus.FAILED, attempt, {"error": error, "error_kind": kind.value})

    def release(self, job_id: str, reason: str, attempt: int) -> JobStatus:
        """A job's worker died under it: queue it again at its old place, or fail it for good. Only while
        `attempt` holds it: else (ended, or taken over by another node) nothing changes."""
        status = JobStatus(self._run("release", job_id, reason, self.ttl, attempt).decode())
        self.events.job_changed(job_id)
        if status == JobStatus.QUEUED:
            self.events.work_available()
        return status

    def hand_back(self, job_id: str, attempt: int) -> bool:
        """A job this node holds (waiting or running) goes back as if never claimed: its claim's attempt taken
        back, at its old place, for the next claim on any node at once. False when the attempt no longer holds
        it (ended, or taken over), or it is being cancelled."""
        handed = bool(self._run("hand_back", job_id, attempt))
        if handed:
            self.events.job_changed(job_id)
            self.events.work_available()
        return handed

    def leave(self) -> None:
        """This node takes no more jobs (its worker stops, after giving back what it held): the consumer group
        forgets its consumer now if it holds no pending entry. One that still does (a job given back, not yet
        claimed elsewhere) is forgotten by the sweep of `purge_expired` once another node took it."""
        self._run("forget_readers", self.consumer, "")

    def keep_alive(self, held: Mapping[str, int]) -> set[str]:
        if not held:
            return set()
        pairs = [value for job_id, attempt in held.items() for value in (job_id, attempt)]
        return {job_id.decode() for job_id in self._run("keep_alive", self.consumer, *pairs)}

    def processing(self) -> list[Job]:
        """The jobs this node (its consumer name) was running: each node releases its own at start;
        another node's dead jobs are reclaimed after `reclaim_after`."""
        with self._errors():
            ids = self.redis.zrange(self._key("processing"), 0, -1)
        jobs = self._jobs(ids)
        return [j for j in jobs if j is not None and j.status == JobStatus.PROCESSING and self._runs_here(j.id)]

    def _runs_here(self, job_id: str) -> bool:
        with self._errors():
            return self.redis.hget(self._key("job", job_id), "consumer") == self.consumer.encode()

    # -- both sides --------------------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> Job | None:
        fields = self._run("cancel", job_id, self.ttl)
        self.events.job_changed(job_id)
        return self._unexpired(job_from_fields(_pairs(fields)))

    def purge_expired(self, now: float | None = None) -> int:
        removed = 0
        while True:
            count = int(self._run("purge", 500, now=now))
            removed += count
            if count < 500:
                break
        # The consumers of workers gone (stopped, or dead with their jobs reclaimed since) hold nothing: they
        # go too, so the group lists the workers that read it, not every worker that ever did.
        self._run("forget_readers", "", int(self.reclaim_after * 1000))
        return removed
