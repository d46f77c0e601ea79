"""The Redis store's Lua scripts: the job lifecycle of server/jobs/lifecycle.py, on Redis.

Each store operation that writes is one script, run with one EVALSHA: Redis runs a script whole, with
no other command between its own, so a job is never half-written and the queue bound, the charge and
refund, and the fencing by attempt hold across any number of nodes. server/jobs/redis_store.py says
which keys they use.

The scripts name no status, failure kind or lifecycle constant themselves: `HEADER` declares them as
Lua locals, written once at import from the contract (QUEUED, ..., KIND_CANCELLED, ..., MAX_ATTEMPTS,
INPUT_NAME), so a script and the SQLite store cannot disagree on them.

One cohesive thing past 450 lines: the store's scripts, each one write, all on one prelude (the lifecycle's
constants and the helpers every move shares: finish, requeue); split, each part would import that same
prelude and feed the store's one SCRIPTS table.
"""

from __future__ import annotations

import re

from server.jobs.contract import INPUT_NAME, FailureKind, JobStatus
from server.jobs.lifecycle import CANCELLED_ERROR, GAVE_UP, MAX_ATTEMPTS

GROUP = "workers"  # the stream's consumer group: every node reads the stream in it
DIED = "the worker process died or stopped answering"  # a reclaimed job's reason (no supervisor saw it die)
# A released entry is given this idle time, so the next claim reclaims it at once, ahead of new jobs.
RELEASED_IDLE_MS = 10**11

CONSTANTS: dict[str, str | int] = {
    **{status.name: status.value for status in JobStatus},
    **{f"KIND_{kind.name}": kind.value for kind in FailureKind},
    "MAX_ATTEMPTS": MAX_ATTEMPTS,
    "CANCELLED_ERROR": CANCELLED_ERROR,
    "INPUT_NAME": INPUT_NAME,
    "GAVE_UP": GAVE_UP,
    "DIED": DIED,
    "GROUP": GROUP,
    "RELEASED_IDLE_MS": str(RELEASED_IDLE_MS),  # a string: Lua would write the number as 1e+11
}


def _lua(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    if not re.fullmatch(r"[\w .,;:()%-]*", value):  # plain text only: nothing to escape
        raise ValueError(f"not a plain Lua string: {value!r}")
    return f"'{value}'"


HEADER = "".join(f"local {name} = {_lua(value)}\n" for name, value in CONSTANTS.items())

# Every script starts with this: its first three ARGV are the key prefix, the caller's origin id and the
# time ("" = Redis's own clock, the one clock all nodes share).
PRELUDE = """
local P, ORIGIN = ARGV[1], ARGV[2]
local NOW = tonumber(ARGV[3])
if NOW == nil then
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local STREAM = P .. 'stream'
local function jobkey(id) return P .. 'job:' .. id end
local function fileskey(id) return P .. 'files:' .. id end
local function ownerkey(owner) if owner then return P .. 'owner:=' .. owner end return P .. 'owner:-' end
local function stamp(x) return string.format('%.6f', x) end
local function notify(id) redis.call('PUBLISH', P .. 'events', ORIGIN .. ' j ' .. id) end
-- A running job was claimed, started or moved on: nothing that may have ended it.
local function notify_running(id) redis.call('PUBLISH', P .. 'events', ORIGIN .. ' r ' .. id) end
local function notify_work() redis.call('PUBLISH', P .. 'events', ORIGIN .. ' w') end
local function drop_entry(id)
  local entry = redis.call('HGET', jobkey(id), 'entry')
  if entry then
    redis.call('XACK', STREAM, GROUP, entry)
    redis.call('XDEL', STREAM, entry)
    redis.call('HDEL', jobkey(id), 'entry')
  end
end
-- A live job ends: its entry leaves the stream, it leaves the live indexes, its retention starts (it
-- expires after ttl) and, when it FAILED, its charge goes back to its owner. Every way a job ends passes
-- here, once.
local function finish(id, status, ttl, fields)
  local k = jobkey(id)
  local expires = NOW + ttl
  redis.call('HSET', k, 'status', status, 'finished_at', stamp(NOW), 'expires_at', stamp(expires), unpack(fields))
  drop_entry(id)
  redis.call('ZREM', P .. 'queued', id)
  redis.call('ZREM', P .. 'awaiting', id)
  redis.call('ZREM', P .. 'processing', id)
  local owner = redis.call('HGET', k, 'owner')
  redis.call('ZADD', P .. 'expiry', expires, id .. ' ' .. ownerkey(owner))
  local at = string.format('%d', math.floor(expires * 1000))
  redis.call('PEXPIREAT', k, at)
  redis.call('PEXPIREAT', fileskey(id), at)
  if status == FAILED then
    local cost = tonumber(redis.call('HGET', k, 'cost') or '0')
    if cost > 0 and owner and redis.call('HEXISTS', P .. 'credits', owner) == 1 then
      redis.call('HINCRBY', P .. 'credits', owner, cost)
    end
  end
  notify(id)
end
local function cancelled(id, ttl)
  finish(id, FAILED, ttl, {'error', CANCELLED_ERROR, 'error_kind', KIND_CANCELLED})
end
-- Its worker died on its last attempt: the job is given up on.
local function gave_up(id, ttl, reason, attempts)
  finish(id, FAILED, ttl, {'error', string.format(GAVE_UP, reason, attempts), 'error_kind', KIND_WORKER_DIED})
end
local function live(status) return status == QUEUED or status == PROCESSING end
-- The lifecycle's worker death of a PROCESSING job, its ending rows: one being cancelled ends cancelled, one on
-- its last attempt fails for good. True when the job ended here; else it is the caller's to queue or take again.
local function ended_by_death(id, ttl, reason, attempts)
  if redis.call('HGET', jobkey(id), 'cancel_requested') == '1' then
    cancelled(id, ttl)
    return true
  end
  if attempts >= MAX_ATTEMPTS then
    gave_up(id, ttl, reason, attempts)
    return true
  end
  return false
end
-- A PROCESSING job is queued again at its old place: its entry, still pending, is made idle for long, so the
-- next claim on any node takes it at once, ahead of the entries never delivered (the jobs submitted after it).
local function requeue(id)
  local k = jobkey(id)
  redis.call('HSET', k, 'status', QUEUED, 'progress', 0)
  redis.call('HDEL', k, 'started_at', 'consumer')
  redis.call('ZREM', P .. 'processing', id)
  redis.call('ZADD', P .. 'queued', redis.call('HGET', k, 'seq'), id)
  local entry = redis.call('HGET', k, 'entry')
  local pending = entry and redis.call('XPENDING', STREAM, GROUP, entry, entry, 1)[1]
  if pending then
    redis.call('XCLAIM', STREAM, GROUP, pending[2], 0, entry, 'IDLE', RELEASED_IDLE_MS, 'JUSTID')
  else
    -- Its entry was lost (a Redis that lost data): it queues again as a new entry.
    if entry then redis.call('XDEL', STREAM, entry) end
    redis.call('HSET', k, 'entry', redis.call('XADD', STREAM, '*', 'job', id))
  end
  notify(id)
  notify_work()
end
"""


def script(body: str, *, allow_oom: bool = False) -> str:
    """A whole script: the constants, the prelude, then its body. With allow_oom it runs even when Redis's
    memory is full (what only removes or flags, so that a job can always be failed or cancelled)."""
    return ("#!lua flags=allow-oom\n" if allow_oom else "") + HEADER + PRELUDE + body


# ARGV[4..]: id, max_queued ("" = none), image ("" = a URL job's, fetched later), then the job's fields as
# name/value pairs (codec.job_fields of the job as submitted): its seq, creation time and cost are set here.
CREATE = script("""
local id, max_queued, image = ARGV[4], ARGV[5], ARGV[6]
local k = jobkey(id)
if redis.call('EXISTS', k) == 1 then return {'exists'} end
if max_queued ~= '' and redis.call('ZCARD', P .. 'queued') >= tonumber(max_queued) then return {'full'} end
local fields = {}
for i = 7, #ARGV, 2 do fields[ARGV[i]] = ARGV[i + 1] end
local owner, cost, ready = fields['owner'] or false, tonumber(fields['cost'] or '0'), fields['input_ready'] == '1'
if owner and cost > 0 then
  local balance = redis.call('HGET', P .. 'credits', owner)
  if not balance then
    cost = 0
  elseif tonumber(balance) < cost then
    return {'balance', balance}
  else
    redis.call('HINCRBY', P .. 'credits', owner, -cost)
  end
else
  cost = 0
end
local seq = redis.call('INCR', P .. 'seq')
redis.call('HSET', k, unpack(ARGV, 7, #ARGV))
redis.call('HSET', k, 'seq', seq, 'created_at', stamp(NOW), 'cost', cost)
redis.call('ZADD', P .. 'queued', seq, id)
redis.call('ZADD', ownerkey(owner), seq, id)
if ready then
  redis.call('HSET', fileskey(id), INPUT_NAME, image)
  redis.call('HSET', k, 'entry', redis.call('XADD', STREAM, '*', 'job', id))
  notify_work()
else
  redis.call('ZADD', P .. 'awaiting', seq, id)
end
notify(id)
return {'ok', redis.call('HGETALL', k)}
""")

# ARGV[4..]: id, image. 1 when the job is (now) ready to run, 0 when it ended meanwhile.
ATTACH = script("""
local id, image = ARGV[4], ARGV[5]
local k = jobkey(id)
if redis.call('HGET', k, 'status') ~= QUEUED then return 0 end
if redis.call('HGET', k, 'input_ready') == '1' then return 1 end
redis.call('HSET', fileskey(id), INPUT_NAME, image)
redis.call('HSET', k, 'input_ready', 1)
redis.call('ZREM', P .. 'awaiting', id)
redis.call('DEL', P .. 'fetch:' .. id)
redis.call('HSET', k, 'entry', redis.call('XADD', STREAM, '*', 'job', id))
notify(id)
notify_work()
return 1
""")

# ARGV[4..]: id, holder (a node's consumer name), lease ms. 1 when the holder is to fetch the job's input now
# (its lease is taken, or held longer); 0 when the job no longer waits for its input or another node holds
# the lease. A lease not held longer (its node died) runs out, and another node takes the fetch over.
LEASE_INPUT = script("""
local id, holder, ms = ARGV[4], ARGV[5], ARGV[6]
local k = jobkey(id)
if redis.call('HGET', k, 'status') ~= QUEUED or redis.call('HGET', k, 'input_ready') == '1' then return 0 end
local lease = P .. 'fetch:' .. id
local current = redis.call('GET', lease)
if current and current ~= holder then return 0 end
redis.call('SET', lease, holder, 'PX', ms)
return 1
""")

# ARGV[4..]: consumer, min idle ms, ttl. Takes one job: first an entry idle that long (its worker died, or
# the job was released), else the next new entry. Returns the job's fields, or nil.
CLAIM = script("""
local consumer, min_idle, ttl = ARGV[4], ARGV[5], tonumber(ARGV[6])
local function take(entry, id, reclaimed)
  local k = jobkey(id)
  local status = redis.call('HGET', k, 'status')
  if not live(status) or (status == PROCESSING and not reclaimed) then
    -- Ended (or gone) while its entry waited: the entry has nothing left to deliver.
    redis.call('XACK', STREAM, GROUP, entry)
    redis.call('XDEL', STREAM, entry)
    return nil
  end
  local attempts = tonumber(redis.call('HGET', k, 'attempts'))
  -- Its worker stopped answering while running it: the lifecycle's worker death, seen by this claim.
  if status == PROCESSING and ended_by_death(id, ttl, DIED, attempts) then return nil end
  redis.call('HSET', k, 'status', PROCESSING, 'attempts', attempts + 1, 'progress', 0, 'consumer', consumer,
    'entry', entry)
  redis.call('HDEL', k, 'started_at')
  -- It stays in `queued` until its worker starts it: handed to a worker ahead of its turn, it still waits.
  redis.call('ZADD', P .. 'processing', redis.call('HGET', k, 'seq'), id)
  notify_running(id)
  return redis.call('HGETALL', k)
end
local cursor = '0-0'
repeat
  local found = redis.call('XAUTOCLAIM', STREAM, GROUP, consumer, min_idle, cursor, 'COUNT', 1)
  cursor = found[1]
  for _, item in ipairs(found[2]) do
    if item[2] then
      local job = take(item[1], item[2][2], true)
      if job then return job end
    end
  end
until cursor == '0-0'
while true do
  local read = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', 1, 'STREAMS', STREAM, '>')
  if not read then return nil end
  local item = read[1][2][1]
  local job = take(item[1], item[2][2], false)
  if job then return job end
end
""")

# ARGV[4..]: id, attempt, consumer, progress ("" = leave it), started ("1" = record started_at).
# Fenced by attempt; the job's stream entry is made fresh (its worker is alive). Returns the cancel flag,
# 1 also when this attempt is no longer the job's (its worker should stop).
TOUCH = script(
    """
local id, attempt, consumer, progress, started = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8] == '1'
local k = jobkey(id)
if redis.call('HGET', k, 'status') ~= PROCESSING or redis.call('HGET', k, 'attempts') ~= attempt then return 1 end
if progress ~= '' then redis.call('HSET', k, 'progress', progress) end
if started then
  redis.call('HSET', k, 'started_at', stamp(NOW))
  redis.call('ZREM', P .. 'queued', id)
end
local entry = redis.call('HGET', k, 'entry')
if entry then redis.call('XCLAIM', STREAM, GROUP, consumer, 0, entry, 'JUSTID') end
notify_running(id)
if redis.call('HGET', k, 'cancel_requested') == '1' then return 1 end
return 0
""",
    allow_oom=True,
)

# ARGV[4..]: id, status, attempt ("" = any), ttl, the number of fields, then name/value pairs (fields,
# then files). Returns the job's fields as it ended, or 0 when it had ended already (or is not this
# attempt's). FAIL may run when memory is full, so a job can always be failed; COMPLETE (with files) not.
FINISH = """
local id, status, attempt, ttl, nfields = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local k = jobkey(id)
local current = redis.call('HGET', k, 'status')
if not live(current) then return 0 end
-- A worker's write (with its attempt) ends only the job that attempt runs; the server's own any live job.
if attempt ~= '' and (current ~= PROCESSING or redis.call('HGET', k, 'attempts') ~= attempt) then return 0 end
local fields = {}
for i = 9, 8 + 2 * nfields do fields[#fields + 1] = ARGV[i] end
for i = 9 + 2 * nfields, #ARGV, 2 do redis.call('HSET', fileskey(id), ARGV[i], ARGV[i + 1]) end
finish(id, status, ttl, fields)
return redis.call('HGETALL', k)
"""
FAIL = script(FINISH, allow_oom=True)
COMPLETE = script(FINISH)

# ARGV[4..]: id, reason, ttl, attempt. A job's worker died under it: it is queued again at its old place, or
# fails for good; only while that attempt holds it. Returns the job's status afterwards.
RELEASE = script(
    """
local id, reason, ttl, attempt = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
local k = jobkey(id)
local status = redis.call('HGET', k, 'status')
if not status then return FAILED end
-- Another attempt's (taken over by another node while this worker was silent): not this worker's to give back.
if status ~= PROCESSING or redis.call('HGET', k, 'attempts') ~= attempt then return status end
if ended_by_death(id, ttl, reason, tonumber(attempt)) then return FAILED end
requeue(id)
return QUEUED
""",
    allow_oom=True,
)

# ARGV[4..]: id, attempt. A worker that stops gracefully gives back a job it holds (waiting or running): queued
# again at its old place with its claim's attempt taken back. 1 when handed back; 0 when the job is not this
# attempt's (taken over, ended) or is being cancelled: nothing changes.
HAND_BACK = script(
    """
local id, attempt = ARGV[4], ARGV[5]
local k = jobkey(id)
local job = redis.call('HMGET', k, 'status', 'attempts', 'cancel_requested')
if job[1] ~= PROCESSING or job[2] ~= attempt or job[3] == '1' then return 0 end
redis.call('HSET', k, 'attempts', tonumber(attempt) - 1)
requeue(id)
return 1
""",
    allow_oom=True,
)

# ARGV[4..]: consumer, then id/attempt pairs: the jobs a live worker holds. Their entries are made fresh;
# returns the ids that attempt no longer holds (reclaimed by another node, or ended).
KEEP_ALIVE = script(
    """
local consumer, lost = ARGV[4], {}
for i = 5, #ARGV, 2 do
  local id, attempt = ARGV[i], ARGV[i + 1]
  local job = redis.call('HMGET', jobkey(id), 'status', 'attempts', 'entry')
  if job[1] == PROCESSING and job[2] == attempt and job[3] then
    redis.call('XCLAIM', STREAM, GROUP, consumer, 0, job[3], 'JUSTID')
  else
    lost[#lost + 1] = id
  end
end
return lost
""",
    allow_oom=True,
)

# ARGV[4..]: id, ttl. A job not started yet ends at once; a running one is flagged for its worker.
# Returns the job's fields afterwards.
CANCEL = script(
    """
local id, ttl = ARGV[4], tonumber(ARGV[5])
local k = jobkey(id)
local status = redis.call('HGET', k, 'status')
if live(status) then
  redis.call('HSET', k, 'cancel_requested', 1)
  -- Not started (queued, or waiting in a worker): it ends here; a running one stops at its next step.
  if status == QUEUED or not redis.call('HGET', k, 'started_at') then
    cancelled(id, ttl)
  else
    notify(id)
  end
end
return redis.call('HGETALL', k)
""",
    allow_oom=True,
)

# ARGV[4..]: id, name, data. Only beside a job that exists; expires with it.
PUT_FILE = script("""
local id, name, data = ARGV[4], ARGV[5], ARGV[6]
if redis.call('EXISTS', jobkey(id)) == 0 then return 0 end
redis.call('HSET', fileskey(id), name, data)
local left = redis.call('PTTL', jobkey(id))
if left > 0 then redis.call('PEXPIRE', fileskey(id), left) end
return 1
""")

# ARGV[4..]: owner, granted units.
OPEN_ACCOUNT = script("""
local owner, granted = ARGV[4], tonumber(ARGV[5])
local before = redis.call('HGET', P .. 'granted', owner)
if redis.call('HEXISTS', P .. 'credits', owner) == 1 then
  if before then redis.call('HINCRBY', P .. 'credits', owner, granted - tonumber(before)) end
else
  redis.call('HSET', P .. 'credits', owner, granted)
end
redis.call('HSET', P .. 'granted', owner, granted)
return 1
""")

# ARGV[4..]: batch size. Removes jobs whose retention is over (their Redis TTL has mostly done it) and
# their index entries.
PURGE = script(
    """
local batch = tonumber(ARGV[4])
local members = redis.call('ZRANGEBYSCORE', P .. 'expiry', '-inf', NOW, 'LIMIT', 0, batch)
for _, member in ipairs(members) do
  local space = string.find(member, ' ', 1, true)
  local id, owner_key = string.sub(member, 1, space - 1), string.sub(member, space + 1)
  redis.call('DEL', jobkey(id), fileskey(id))
  redis.call('ZREM', owner_key, id)
  redis.call('ZREM', P .. 'expiry', member)
end
return #members
""",
    allow_oom=True,
)

# ARGV[4..]: this node's consumer name ("" = none), min idle ms ("" = none). The consumer group forgets readers
# that hold nothing: this node's own (it stops) at once, any other once it was handed no entry for min idle ms
# (its worker is gone, or idle for that long: Redis makes its consumer again with the next entry it takes). Only
# one without a pending entry, checked in this script: no entry can be delivered to it between the check and the
# deletion, so no job is lost with it (deleting a consumer drops its pending entries). Returns how many went.
FORGET_READERS = script(
    """
local own, min_idle = ARGV[4], tonumber(ARGV[5])
local forgotten = 0
if redis.call('EXISTS', STREAM) == 0 then return 0 end
for _, reader in ipairs(redis.call('XINFO', 'CONSUMERS', STREAM, GROUP)) do
  local info = {}
  for i = 1, #reader, 2 do info[reader[i]] = reader[i + 1] end
  if info['pending'] == 0 and (info['name'] == own or (min_idle and info['idle'] >= min_idle)) then
    redis.call('XGROUP', 'DELCONSUMER', STREAM, GROUP, info['name'])
    forgotten = forgotten + 1
  end
end
return forgotten
""",
    allow_oom=True,
)

# By the name the store runs each by.
SCRIPTS = {
    "create": CREATE,
    "attach": ATTACH,
    "lease_input": LEASE_INPUT,
    "claim": CLAIM,
    "touch": TOUCH,
    "keep_alive": KEEP_ALIVE,
    "complete": COMPLETE,
    "fail": FAIL,
    "release": RELEASE,
    "hand_back": HAND_BACK,
    "forget_readers": FORGET_READERS,
    "cancel": CANCEL,
    "put_file": PUT_FILE,
    "open_account": OPEN_ACCOUNT,
    "purge": PURGE,
}
