"""Offline inboxes and device positions on Redis (the InboxStore port), through txredisapi.

Key layout (P = the prefix). Every key of one user carries the hash tag `{u<user_id>}`, so in
Redis Cluster a user's inbox lives in one slot. A batch append writes many users' inboxes in
one script call (one round trip per batch, not per entry); with `cluster=True` the users are
split by slot first, so no script ever spans two slots:

    P:inbox:{u<id>}:meta  hash  seq: the last cursor assigned; floor: the highest
                                cursor removed by retention. Never expires: cursors must not go
                                back even after the entries expired.
    P:inbox:{u<id>}:pos   hash  device id -> position. Never expires (as in the embedded store).
    P:inbox:{u<id>}:ent   zset  msg_id -> cursor. Cursor-ordered reads, and the (user, msg_id)
                                dedup of redelivered jobs, in one key.
    P:inbox:{u<id>}:age   zset  msg_id -> stored_ms (from the injected clock).
    P:inbox:{u<id>}:rec   hash  msg_id -> the message's stored record (improto.records:
                                a storage format byte, then the MESSAGE record; entries
                                written before formats were numbered hold a PUSH payload).

Scores are doubles, exact only up to 2**53: cursors (a per-user count) and milliseconds fit,
so they are scores; msg_ids and user ids (u64) are only ever members, fields or key names, and
the scripts never turn them into Lua numbers.

Retention is per entry, from its own stored_ms, exactly as in the embedded store (even when a
clock steps back and stored times are out of cursor order). A page first removes what expired,
at most PAGE_TRIM entries per script call so Redis is never blocked for long, calling again
until nothing expired is left; then all that remains is retained and the floor is exact.
Appends remove up to APPEND_TRIM expired entries in passing, so the inbox of a user who never
pulls stays bounded.

ent/age/rec expire retention + a margin after the last append. That TTL only collects idle
inboxes; what is served never depends on it: the scripts compare stored_ms with the injected
clock, and an entry set that vanished means every cursor up to seq was removed (floor = seq).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred

from improto.records import CorruptRecord, record_of_stored
from improto_server.deferreds import as_deferred
from improto_server.model import InboxRecords, PersistJob
from improto_server.production.redis_connection import (
    LuaScript,
    RedisClient,
    check_binary,
    gather,
    glob_escape,
    load_scripts,
)
from improto_server.production.redis_slots import slot_groups

DAY_MS = 86_400_000
APPEND_WINDOW = 64  # append scripts in flight at once for one batch (pipelined)
APPEND_ENTRIES = 2048  # inbox entries one append script writes at most: bounds Redis' pause
APPEND_TRIM = 64  # expired entries an append removes in passing: keeps busy inboxes bounded
PAGE_TRIM = 1000  # expired entries one script call removes: bounds the time Redis is blocked
MAX_PAGE = 10_000  # entries one page returns at most ("up to limit"; has_more stays exact)


# --------------------------------------------------------------------------- scripts
# The scripts take the keys of one user: meta, ent, age, rec (advance: meta, pos).

# head: the last cursor assigned; floor: the highest cursor removed by retention. When the
# entry keys are gone although cursors were assigned, every one of them was removed (by
# trimming, or by the TTL of an idle inbox), so the floor is the head.
_STATE = """
local function state(meta, ent)
  local v = redis.call('HMGET', meta, 'seq', 'floor')
  local head, floor = tonumber(v[1]) or 0, tonumber(v[2]) or 0
  if floor < head and redis.call('EXISTS', ent) == 0 then
    floor = head
    redis.call('HSET', meta, 'floor', head)
  end
  return head, floor
end

-- Remove up to `max` entries stored before `cutoff` (oldest first), raising the floor to the
-- highest cursor removed. Returns the floor, how many went, and whether expired ones remain.
local function trim(meta, ent, age, rec, floor, cutoff, max)
  local old = redis.call('ZRANGEBYSCORE', age, '-inf', '(' .. cutoff, 'LIMIT', 0, max + 1)
  local n = math.min(#old, max)
  if n == 0 then
    return floor, 0, false
  end
  local ids = {}
  for i = 1, n do
    ids[i] = old[i]
    local c = tonumber(redis.call('ZSCORE', ent, old[i]))
    if c and c > floor then
      floor = c
    end
  end
  redis.call('ZREM', ent, unpack(ids))
  redis.call('HDEL', rec, unpack(ids))
  -- the n oldest of `age` are exactly the ones listed above
  redis.call('ZREMRANGEBYRANK', age, 0, n - 1)
  redis.call('HSET', meta, 'floor', floor)
  return floor, n, #old > max
end
"""

# The start of a script on one user's inbox (KEYS: meta, ent, age, rec): its head and floor.
_ONE_USER = (
    _STATE
    + """
local meta, ent, age, rec = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local head, floor = state(meta, ent)
"""
)

# KEYS: meta, ent, age, rec of each user (4 per user). ARGV: now_ms, cutoff_ms, ttl_ms, trim
# max, the number of messages M, then M (msg_id, record) pairs, then for each user: a count k
# and k message indexes (1-based, in the order the entries must get their cursors). An entry
# already in its inbox (a redelivered job) is skipped. Returns the number of entries added.
_APPEND = LuaScript(
    _STATE
    + """
local now, cutoff, ttl, trimmax = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local base = 5
local pos = base + 1 + 2 * tonumber(ARGV[base])
local added = 0
-- One command per key and user, not per entry; at most 1000 arguments per unpack().
local function bulk(cmd, key, t)
  for i = 1, #t, 1000 do
    redis.call(cmd, key, unpack(t, i, math.min(i + 999, #t)))
  end
end
for u = 0, #KEYS / 4 - 1 do
  local meta, ent, age, rec = KEYS[4 * u + 1], KEYS[4 * u + 2], KEYS[4 * u + 3], KEYS[4 * u + 4]
  local head, floor = state(meta, ent)
  trim(meta, ent, age, rec, floor, cutoff, trimmax)
  local k = tonumber(ARGV[pos])
  local ats, ids = {}, {}
  for i = pos + 1, pos + k do
    local at = base + 2 * tonumber(ARGV[i]) - 1
    ats[#ats + 1] = at
    ids[#ids + 1] = ARGV[at]
  end
  pos = pos + k + 1
  local present = {}
  for i = 1, #ids, 1000 do
    local chunk = redis.call('ZMSCORE', ent, unpack(ids, i, math.min(i + 999, #ids)))
    for j = 1, #chunk do
      if chunk[j] then
        present[ids[i + j - 1]] = true
      end
    end
  end
  local seq = head
  local zent, zage, hrec = {}, {}, {}
  for i = 1, #ids do
    local id = ids[i]
    if not present[id] then  -- skips a redelivered entry, and a job twice in one batch
      present[id] = true
      seq = seq + 1
      zent[#zent + 1] = seq
      zent[#zent + 1] = id
      zage[#zage + 1] = now
      zage[#zage + 1] = id
      hrec[#hrec + 1] = id
      hrec[#hrec + 1] = ARGV[ats[i] + 1]
    end
  end
  if seq > head then
    bulk('ZADD', ent, zent)
    bulk('ZADD', age, zage)
    bulk('HSET', rec, hrec)
    redis.call('HSET', meta, 'seq', seq)
    redis.call('PEXPIRE', ent, ttl)
    redis.call('PEXPIRE', age, ttl)
    redis.call('PEXPIRE', rec, ttl)
    added = added + seq - head
  end
end
return added
"""
)

# ARGV: start (u64, decimal), limit, cutoff_ms, trim max. Returns {-1} when a batch of expired
# entries was removed and more remain (call again: each call is bounded), else
# {start used, has_more, gap, cursor1, record1, cursor2, record2, ...}.
_PAGE = LuaScript(
    _ONE_USER
    + """
local start = tonumber(ARGV[1])  -- inexact above 2**53, but then it is clamped to the head
if start > head then
  start = head
end
local n, more
floor, n, more = trim(meta, ent, age, rec, floor, ARGV[3], tonumber(ARGV[4]))
if more then
  return {-1}
end
-- Everything left is retained now, so read from start itself (not from the floor): with a
-- clock that stepped back, a retained entry can sit below a removed one, as in the embedded
-- store.
local limit = tonumber(ARGV[2])
local rows = redis.call('ZRANGEBYSCORE', ent, string.format('(%d', start), '+inf',
  'WITHSCORES', 'LIMIT', 0, limit + 1)
local count = #rows / 2
local out = {start, count > limit and 1 or 0, floor > start and 1 or 0}
local n = math.min(count, limit)
if n == 0 then
  return out
end
-- The records by HMGET, one call per 1000 (unpack() limit), not one HGET per entry.
for first = 1, n, 1000 do
  local last = math.min(first + 999, n)
  local ids = {}
  for i = first, last do
    ids[#ids + 1] = rows[2 * i - 1]
  end
  local recs = redis.call('HMGET', rec, unpack(ids))
  for i = first, last do
    out[#out + 1] = tonumber(rows[2 * i])
    out[#out + 1] = recs[i - first + 1]
  end
end
return out
"""
)

# ARGV: cutoff_ms, trim max. Returns {removed, 1 if expired entries remain}.
_TRIM = LuaScript(
    _ONE_USER
    + """
local n, more
floor, n, more = trim(meta, ent, age, rec, floor, ARGV[1], tonumber(ARGV[2]))
return {n, more and 1 or 0}
"""
)

# KEYS: meta, pos. ARGV: device id, cursor (u64, decimal).
_ADVANCE = LuaScript(
    """
local head = tonumber(redis.call('HGET', KEYS[1], 'seq')) or 0
local c = tonumber(ARGV[2])
if c > head then
  c = head
end
if c < 0 then
  c = 0
end
local p = tonumber(redis.call('HGET', KEYS[2], ARGV[1])) or 0
if c > p then
  redis.call('HSET', KEYS[2], ARGV[1], c)
  p = c
end
return p
"""
)

SCRIPTS = (_APPEND, _PAGE, _TRIM, _ADVANCE)


class RedisInbox:
    """InboxStore on Redis. Every operation on one user's inbox is one atomic script, so the
    cursor is assigned and the entry becomes visible in the same step: an entry can never
    appear behind a cursor a reader was already given."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        now_ms: Callable[[], int],
        retention_ms: int,
        *,
        ttl_margin_ms: int = DAY_MS,
        cluster: bool = False,
    ) -> None:
        """`cluster`: split multi-user scripts by slot (needed on Redis Cluster only)."""
        check_binary(redis)
        self._cluster = cluster
        self._redis = redis
        self._prefix = prefix
        self._now_ms = now_ms
        self.retention_ms = retention_ms
        # Real-time expiry of idle inboxes; the margin covers clock differences between the
        # servers' clocks (retention) and Redis' clock (TTL).
        self._ttl_ms = retention_ms + ttl_margin_ms

    def start(self) -> Deferred[None]:
        """Load the scripts (optional: an unknown script falls back to EVAL)."""
        return load_scripts(self._redis, SCRIPTS)

    def keys(self, user_id: int) -> list[str]:
        """meta, ent, age, rec, pos of one user: one hash tag, hence one cluster slot."""
        base = f"{self._prefix}:inbox:{{u{user_id}}}:"
        return [base + name for name in ("meta", "ent", "age", "rec", "pos")]

    def _cutoff(self) -> int:
        return self._now_ms() - self.retention_ms

    # ------------------------------------------------------------------ the port

    def append(self, job: PersistJob) -> Deferred[None]:
        return self.append_many([job])

    @as_deferred
    async def append_many(self, jobs: Sequence[PersistJob]) -> None:
        records: list[tuple[int, bytes]] = []
        entries: dict[int, list[int]] = {}  # user -> indexes into records, in job order
        for job in jobs:
            m = job.message
            records.append((m.msg_id, job.stored_record))  # validated when packed
            for user in set(job.inbox_users):
                entries.setdefault(user, []).append(len(records) - 1)
        if not entries:
            return
        now = self._now_ms()
        head = [now, now - self.retention_ms, self._ttl_ms, APPEND_TRIM]
        # Many users per script call (one round trip and one Python call chain for a whole
        # batch), at most APPEND_ENTRIES entries per call, split by slot on Redis Cluster.
        calls: list[list[int]] = []
        for group in slot_groups(sorted(entries), self._slot_key, self._cluster):
            size = APPEND_ENTRIES
            for user in group:
                if size + len(entries[user]) > APPEND_ENTRIES:
                    calls.append([])
                    size = 0
                calls[-1].append(user)
                size += len(entries[user])
        for i in range(0, len(calls), APPEND_WINDOW):
            await gather(
                self._append_call(users, entries, records, head)
                for users in calls[i : i + APPEND_WINDOW]
            )

    def _append_call(
        self,
        users: list[int],
        entries: dict[int, list[int]],
        records: list[tuple[int, bytes]],
        head: list[Any],
    ) -> Deferred[Any]:
        used = sorted({i for u in users for i in entries[u]})
        local = {i: n for n, i in enumerate(used, 1)}
        keys: list[str] = []
        args = [*head, len(used)]
        for i in used:
            args.extend(records[i])
        for user in users:
            keys.extend(self.keys(user)[:4])
            args.append(len(entries[user]))
            args.extend(local[i] for i in entries[user])
        return _APPEND(self._redis, keys, args)

    def _slot_key(self, user_id: int) -> str:
        return self.keys(user_id)[0]

    @as_deferred
    async def page(self, user_id: int, start: int, limit: int) -> InboxRecords:
        """The MESSAGE records of the entries, taken from the stored records without decoding
        them: what the pull handler splices into OFFLINE_PAGE."""
        keys = self.keys(user_id)[:4]
        args = [start, min(max(0, limit), MAX_PAGE), self._cutoff(), PAGE_TRIM]
        while True:
            reply = await _PAGE(self._redis, keys, args)
            if reply[0] != -1:
                break  # else a batch of expired entries went; the rest goes on the next call
        used, has_more, gap, *flat = reply
        return InboxRecords(
            tuple(int(c) for c in flat[0::2]),
            tuple(_record(p, user_id) for p in flat[1::2]),
            start=int(used), has_more=bool(has_more), gap=bool(gap),
        )  # fmt: skip

    def position(self, user_id: int, device_id: str) -> Deferred[int]:
        d = self._redis.execute_command("HGET", self.keys(user_id)[4], device_id.encode())
        return d.addCallback(lambda v: 0 if v is None else int(v))

    def advance(self, user_id: int, device_id: str, cursor: int) -> Deferred[int]:
        meta, pos = self.keys(user_id)[0], self.keys(user_id)[4]
        d = _ADVANCE(self._redis, [meta, pos], [device_id.encode(), cursor])
        return d.addCallback(int)

    # ------------------------------------------------------------------ retention

    @as_deferred
    async def sweep(self) -> int:
        """Remove every expired entry of every inbox under the prefix; returns how many.

        Optional: pages never serve expired entries and appends trim in passing. SCAN sees
        one node: on Redis Cluster run it against each master."""
        cutoff = self._cutoff()
        pattern = glob_escape(f"{self._prefix}:inbox:{{u") + "*}:age"
        removed = 0
        cursor: bytes = b"0"
        while True:
            cursor, found = await self._redis.execute_command(
                "SCAN", cursor, "MATCH", pattern, "COUNT", 500
            )
            for key in found:
                base = key.decode()[: -len("age")]
                keys = [base + name for name in ("meta", "ent", "age", "rec")]
                while True:
                    n, more = await _TRIM(self._redis, keys, [cutoff, PAGE_TRIM])
                    removed += n
                    if not more:
                        break
            if cursor == b"0":
                return removed


def _record(stored: bytes | None, user_id: int) -> bytes:
    """The MESSAGE record of an entry's stored record (any storage format)."""
    if stored is None:
        raise RuntimeError(f"inbox of user {user_id}: an entry has no record")
    try:
        return record_of_stored(stored)
    except CorruptRecord as e:
        raise RuntimeError(f"inbox of user {user_id}: {e}") from None
