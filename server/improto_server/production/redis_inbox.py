"""Offline inboxes and device positions on Redis (the InboxStore port), through txredisapi.

Key layout (P = the prefix). Every key of one user carries the hash tag `{u<user_id>}`, so in
Redis Cluster a user's inbox lives in one slot. A batch append writes many users' inboxes in
one script call (one round trip per batch, not per entry); with `cluster=True` the users are
split by slot first, so no script ever spans two slots:

    P:inbox:{u<id>}:meta  hash  seq: the last cursor assigned; floor: the highest cursor
                                removed (retention or caps); bytes: the entries' sizes. No
                                TTL: cursors must never go back (a new entry after a reset
                                would get a cursor at or below one a client holds, and that
                                client would skip it), and it stays three small integers.
    P:inbox:{u<id>}:pos   hash  device id -> position.
    P:inbox:{u<id>}:dev   zset  device id -> the user's advance count at its last advance:
                                at most MAX_DEVICE_POSITIONS devices keep a position, the
                                least recently advanced are dropped (position 0 again: a
                                RESUME pull then starts from the oldest retained entry).
                                pos and dev expire retention + margin after the last advance:
                                by then every entry up to the position has expired.
    P:inbox:{u<id>}:ent   zset  msg_id -> cursor. Cursor-ordered reads, and the (user, msg_id)
                                dedup of redelivered jobs, in one key.
    P:inbox:{u<id>}:age   zset  msg_id -> stored_ms (from the injected clock).
    P:inbox:{u<id>}:rec   hash  msg_id -> the message's stored record (improto.records:
                                a storage format byte, then the MESSAGE record; entries
                                written before formats were numbered hold a PUSH payload).
    P:conv:behind         set   decimal user ids: every user an append gave an entry, until
                                the user's conversation rows are folded up to its seq
                                (RedisConversations.fold removes it; behind() reads it, so a
                                persister that stopped folds what it left). On Redis Cluster
                                one set per slot, `P:conv:behind:{<slot_tag>}`, so an append
                                call (one slot) adds to the set of its own slot. It expires
                                retention + margin after the last append, with the entries it
                                names: by then there is nothing left to fold.

Scores are doubles, exact only up to 2**53: cursors (a per-user count) and milliseconds fit,
so they are scores; msg_ids and user ids (u64) are only ever members, fields or key names, and
the scripts never turn them into Lua numbers.

Retention is per entry, from its own stored_ms, exactly as in the embedded store (even when a
clock steps back and stored times are out of cursor order). A page first removes what expired,
at most PAGE_TRIM entries per script call so Redis is never blocked for long, calling again
until nothing expired is left; then all that remains is retained and the floor is exact.
Appends remove up to APPEND_TRIM expired entries in passing, so the inbox of a user who never
pulls stays bounded.

Caps (InboxCaps): beyond max_entries entries (cursors at or below head - max_entries: cursors
are consecutive) or max_bytes record bytes, the oldest entries are removed like expired ones
(the floor rises, so a reader below them gets `gap`). An append removes as many as it added
plus APPEND_TRIM; a page first removes whatever is still beyond the caps, PAGE_TRIM per call.

`ids` answers what a page would, from one read-only script: entries a page would remove
first (expired, beyond a cap) are left out and count as removed (`gap`) when above start.

A page reads no more than its byte budget: it takes each entry's stored length (HSTRLEN)
before reading the record, so a record that cannot fit is never read (nor sent to the server).

ent/age/rec expire retention + a margin after the last append. That TTL only collects idle
inboxes; what is served never depends on it: the scripts compare stored_ms with the injected
clock, and an entry set that vanished means every cursor up to seq was removed (floor = seq).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred

from improto.records import STORE_FORMAT, CorruptRecord, record_of_stored
from improto_server.config import DAY_MS, InboxCaps
from improto_server.deferreds import as_deferred
from improto_server.model import InboxIds, InboxRecords, PersistJob
from improto_server.production.redis_cluster import scan_targets
from improto_server.production.redis_connection import (
    LuaScript,
    RedisClient,
    check_binary,
    gather,
    glob_escape,
    load_scripts,
)
from improto_server.production.redis_slots import key_slot, script_calls, slot_tag

APPEND_WINDOW = 64  # append scripts in flight at once for one batch (pipelined)
APPEND_ENTRIES = 2048  # inbox entries one append script writes at most: bounds Redis' pause
APPEND_TRIM = 64  # expired entries an append removes in passing: keeps busy inboxes bounded
PAGE_TRIM = 1000  # expired entries one script call removes: bounds the time Redis is blocked
MAX_PAGE = 10_000  # entries one page returns at most ("up to limit"; has_more stays exact)
MAX_DEVICE_POSITIONS = 64  # device positions kept per user (the least recently advanced go)
INBOX_NAMES = ("meta", "ent", "age", "rec", "pos", "dev")


def inbox_keys(prefix: str, user_id: int) -> list[str]:
    """The user's inbox keys in INBOX_NAMES order: one hash tag, hence one cluster slot (the
    conversation lists read meta, ent and rec to fold them)."""
    base = f"{prefix}:inbox:{{u{user_id}}}:"
    return [base + name for name in INBOX_NAMES]


def behind_key(prefix: str, user_id: int, cluster: bool) -> str:
    """The behind set that names `user_id`: one for all, or on Redis Cluster the one of the
    user's slot (so a script on the user's keys may add or remove it)."""
    if not cluster:
        return f"{prefix}:conv:behind"
    return behind_slot_key(prefix, key_slot(f"{{u{user_id}}}"))


def behind_slot_key(prefix: str, slot: int) -> str:
    """On Redis Cluster: the behind set of the users whose keys are in `slot`."""
    return f"{prefix}:conv:behind:{{{slot_tag(slot)}}}"


# --------------------------------------------------------------------------- scripts
# The scripts take the keys of one user: meta, ent, age, rec (advance: meta, pos).

# head: the last cursor assigned; floor: the highest cursor removed (by retention or a cap);
# bytes: the sum of the entries' sizes (a stored record's length - 1: its MESSAGE record for
# storage format 2). When the entry keys are gone although cursors were assigned, every one of
# them was removed (by trimming, or by the TTL of an idle inbox), so the floor is the head.
_STATE = """
local function state(meta, ent)
  local v = redis.call('HMGET', meta, 'seq', 'floor')
  local head, floor = tonumber(v[1]) or 0, tonumber(v[2]) or 0
  if floor < head and redis.call('EXISTS', ent) == 0 then
    floor = head
    redis.call('HSET', meta, 'floor', head, 'bytes', 0)
  end
  return head, floor
end

-- One command per key, not per entry; at most 1000 arguments per unpack().
local function bulk(cmd, key, t, first, last)
  for i = first or 1, last or #t, 1000 do
    redis.call(cmd, key, unpack(t, i, math.min(i + 999, last or #t)))
  end
end

-- Remove entries `ids` (msg ids, all present), raising the floor to the highest cursor
-- removed and taking their sizes off the byte total. Returns the floor.
local function remove(meta, ent, age, rec, floor, ids)
  if #ids == 0 then
    return floor
  end
  local freed = 0
  for i = 1, #ids do
    local c = tonumber(redis.call('ZSCORE', ent, ids[i]))
    if c and c > floor then
      floor = c
    end
    freed = freed + math.max(0, redis.call('HSTRLEN', rec, ids[i]) - 1)
  end
  bulk('ZREM', ent, ids)
  bulk('ZREM', age, ids)
  bulk('HDEL', rec, ids)
  -- Entries stored before totals were kept count 0: never let the total go below 0.
  if redis.call('HINCRBY', meta, 'bytes', -freed) < 0 then
    redis.call('HSET', meta, 'bytes', 0)
  end
  redis.call('HSET', meta, 'floor', floor)
  return floor
end

-- Remove up to `max` entries stored before `cutoff` (oldest first). Returns the floor, how
-- many went, and whether expired ones remain.
local function trim(meta, ent, age, rec, floor, cutoff, max)
  local old = redis.call('ZRANGEBYSCORE', age, '-inf', '(' .. cutoff, 'LIMIT', 0, max + 1)
  local n = math.min(#old, max)
  local ids = {unpack(old, 1, n)}
  return remove(meta, ent, age, rec, floor, ids), n, #old > max
end

-- Remove up to `max` of the oldest entries (lowest cursors) beyond the caps: cursors up to
-- head - max_entries (cursors are consecutive), then while the byte total exceeds max_bytes.
-- Returns the floor, how many went, and whether some beyond the caps remain.
local function cap(meta, ent, age, rec, head, floor, max_entries, max_bytes, max)
  local n = 0
  if head > max_entries then
    local old = redis.call('ZRANGEBYSCORE', ent, '-inf', head - max_entries,
      'LIMIT', 0, max + 1)
    n = math.min(#old, max)
    floor = remove(meta, ent, age, rec, floor, {unpack(old, 1, n)})
    if #old > max then
      return floor, n, true
    end
  end
  local bytes = tonumber(redis.call('HGET', meta, 'bytes')) or 0
  if bytes <= max_bytes then
    return floor, n, false
  end
  local ids, rank = {}, 0
  while bytes > max_bytes and n + #ids < max do
    local chunk = redis.call('ZRANGE', ent, rank, rank + 63)
    if #chunk == 0 then  -- nothing left to remove: the total was off
      redis.call('HSET', meta, 'bytes', 0)
      break
    end
    for i = 1, #chunk do
      if bytes <= max_bytes or n + #ids >= max then
        break
      end
      bytes = bytes - math.max(0, redis.call('HSTRLEN', rec, chunk[i]) - 1)
      ids[#ids + 1] = chunk[i]
    end
    rank = rank + 64
  end
  floor = remove(meta, ent, age, rec, floor, ids)
  n = n + #ids
  return floor, n, bytes > max_bytes and redis.call('EXISTS', ent) == 1
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

# KEYS: meta, ent, age, rec of each user (4 per user), then the behind set (of the call's slot).
# ARGV: now_ms, cutoff_ms, ttl_ms, trim max, max_entries, max_bytes, the number of messages M,
# then M (msg_id, record) pairs, then for each user: its id (decimal), a count k and k message
# indexes (1-based, in the order the entries must get their cursors). An entry already in its
# inbox (a redelivered job) is skipped. Beyond the caps, the oldest entries go: as many as were
# added plus the trim max, so the work stays bounded (a page removes whatever is left first).
# The users that got an entry join the behind set (one SADD). Returns the entries added.
_APPEND = LuaScript(
    _STATE
    + """
local now, cutoff, ttl, trimmax = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local max_entries, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local base = 7
local pos = base + 1 + 2 * tonumber(ARGV[base])
local added, grown = 0, {}
for u = 0, (#KEYS - 1) / 4 - 1 do
  local meta, ent, age, rec = KEYS[4 * u + 1], KEYS[4 * u + 2], KEYS[4 * u + 3], KEYS[4 * u + 4]
  local head, floor = state(meta, ent)
  floor = trim(meta, ent, age, rec, floor, cutoff, trimmax)
  local user, k = ARGV[pos], tonumber(ARGV[pos + 1])
  local ats, ids = {}, {}
  for i = pos + 2, pos + k + 1 do
    local at = base + 2 * tonumber(ARGV[i]) - 1
    ats[#ats + 1] = at
    ids[#ids + 1] = ARGV[at]
  end
  pos = pos + k + 2
  local present = {}
  for i = 1, #ids, 1000 do
    local chunk = redis.call('ZMSCORE', ent, unpack(ids, i, math.min(i + 999, #ids)))
    for j = 1, #chunk do
      if chunk[j] then
        present[ids[i + j - 1]] = true
      end
    end
  end
  local seq, size = head, 0
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
      size = size + #ARGV[ats[i] + 1] - 1
    end
  end
  if seq > head then
    bulk('ZADD', ent, zent)
    bulk('ZADD', age, zage)
    bulk('HSET', rec, hrec)
    redis.call('HSET', meta, 'seq', seq)
    redis.call('HINCRBY', meta, 'bytes', size)
    redis.call('PEXPIRE', ent, ttl)
    redis.call('PEXPIRE', age, ttl)
    redis.call('PEXPIRE', rec, ttl)
    added = added + seq - head
    grown[#grown + 1] = user
    cap(meta, ent, age, rec, seq, floor, max_entries, max_bytes, seq - head + trimmax)
  end
end
if #grown > 0 then
  bulk('SADD', KEYS[#KEYS], grown)
  redis.call('PEXPIRE', KEYS[#KEYS], ttl)
end
return added
"""
)

# ARGV: start (u64, decimal), limit, cutoff_ms, trim max, max_bytes (the page's budget),
# max_entries, inbox max_bytes. Returns {-1} when a batch of expired entries or of entries
# beyond the caps was removed and more remain (call again: each call is bounded), else
# {start used, has_more, gap, cursor1, record1, cursor2, record2, ...}: records while their
# sizes sum to at most the budget (at least one), read no further than that.
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
floor, n, more = cap(meta, ent, age, rec, head, floor, tonumber(ARGV[6]), tonumber(ARGV[7]),
  tonumber(ARGV[4]))
if more then
  return {-1}
end
-- Everything left is retained now, so read from start itself (not from the floor): with a
-- clock that stepped back, a retained entry can sit below a removed one, as in the embedded
-- store.
local limit, budget = tonumber(ARGV[2]), tonumber(ARGV[5])
local rows = redis.call('ZRANGEBYSCORE', ent, string.format('(%d', start), '+inf',
  'WITHSCORES', 'LIMIT', 0, limit + 1)
local count = #rows / 2
local out = {start, 0, floor > start and 1 or 0}
local used, taken = 0, 0
for i = 1, math.min(count, limit) do
  local id = rows[2 * i - 1]
  -- A stored record is its MESSAGE record after a 1-byte (format 2) or 7-byte (format 1)
  -- head: read it only if it can fit, then decide on its exact size.
  local stored = redis.call('HSTRLEN', rec, id)
  if taken > 0 and used + stored - 7 > budget then
    break
  end
  local v = redis.call('HGET', rec, id)
  local size = 0
  if v then
    size = #v - (string.byte(v, 1) == STORE_FORMAT and 1 or 7)
  end
  if taken > 0 and used + size > budget then
    break
  end
  used, taken = used + size, taken + 1
  out[#out + 1] = tonumber(rows[2 * i])
  out[#out + 1] = v
end
out[2] = count > taken and 1 or 0
return out
""".replace("STORE_FORMAT", str(STORE_FORMAT))
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

# KEYS: meta, pos, dev. ARGV: device id, cursor (u64, decimal), ttl_ms, max devices. `dev`
# orders the devices by their last advance (score: a per-user counter); beyond max devices,
# the least recently advanced lose their position. Both keys expire ttl_ms after the last
# advance: a device silent that long holds no entry that is still retained.
_ADVANCE = LuaScript(
    """
local meta, pos, dev = KEYS[1], KEYS[2], KEYS[3]
local head = tonumber(redis.call('HGET', meta, 'seq')) or 0
local c = tonumber(ARGV[2])
if c > head then
  c = head
end
if c < 0 then
  c = 0
end
local p = tonumber(redis.call('HGET', pos, ARGV[1])) or 0
if c > p then
  redis.call('HSET', pos, ARGV[1], c)
  p = c
end
local last = redis.call('ZREVRANGE', dev, 0, 0, 'WITHSCORES')
redis.call('ZADD', dev, (tonumber(last[2]) or 0) + 1, ARGV[1])
local max = tonumber(ARGV[4])
if redis.call('HLEN', pos) > redis.call('ZCARD', dev) then
  -- positions written before devices were ordered: the least recent of all
  local fields = redis.call('HKEYS', pos)
  for i = 1, #fields do
    redis.call('ZADD', dev, 'NX', 0, fields[i])
  end
end
local extra = redis.call('ZCARD', dev) - max
if extra > 0 then
  local old = redis.call('ZRANGE', dev, 0, extra - 1)
  redis.call('ZREM', dev, unpack(old))
  redis.call('HDEL', pos, unpack(old))
end
redis.call('PEXPIRE', pos, ARGV[3])
redis.call('PEXPIRE', dev, ARGV[3])
return p
"""
)

# KEYS: meta, ent, age. ARGV: start (u64, decimal), limit, cutoff_ms, max_entries, check
# max. Reads only. Entries the next page would remove first (expired, or beyond the entry
# cap) are not listed, and one above start counts as removed (gap), as in the page; more than
# `check max` expired entries count as a gap too (a page trims them first). A lowered byte
# cap applies at the next page only (as in the embedded store): the entries it removes then
# show as a gap there. Returns {start used, has_more, gap, cursor1, msg_id1, ...}.
_IDS = LuaScript(
    """
local meta, ent, age = KEYS[1], KEYS[2], KEYS[3]
local v = redis.call('HMGET', meta, 'seq', 'floor')
local head, floor = tonumber(v[1]) or 0, tonumber(v[2]) or 0
if floor < head and redis.call('EXISTS', ent) == 0 then
  floor = head  -- the entry keys expired: every cursor was removed
end
local start = tonumber(ARGV[1])  -- inexact above 2**53, but then it is clamped to the head
if start > head then
  start = head
end
local limit, cutoff, check = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
local gap = floor > start
local from = start
local capped = head - tonumber(ARGV[4])  -- cursors up to here are beyond the entry cap
if capped > start then
  if redis.call('ZCOUNT', ent, string.format('(%d', start), capped) > 0 then
    gap = true
  end
  from = capped
end
local old = redis.call('ZRANGEBYSCORE', age, '-inf', '(' .. cutoff, 'LIMIT', 0, check + 1)
if #old > check then
  gap = true
else
  for i = 1, #old, 1000 do
    local cs = redis.call('ZMSCORE', ent, unpack(old, i, math.min(i + 999, #old)))
    for j = 1, #cs do
      if cs[j] and tonumber(cs[j]) > start then
        gap = true
      end
    end
  end
end
-- Enough entries that `limit` + 1 are retained even if every expired one is among them.
local want = limit + 1 + math.min(#old, check + 1)
local rows = redis.call('ZRANGEBYSCORE', ent, string.format('(%d', from), '+inf',
  'WITHSCORES', 'LIMIT', 0, want)
local ids = {}
for i = 1, #rows / 2 do
  ids[i] = rows[2 * i - 1]
end
local out = {start, 0, gap and 1 or 0}
local kept = 0
for i = 1, #ids, 1000 do
  local ages = redis.call('ZMSCORE', age, unpack(ids, i, math.min(i + 999, #ids)))
  for j = 1, #ages do
    if not ages[j] or tonumber(ages[j]) >= cutoff then
      kept = kept + 1
      if kept <= limit then
        out[#out + 1] = tonumber(rows[2 * (i + j - 1)])
        out[#out + 1] = ids[i + j - 1]
      end
    end
  end
end
out[2] = (kept > limit or (#old > check and #ids == want)) and 1 or 0
return out
"""
)

SCRIPTS = (_APPEND, _PAGE, _TRIM, _ADVANCE, _IDS)


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
        caps: InboxCaps | None = None,
        max_devices: int = MAX_DEVICE_POSITIONS,
    ) -> None:
        """`cluster`: split multi-user scripts by slot (needed on Redis Cluster only);
        `caps`: Config.inbox_caps (None: the defaults)."""
        check_binary(redis)
        self.caps = caps or InboxCaps()
        self.max_devices = max_devices
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
        """meta, ent, age, rec, pos, dev of one user: one hash tag, hence one cluster slot."""
        return inbox_keys(self._prefix, user_id)

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
        caps = self.caps
        head = [now, now - self.retention_ms, self._ttl_ms, APPEND_TRIM, *caps_args(caps)]
        # Many users per script call (one round trip and one Python call chain for a whole
        # batch), at most APPEND_ENTRIES entries per call, split by slot on Redis Cluster.
        calls = script_calls(entries, self._slot_key, self._cluster, APPEND_ENTRIES)
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
            args.extend((user, len(entries[user])))
            args.extend(local[i] for i in entries[user])
        keys.append(behind_key(self._prefix, users[0], self._cluster))  # one slot per call
        return _APPEND(self._redis, keys, args)

    def _slot_key(self, user_id: int) -> str:
        return self.keys(user_id)[0]

    @as_deferred
    async def page(self, user_id: int, start: int, limit: int, max_bytes: int) -> InboxRecords:
        """The MESSAGE records of the entries, taken from the stored records without decoding
        them: what the pull handler splices into OFFLINE_PAGE."""
        keys = self.keys(user_id)[:4]
        limit = min(max(0, limit), MAX_PAGE)
        args = [start, limit, self._cutoff(), PAGE_TRIM, max_bytes, *caps_args(self.caps)]
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

    def ids(self, user_id: int, start: int, limit: int) -> Deferred[InboxIds]:
        """The cursors and msg_ids `page` would return, reading no record and removing
        nothing (one read-only script)."""
        meta, ent, age, _ = self.keys(user_id)[:4]
        limit = min(max(0, limit), MAX_PAGE)
        args = [start, limit, self._cutoff(), self.caps.max_entries, PAGE_TRIM]

        def parse(reply: list[Any]) -> InboxIds:
            used, has_more, gap, *flat = reply
            return InboxIds(
                start=int(used),
                cursors=tuple(int(c) for c in flat[0::2]),
                msg_ids=tuple(int(m) for m in flat[1::2]),
                has_more=bool(has_more),
                gap=bool(gap),
            )

        return _IDS(self._redis, [meta, ent, age], args).addCallback(parse)

    def position(self, user_id: int, device_id: str) -> Deferred[int]:
        d = self._redis.execute_command("HGET", self.keys(user_id)[4], device_id.encode())
        return d.addCallback(lambda v: 0 if v is None else int(v))

    def advance(self, user_id: int, device_id: str, cursor: int) -> Deferred[int]:
        meta, *_, pos, dev = self.keys(user_id)
        args = [device_id.encode(), cursor, self._ttl_ms, self.max_devices]
        d = _ADVANCE(self._redis, [meta, pos, dev], args)
        return d.addCallback(int)

    # ------------------------------------------------------------------ retention

    @as_deferred
    async def sweep(self) -> int:
        """Remove every expired entry of every inbox under the prefix; returns how many.

        Optional: pages never serve expired entries and appends trim in passing. SCAN sees
        one node: on Redis Cluster each master is scanned."""
        removed = 0
        for node in scan_targets(self._redis):
            removed += await self._sweep_node(node)
        return removed

    async def _sweep_node(self, node: RedisClient) -> int:
        cutoff = self._cutoff()
        pattern = glob_escape(f"{self._prefix}:inbox:{{u") + "*}:age"
        removed = 0
        cursor: bytes = b"0"
        while True:
            cursor, found = await node.execute_command(
                "SCAN", cursor, "MATCH", pattern, "COUNT", 500
            )
            for key in found:
                base = key.decode()[: -len("age")]
                keys = [base + name for name in INBOX_NAMES[:4]]
                while True:
                    n, more = await _TRIM(self._redis, keys, [cutoff, PAGE_TRIM])
                    removed += n
                    if not more:
                        break
            if cursor == b"0":
                return removed


def caps_args(caps: InboxCaps) -> list[int]:
    return [caps.max_entries, caps.max_bytes]


def _record(stored: bytes | None, user_id: int) -> bytes:
    """The MESSAGE record of an entry's stored record (any storage format)."""
    if stored is None:
        raise RuntimeError(f"inbox of user {user_id}: an entry has no record")
    try:
        return record_of_stored(stored)
    except CorruptRecord as e:
        raise RuntimeError(f"inbox of user {user_id}: {e}") from None
