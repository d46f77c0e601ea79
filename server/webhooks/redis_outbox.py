"""The outbox shared by a fleet: webhook deliveries in the job store's Redis, each sent by one node at a time.

Every API node runs a dispatcher on the same deliveries. A node holds a delivery with a lease: a script moves
it out of the others' reach for `lease` seconds and names the node its holder; the node renews the lease
while it sends, and records the outcome, which a node no longer holding it cannot overwrite (a success is
always kept). The node that queues a delivery holds it from the start and sends it first; a retry that falls
due goes to whichever node looks first. A node that dies mid-send stops renewing, and the next node to look
takes the delivery over when the lease runs out; a node stopped cleanly hands its leases back at once.

That is at least once across the fleet, as on one node: only a node that dies between the receiver's answer
and its record makes the receiver see a message twice, with the same `webhook-id` (receivers dedupe on it).

Enqueueing is once per job, whichever node tries, so any node may settle any job's end. Jobs with a webhook
that are still running are listed (`watch`), so that when their accepting node is gone another node finds
and settles them.

Key layout, under the job store's prefix (`beyond:` by default):
    webhooks:job:<id>   hash: url, msg_id, body, attempts, delivered, last_status, error, created_at, and
                        holder (the node that holds it); expires `keep` seconds after it was created once it
                        is delivered or given up, never while pending
    webhooks:due        zset of pending job ids by when they are next due; a held one by its lease's end
    webhooks:fresh:<node>  set of the deliveries the node queued and has not taken up yet (expires with the lease)
    webhooks:live       zset of job ids still running with a webhook, by when they were listed

Times inside are Redis's clock, the one every node shares; the caller's times (time.time()) are taken as
offsets from its own clock.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from typing import Any

import redis
from redis.exceptions import RedisError

from server.jobs.redis_connection import store_error
from server.webhooks.outbox import EnqueueListeners, PendingDelivery

# Every script starts with this: ARGV[1] is the key prefix, ARGV[2] an offset in seconds from Redis's clock
# to the caller's "now".
PRELUDE = """
local P = ARGV[1]
local t = redis.call('TIME')
local CLOCK = tonumber(t[1]) + tonumber(t[2]) / 1000000
local NOW = CLOCK + tonumber(ARGV[2])
local DUE, LIVE = P .. 'webhooks:due', P .. 'webhooks:live'
local function hookkey(id) return P .. 'webhooks:job:' .. id end
local function stamp(x) return string.format('%.6f', x) end
"""

# ARGV: prefix, offset, node, lease, job id, url, msg_id, body. 1 when stored (held by the node, for its
# next claim), 0 when the job already had a delivery.
ENQUEUE = """
local node, lease, id = ARGV[3], tonumber(ARGV[4]), ARGV[5]
redis.call('ZREM', LIVE, id)
local k = hookkey(id)
if redis.call('EXISTS', k) == 1 then return 0 end
redis.call('HSET', k, 'url', ARGV[6], 'msg_id', ARGV[7], 'body', ARGV[8], 'attempts', 0, 'delivered', 0,
           'created_at', stamp(NOW), 'holder', node)
redis.call('ZADD', DUE, CLOCK + lease, id)
local fresh = P .. 'webhooks:fresh:' .. node
redis.call('SADD', fresh, id)
redis.call('PEXPIRE', fresh, math.ceil(lease * 1000))
return 1
"""

# ARGV: prefix, offset, node, lease, limit, excluded ids... Takes up to `limit` deliveries for the node: those
# it queued itself, then due ones.
CLAIM = """
local node, lease, limit = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local excluded = {}
for i = 6, #ARGV do excluded[ARGV[i]] = true end
local taken = {}
local function take(id, f)
  redis.call('ZADD', DUE, CLOCK + lease, id)
  redis.call('HSET', hookkey(id), 'holder', node)
  taken[#taken + 1] = {id, f[1], f[2], f[3], f[4]}
end
local fields = {'url', 'msg_id', 'body', 'attempts', 'delivered', 'holder'}
for _, id in ipairs(redis.call('SPOP', P .. 'webhooks:fresh:' .. node, limit)) do
  local f = redis.call('HMGET', hookkey(id), unpack(fields))
  -- Still this node's (its lease may have run out and another node taken it) and not sent yet.
  if f[1] and f[5] ~= '1' and f[6] == node and not excluded[id] then take(id, f) end
end
local ids = redis.call('ZRANGEBYSCORE', DUE, '-inf', NOW, 'LIMIT', 0, limit + #ARGV - 5)
for _, id in ipairs(ids) do
  if #taken >= limit then break end
  if not excluded[id] then
    local f = redis.call('HMGET', hookkey(id), unpack(fields))
    if not f[1] or f[5] == '1' then
      redis.call('ZREM', DUE, id)  -- gone, or delivered by a node whose lease had run out
    else
      take(id, f)
    end
  end
end
return taken
"""

# ARGV: prefix, offset, node, lease, ids... Extends the node's leases; returns the ids it no longer holds.
RENEW = """
local node, lease = ARGV[3], tonumber(ARGV[4])
local lost = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', hookkey(id), 'holder') == node and redis.call('ZSCORE', DUE, id) then
    redis.call('ZADD', DUE, 'XX', CLOCK + lease, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
"""

# ARGV: prefix, offset, node, ids... The node's leases on these, handed back: due at once for any node.
RELEASE = """
local node = ARGV[3]
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', hookkey(id), 'holder') == node and redis.call('ZSCORE', DUE, id) then
    redis.call('ZADD', DUE, 'XX', CLOCK, id)
  end
end
return 0
"""

# ARGV: prefix, offset, node, id, ok, status, error, next_at offset ("" = no further attempt), keep.
RECORD = """
local node, id, ok, status, err, after, keep = ARGV[3], ARGV[4], ARGV[5] == '1', ARGV[6], ARGV[7], ARGV[8],
  tonumber(ARGV[9])
local k = hookkey(id)
local f = redis.call('HMGET', k, 'delivered', 'holder', 'created_at')
if not f[3] or f[1] == '1' then return 0 end  -- gone, or delivered already: a late answer changes nothing
if not ok and f[2] ~= node then return 0 end  -- another node took it over: its attempt is the one that counts
redis.call('HINCRBY', k, 'attempts', 1)
redis.call('HSET', k, 'delivered', ok and 1 or 0)
redis.call('HDEL', k, 'holder')
if status == '' then redis.call('HDEL', k, 'last_status') else redis.call('HSET', k, 'last_status', status) end
if ok or err == '' then redis.call('HDEL', k, 'error') else redis.call('HSET', k, 'error', err) end
if not ok and after ~= '' then
  redis.call('ZADD', DUE, CLOCK + tonumber(after), id)
else
  redis.call('ZREM', DUE, id)
  local left = tonumber(f[3]) + keep - CLOCK
  redis.call('PEXPIRE', k, math.max(1, math.floor(left * 1000)))
end
return 1
"""

# ARGV: prefix, offset, excluded ids... Seconds from now until the earliest pending delivery outside them.
NEXT = """
local excluded = {}
for i = 3, #ARGV do excluded[ARGV[i]] = true end
local entries = redis.call('ZRANGE', DUE, 0, #ARGV - 2, 'WITHSCORES')
for i = 1, #entries, 2 do
  if not excluded[entries[i]] then return tostring(tonumber(entries[i + 1]) - CLOCK) end
end
return false
"""

# ARGV: prefix, offset, job id. A live job is listed for any node to settle, unless it has its delivery.
WATCH = """
local id = ARGV[3]
if redis.call('EXISTS', hookkey(id)) == 0 then redis.call('ZADD', LIVE, 'NX', NOW, id) end
return 0
"""

STATUS_FIELDS = ("delivered", "attempts", "last_status", "error")


class RedisOutbox:
    """The deliveries of every node on one Redis (the job store's connection and key prefix).

    `lease`: how long a taken delivery stays this node's without a renewal; `poll`: how often the node looks
    at the shared deliveries on its own (another node's lease may have run out, or it enqueued and died).
    `keep`: seconds a finished delivery is kept after it was created (it must outlive its job).
    """

    def __init__(self, client: redis.Redis, *, prefix: str, where: str, lease: float, poll: float, keep: float) -> None:
        if lease <= 0 or poll <= 0 or keep <= 0:
            raise ValueError("webhook outbox: lease, poll and keep must be positive")
        self.redis = client
        self.prefix = prefix
        self.what = f"the webhook outbox (Redis at {where})"
        self.lease = lease
        self.poll = poll
        self.keep = keep
        self.node = uuid.uuid4().hex  # this process: a restarted node holds nothing of its previous life
        self._listeners = EnqueueListeners()
        self._scripts = {
            name: client.register_script(PRELUDE + source)
            for name, source in (
                ("enqueue", ENQUEUE),
                ("claim", CLAIM),
                ("renew", RENEW),
                ("release", RELEASE),
                ("record", RECORD),
                ("next", NEXT),
                ("watch", WATCH),
            )
        }

    def _key(self, *parts: str) -> str:
        return self.prefix + "webhooks:" + ":".join(parts)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except RedisError as exc:
            raise store_error(exc, self.what) from None

    def _run(self, name: str, *args: Any, at: float | None = None) -> Any:
        offset = 0.0 if at is None else at - time.time()
        with self._errors():
            return self._scripts[name](args=[self.prefix, repr(offset), *args])

    def close(self) -> None:
        """Nothing of its own to close: the connection is the job store's."""

    def add_listener(self, callback: Callable[[], None]) -> None:
        """`callback()` runs, in the enqueuing thread, after each new delivery this node stores."""
        self._listeners.add(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.remove(callback)

    def enqueue(
        self, job_id: str, url: str, body: bytes, now: float | None = None, *, msg_id: str | None = None
    ) -> bool:
        """Store a delivery, due at once and held by this node for its next `due`; False (and nothing changed)
        when the job already has one, from any node. `msg_id` is the `webhook-id` receivers dedupe on (default:
        a random one)."""
        body.decode("utf-8")  # signing works on text: refuse anything else here, not at each attempt
        msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
        stored = self._run("enqueue", self.node, repr(self.lease), job_id, url, msg_id, body, at=now)
        if not stored:
            return False
        self._listeners.notify()
        return True

    def due(self, now: float, limit: int, exclude: Collection[str] = ()) -> list[PendingDelivery]:
        """Take up to `limit` deliveries, leaving out `exclude` (in flight here): those this node queued, then
        due ones, the oldest first. Each is this node's for `lease` seconds, to renew while it is sent."""
        if limit <= 0:
            return []
        rows = self._run("claim", self.node, repr(self.lease), limit, *exclude, at=now)
        return [PendingDelivery(r[0].decode(), r[1].decode(), r[2].decode(), bytes(r[3]), int(r[4])) for r in rows]

    def next_due(self, exclude: Collection[str] = ()) -> float | None:
        """When the earliest pending attempt or lease end (outside `exclude`) is due; None when none is."""
        left = self._run("next", *exclude)
        return None if left is None else time.time() + float(left)

    def renew(self, job_ids: Collection[str]) -> set[str]:
        """Extend this node's leases on deliveries it is sending; the ids it no longer holds."""
        if not job_ids:
            return set()
        return {job_id.decode() for job_id in self._run("renew", self.node, repr(self.lease), *job_ids)}

    def release(self, job_ids: Collection[str]) -> None:
        """Hand back the leases of attempts cut off here (a stop), so another node sends them at once."""
        if job_ids:
            self._run("release", self.node, *job_ids)

    def record(self, job_id: str, ok: bool, status: int | None, error: str | None, next_at: float | None) -> None:
        """One attempt's outcome; `next_at` None means no further attempt (delivered, or given up). A failure
        is dropped when another node has taken the delivery over since; a success is always kept."""
        after = "" if next_at is None else repr(max(0.0, next_at - time.time()))
        self._run(
            "record", self.node, job_id, int(ok), "" if status is None else status, error or "", after, repr(self.keep)
        )

    def status(self, job_id: str) -> dict[str, Any] | None:
        with self._errors():
            values = self.redis.hmget(self._key("job", job_id), STATUS_FIELDS)
        delivered, attempts, last_status, error = values
        if attempts is None:
            return None
        return {
            "delivered": delivered == b"1",
            "attempts": int(attempts),
            "last_status": None if last_status is None else int(last_status),
            "error": None if error is None else error.decode(),
        }

    def purge(self, older_than: float) -> int:
        """Nothing to do: a finished delivery carries a Redis TTL."""
        return 0

    def watch(self, job_id: str) -> None:
        """A live job with a webhook: any node that finds it ended settles it (its accepting node may be gone)."""
        self._run("watch", job_id)

    def unwatch(self, job_id: str) -> None:
        with self._errors():
            self.redis.zrem(self._key("live"), job_id)

    def watched(self) -> list[str]:
        """The live jobs with a webhook and no delivery yet, as far as the fleet knows, the oldest first."""
        with self._errors():
            return [job_id.decode() for job_id in self.redis.zrange(self._key("live"), 0, -1)]
