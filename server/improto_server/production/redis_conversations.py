"""Conversation lists on Redis (the ConversationStore port), through txredisapi.

Key layout (P = the prefix; R = a row's field, `<conv_kind>:<16 hex conv_id>`, the
conversation as the user sees it). Every key of one user carries the hash tag `{u<user_id>}`,
so in Redis Cluster a user's list lives in one slot; a batch changes many users' rows in one
script call, split by slot first with `cluster=True` (a 1:1 read mark changes two users' rows:
the reader's and the peer's, two slots):

    P:conv:{u<id>}:meta  hash  ver: the user's last list version; total: the sum of unread
                               over the rows not hidden. No TTL (see below).
    P:conv:{u<id>}:rows  hash  R -> the row's state: last_id, read_id, peer_read_id, the
                               newest hide's msg_id (16 hex digits each), hidden (0/1), then
                               "version:unread" (decimal).
    P:conv:{u<id>}:last  hash  R -> the last message's stored record (improto.records: a
                               storage format byte, then the MESSAGE record).
    P:conv:{u<id>}:unr   zset  "R:<16 hex msg_id>" (score 0): the unread ids counted, at most
                               MAX_UNREAD_TRACKED per row (one lex range per row).
    P:conv:{u<id>}:ver   zset  R -> version: CONV_CHANGES in version order.
    P:conv:{u<id>}:act   zset  "<16 hex last_id>:R" (score 0) of the rows not hidden:
                               CONV_LIST in last_id order (ZREVRANGEBYLEX; rows without a
                               message have last_id 0, so they come last).
    P:conv:{u<id>}:age   zset  R -> the ms (injected clock) of the row's last change.

msg_ids and user ids are u64: they are fixed-width hex in members and fields (so lex order is
numeric order; scripts compare them in two exact 32-bit halves), never Lua numbers. Scores
hold versions and milliseconds only. Unread is counted as in the embedded store (ids tracked
to count each message once; beyond MAX_UNREAD_TRACKED the oldest are counted, not tracked),
and a batch gives each visibly changed row one version, in the order the rows were first
touched, so both backends answer alike.

Retention: a row lives `retention_ms` (the history's) after its last change, by the injected
clock: every script first removes the user's expired rows (bounded per call; a read calls
again until none is left), so what is served never depends on Redis' own expiry. rows, last,
unr, ver, act and age get PEXPIRE retention + margin whenever a script writes the user's
list, all in the same script, so they share one deadline and vanish together once every row
has expired. meta has no TTL: versions must never go back (a client holding version V asks
for the changes since V; a list restarting at 1 would hide versions up to V from it), and it
stays two small integers per user. A script that finds rows gone resets total to 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred

from improto.enums import ConvKind
from improto.records import CONV_OVERHEAD, CorruptRecord, record_of_stored
from improto_server.deferreds import as_deferred
from improto_server.model import MAX_UNREAD_TRACKED, ConvRows, ConvState, PersistJob, StateJob
from improto_server.production.redis_connection import (
    LuaScript,
    RedisClient,
    check_binary,
    gather,
    load_scripts,
)
from improto_server.production.redis_slots import slot_groups

DAY_MS = 86_400_000
CHANGE_WINDOW = 64  # change scripts in flight at once for one batch (pipelined)
CHANGE_ENTRIES = 2048  # row changes one script applies at most: bounds Redis' pause
CHANGE_TRIM = 64  # expired rows a change removes in passing
READ_TRIM = 1000  # expired rows one read call removes: bounds the time Redis is blocked
MAX_PAGE = 1000  # rows one page returns at most ("at most limit"; has_more stays exact)
NAMES = ("meta", "rows", "last", "unr", "ver", "act", "age")

# --------------------------------------------------------------------------- scripts
# KEYS of one user, in NAMES order (7 per user).

_COMMON = """
local ZERO = '0000000000000000'

-- a < b for two u64s written as 16 lowercase hex digits (two exact 32-bit halves).
local function lt(a, b)
  if a == b then
    return false
  end
  local ah, bh = tonumber(string.sub(a, 1, 8), 16), tonumber(string.sub(b, 1, 8), 16)
  if ah ~= bh then
    return ah < bh
  end
  return tonumber(string.sub(a, 9), 16) < tonumber(string.sub(b, 9), 16)
end

local function user_keys(u)
  local b = 7 * u
  return {meta = KEYS[b + 1], rows = KEYS[b + 2], last = KEYS[b + 3], unr = KEYS[b + 4],
    ver = KEYS[b + 5], act = KEYS[b + 6], age = KEYS[b + 7]}
end

local function load(K, f)
  local s = redis.call('HGET', K.rows, f)
  if not s then
    return nil
  end
  local ver, unread = string.match(s, '^(%d+):(%d+)$', 66)
  return {last = string.sub(s, 1, 16), read = string.sub(s, 17, 32),
    peer = string.sub(s, 33, 48), hide = string.sub(s, 49, 64),
    hidden = string.sub(s, 65, 65) == '1', ver = tonumber(ver), unread = tonumber(unread)}
end

-- The lex range of one row's tracked unread ids in unr.
local function lo(f)
  return '[' .. f .. ':'
end
local function hi(f)
  return '(' .. f .. ';'
end

-- The user's total, reset when the rows are gone (all of them expired in Redis at once).
local function total_of(K)
  local t = tonumber(redis.call('HGET', K.meta, 'total')) or 0
  if t ~= 0 and redis.call('EXISTS', K.rows) == 0 then
    redis.call('HSET', K.meta, 'total', 0)
    t = 0
  end
  return t
end

local function add_total(K, delta)
  if delta ~= 0 and redis.call('HINCRBY', K.meta, 'total', delta) < 0 then
    redis.call('HSET', K.meta, 'total', 0)
  end
end

-- Remove row f (expired), with its share of the total.
local function drop(K, f)
  local r = load(K, f)
  if r then
    if not r.hidden then
      add_total(K, -r.unread)
      redis.call('ZREM', K.act, r.last .. ':' .. f)
    end
    redis.call('HDEL', K.rows, f)
    redis.call('HDEL', K.last, f)
    redis.call('ZREM', K.ver, f)
    redis.call('ZREMRANGEBYLEX', K.unr, lo(f), hi(f))
  end
  redis.call('ZREM', K.age, f)
end

-- Remove up to `max` rows whose last change is before `cutoff`; true if more remain.
local function trim(K, cutoff, max)
  local old = redis.call('ZRANGEBYSCORE', K.age, '-inf', '(' .. cutoff, 'LIMIT', 0, max + 1)
  for i = 1, math.min(#old, max) do
    drop(K, old[i])
  end
  return #old > max
end
"""

# KEYS: 7 per user. ARGV: now_ms, cutoff_ms, ttl_ms, trim max, max tracked, the number of
# messages M, then M (16-hex msg_id, stored record) pairs, then for each user: a count k and k
# (op, row field, value) triples, applied in order. op: 'o' a message of the user's own
# (value: its 1-based message index), 'm' a message from another user (index), 'r' a read
# mark, 'p' the peer's read mark (1:1), 'h' a hide (value: the 16-hex msg_id).
# A user's rows are changed in memory in order, then each visibly changed row is written once
# with the user's next version (so a batch gives a row one version, as the embedded store
# does); a row whose hide alone moved is written without one. Returns the versions given.
_CHANGE = LuaScript(
    _COMMON
    + """
local function save(K, f, r)
  redis.call('HSET', K.rows, f, r.last .. r.read .. r.peer .. r.hide
    .. (r.hidden and '1' or '0') .. string.format('%d:%d', r.ver, r.unread))
end

-- read_id := max(read_id, m); the tracked ids at or below it are read. The untracked ones
-- are older than every tracked id: if a tracked one is read, so are they (else they stay).
local function read_to(K, f, r, m)
  if not lt(r.read, m) then
    return
  end
  r.read = m
  local upto = '[' .. f .. ':' .. m
  if redis.call('ZLEXCOUNT', K.unr, lo(f), upto) > 0 then
    redis.call('ZREMRANGEBYLEX', K.unr, lo(f), upto)
    r.unread = redis.call('ZLEXCOUNT', K.unr, lo(f), hi(f))
  end
end

-- A message `m` from another user, counted once. With the tracked ids full, one older than
-- all of them may have been counted and dropped already: it is not counted.
local function count_unread(K, f, r, m, maxt)
  if not lt(r.read, m) or redis.call('ZSCORE', K.unr, f .. ':' .. m) then
    return
  end
  local n = redis.call('ZLEXCOUNT', K.unr, lo(f), hi(f))
  local low = nil
  if n >= maxt then
    low = redis.call('ZRANGEBYLEX', K.unr, lo(f), hi(f), 'LIMIT', 0, 1)[1]
    if lt(m, string.sub(low, #f + 2)) then
      return
    end
  end
  redis.call('ZADD', K.unr, 0, f .. ':' .. m)
  r.unread = r.unread + 1
  if n + 1 > maxt then
    redis.call('ZREM', K.unr, low)  -- still counted, no longer tracked
  end
end

local function copy(r)
  local c = {}
  for k, v in pairs(r) do
    c[k] = v
  end
  return c
end

local now, cutoff, ttl = ARGV[1], ARGV[2], ARGV[3]
local trimmax, maxt = tonumber(ARGV[4]), tonumber(ARGV[5])
local base = 7
local pos = base + 2 * tonumber(ARGV[6])
local versions = 0
for u = 0, #KEYS / 7 - 1 do
  local K = user_keys(u)
  total_of(K)
  trim(K, cutoff, trimmax)
  local rows, order = {}, {}
  local k = tonumber(ARGV[pos])
  for i = pos + 1, pos + 3 * k, 3 do
    local op, f, v = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local c = rows[f]
    if not c then
      local at = tonumber(redis.call('ZSCORE', K.age, f))
      if at and at < tonumber(cutoff) then
        drop(K, f)  -- expired, left by a bounded trim: a new row starts
      end
      local before = load(K, f)
      local r = before and copy(before) or {last = ZERO, read = ZERO, peer = ZERO,
        hide = ZERO, hidden = false, ver = 0, unread = 0}
      c = {r = r, before = before, rec = false}
      rows[f] = c
      order[#order + 1] = f
    end
    local r = c.r
    if op == 'o' or op == 'm' then
      local at = base + 2 * tonumber(v) - 2
      v = ARGV[at]
      if lt(r.last, v) then
        r.last = v
        c.rec = ARGV[at + 1]
      end
      if r.hidden and lt(r.hide, v) then
        r.hidden = false
      end
      if op == 'o' then
        read_to(K, f, r, v)  -- one has read what one answers
      else
        count_unread(K, f, r, v, maxt)
      end
    elseif op == 'r' then
      read_to(K, f, r, v)
    elseif op == 'p' then
      if lt(r.peer, v) then
        r.peer = v
      end
    else  -- 'h': a message newer than the hide shows the row again
      if lt(r.hide, v) then
        r.hide = v
      end
      if not lt(v, r.last) then
        r.hidden = true
      end
    end
  end
  pos = pos + 3 * k + 1
  local written = false
  for _, f in ipairs(order) do
    local c = rows[f]
    local r, b = c.r, c.before
    local visible = not b or b.hidden ~= r.hidden or b.read ~= r.read or b.peer ~= r.peer
      or b.unread ~= r.unread or b.last ~= r.last
    if visible or b.hide ~= r.hide then
      if visible then
        r.ver = redis.call('HINCRBY', K.meta, 'ver', 1)
        redis.call('ZADD', K.ver, r.ver, f)
        versions = versions + 1
      end
      save(K, f, r)
      redis.call('ZADD', K.age, now, f)
      if c.rec then
        redis.call('HSET', K.last, f, c.rec)
      end
      local was_hidden = not b or b.hidden  -- a new row is in no list yet
      add_total(K, (r.hidden and 0 or r.unread) - (was_hidden and 0 or b.unread))
      if not was_hidden and (r.hidden or b.last ~= r.last) then
        redis.call('ZREM', K.act, b.last .. ':' .. f)
      end
      if not r.hidden and (was_hidden or b.last ~= r.last) then
        redis.call('ZADD', K.act, 0, r.last .. ':' .. f)
      end
      written = true
    end
  end
  if written then  -- one deadline for all of them (meta excepted)
    for _, key in ipairs({K.rows, K.last, K.unr, K.ver, K.act, K.age}) do
      redis.call('PEXPIRE', key, ttl)
    end
  end
end
return versions
"""
)

# The end of a page script: `fields` (up to limit + 1 candidates, in page order) become
# {version, total, has_more, field1, state1, record1, ...} while the CONV records fit the
# budget (at least one), reading no record that does not fit.
_PAGE_END = """
local limit, budget, overhead = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local out = {tonumber(redis.call('HGET', K.meta, 'ver')) or 0,
  tonumber(redis.call('HGET', K.meta, 'total')) or 0, 0}
local used, taken = 0, 0
for i = 1, math.min(#fields, limit) do
  local f = fields[i]
  -- a stored record is a format byte, then the MESSAGE record
  local size = overhead + math.max(0, redis.call('HSTRLEN', K.last, f) - 1)
  if taken > 0 and used + size > budget then
    break
  end
  used, taken = used + size, taken + 1
  out[#out + 1] = f
  out[#out + 1] = redis.call('HGET', K.rows, f)
  out[#out + 1] = redis.call('HGET', K.last, f)
end
out[3] = #fields > taken and 1 or 0
return out
"""

# KEYS: one user's 7. ARGV: cutoff_ms, trim max, before (16 hex, '' for no bound), limit,
# budget, CONV overhead. {-1} when a batch of expired rows went and more remain (call again).
_BY_ACTIVITY = LuaScript(
    _COMMON
    + """
local K = user_keys(0)
total_of(K)
if trim(K, ARGV[1], tonumber(ARGV[2])) then
  return {-1}
end
local max = ARGV[3] == '' and '+' or '(' .. ARGV[3]
local members = redis.call('ZREVRANGEBYLEX', K.act, max, '-', 'LIMIT', 0, tonumber(ARGV[4]) + 1)
local fields = {}
for i = 1, #members do
  fields[i] = string.sub(members[i], 18)
end
"""
    + _PAGE_END
)

# As _BY_ACTIVITY, with ARGV[3] = since_version (decimal).
_CHANGES = LuaScript(
    _COMMON
    + """
local K = user_keys(0)
total_of(K)
if trim(K, ARGV[1], tonumber(ARGV[2])) then
  return {-1}
end
local fields = redis.call('ZRANGEBYSCORE', K.ver, '(' .. ARGV[3], '+inf',
  'LIMIT', 0, tonumber(ARGV[4]) + 1)
"""
    + _PAGE_END
)

# KEYS: rows, age. ARGV: cutoff_ms, then row fields. Reads only: the read_id (16 hex) of each
# row that is retained, else false.
_READ_POSITIONS = LuaScript(
    """
local cutoff = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local s = redis.call('HGET', KEYS[1], ARGV[i])
  local at = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[i]))
  if s and at and at >= cutoff then
    out[#out + 1] = string.sub(s, 17, 32)
  else
    out[#out + 1] = false
  end
end
return out
"""
)

SCRIPTS = (_CHANGE, _BY_ACTIVITY, _CHANGES, _READ_POSITIONS)

Entry = tuple[str, str, int | str]  # op, row field, message index or 16-hex msg_id


class RedisConversations:
    """ConversationStore on Redis. Each change of one user's list is part of one atomic
    script, so a row's version and its new state become visible in the same step."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        now_ms: Callable[[], int],
        retention_ms: int,
        *,
        ttl_margin_ms: int = DAY_MS,
        cluster: bool = False,
        max_tracked: int = MAX_UNREAD_TRACKED,
    ) -> None:
        """`retention_ms`: the history's; `cluster`: split multi-user scripts by slot."""
        check_binary(redis)
        self._redis = redis
        self._prefix = prefix
        self._now_ms = now_ms
        self._cluster = cluster
        self.retention_ms = retention_ms
        self.max_tracked = max_tracked
        # Real-time expiry of idle lists; the margin covers clock differences between the
        # servers' clocks (retention) and Redis' clock (TTL).
        self._ttl_ms = retention_ms + ttl_margin_ms

    def start(self) -> Deferred[None]:
        """Load the scripts (optional: an unknown script falls back to EVAL)."""
        return load_scripts(self._redis, SCRIPTS)

    def keys(self, user_id: int) -> list[str]:
        """The user's keys in NAMES order: one hash tag, hence one cluster slot."""
        base = f"{self._prefix}:conv:{{u{user_id}}}:"
        return [base + name for name in NAMES]

    def _cutoff(self) -> int:
        return self._now_ms() - self.retention_ms

    # ------------------------------------------------------------------ writes

    def record(self, jobs: Sequence[PersistJob]) -> Deferred[None]:
        messages: list[tuple[str, bytes]] = []
        entries: dict[int, list[Entry]] = {}
        for job in jobs:
            m = job.message
            messages.append((_hex(m.msg_id), job.stored_record))
            index = len(messages) - 1
            for user in dict.fromkeys(job.inbox_users):
                own = m.sender_id == user
                if m.conv_kind == ConvKind.GROUP:
                    field = _field(ConvKind.GROUP, m.conv_id)
                else:
                    field = _field(ConvKind.USER, m.conv_id if own else m.sender_id)
                entries.setdefault(user, []).append(("o" if own else "m", field, index))
                if not own and m.conv_kind != ConvKind.GROUP:  # the peer read what it answers
                    entries[user].append(("p", field, _hex(m.msg_id)))
        return self._change(entries, messages)

    def apply(self, jobs: Sequence[StateJob]) -> Deferred[None]:
        entries: dict[int, list[Entry]] = {}
        for job in jobs:
            field, msg = _field(job.conv_kind, job.conv_id), _hex(job.msg_id)
            if job.kind == StateJob.MARK:
                entries.setdefault(job.user_id, []).append(("r", field, msg))
                if job.conv_kind == ConvKind.USER and job.conv_id != job.user_id:
                    peer_field = _field(ConvKind.USER, job.user_id)
                    entries.setdefault(job.conv_id, []).append(("p", peer_field, msg))
            elif job.kind == StateJob.HIDE:
                entries.setdefault(job.user_id, []).append(("h", field, msg))
            else:
                raise ValueError(f"unknown state job kind {job.kind}")
        return self._change(entries, [])

    @as_deferred
    async def _change(
        self, entries: dict[int, list[Entry]], messages: list[tuple[str, bytes]]
    ) -> None:
        if not entries:
            return
        now = self._now_ms()
        head = [now, now - self.retention_ms, self._ttl_ms, CHANGE_TRIM, self.max_tracked]
        # Many users per script call, at most CHANGE_ENTRIES changes per call (one user's
        # always in one call, so they apply in order), split by slot on Redis Cluster.
        calls: list[list[int]] = []
        for group in slot_groups(sorted(entries), self._slot_key, self._cluster):
            size = CHANGE_ENTRIES
            for user in group:
                if size + len(entries[user]) > CHANGE_ENTRIES:
                    calls.append([])
                    size = 0
                calls[-1].append(user)
                size += len(entries[user])
        for i in range(0, len(calls), CHANGE_WINDOW):
            await gather(
                self._change_call(users, entries, messages, head)
                for users in calls[i : i + CHANGE_WINDOW]
            )

    def _change_call(
        self,
        users: list[int],
        entries: dict[int, list[Entry]],
        messages: list[tuple[str, bytes]],
        head: list[Any],
    ) -> Deferred[Any]:
        used = sorted({v for u in users for _, _, v in entries[u] if isinstance(v, int)})
        local = {i: n for n, i in enumerate(used, 1)}
        keys: list[str] = []
        args: list[Any] = [*head, len(used)]
        for i in used:
            args.extend(messages[i])
        for user in users:
            keys.extend(self.keys(user))
            args.append(len(entries[user]))
            for op, field, value in entries[user]:
                args.extend((op, field, local[value] if isinstance(value, int) else value))
        return _CHANGE(self._redis, keys, args)

    def _slot_key(self, user_id: int) -> str:
        return self.keys(user_id)[0]

    # ------------------------------------------------------------------ reads

    def by_activity(
        self, user_id: int, before_id: int, limit: int, max_bytes: int
    ) -> Deferred[ConvRows]:
        bound = _hex(before_id) if before_id else ""
        return self._page(_BY_ACTIVITY, user_id, bound, limit, max_bytes, changes=False)

    def changes(
        self, user_id: int, since_version: int, limit: int, max_bytes: int
    ) -> Deferred[ConvRows]:
        return self._page(_CHANGES, user_id, str(since_version), limit, max_bytes, changes=True)

    @as_deferred
    async def _page(
        self, script: LuaScript, user_id: int, bound: str, limit: int, max_bytes: int,
        *, changes: bool,
    ) -> ConvRows:  # fmt: skip
        limit = min(max(0, limit), MAX_PAGE)
        while True:
            args = [self._cutoff(), READ_TRIM, bound, limit, max_bytes, CONV_OVERHEAD]
            reply = await script(self._redis, self.keys(user_id), args)
            if reply[0] != -1:
                break  # else a batch of expired rows went; the rest goes on the next call
        version, total, has_more, *flat = reply
        convs = tuple(
            _row(f, s, r, user_id)
            for f, s, r in zip(flat[0::3], flat[1::3], flat[2::3], strict=True)
        )
        if changes and convs:
            version = convs[-1].version
        return ConvRows(int(version), bool(has_more), max(0, int(total)), convs)

    def read_positions(
        self, user_id: int, convs: Sequence[tuple[int, int]]
    ) -> Deferred[dict[tuple[int, int], int]]:
        wanted = list(dict.fromkeys(convs))
        out: dict[tuple[int, int], int] = {}
        if not wanted:
            d: Deferred[dict[tuple[int, int], int]] = Deferred()
            d.callback(out)
            return d
        _, rows, *_, age = self.keys(user_id)
        args = [self._cutoff(), *(_field(k, c) for k, c in wanted)]

        def positions(reply: list[bytes | None]) -> dict[tuple[int, int], int]:
            for conv, read in zip(wanted, reply, strict=True):
                if read is not None and int(read, 16):
                    out[conv] = int(read, 16)
            return out

        return _READ_POSITIONS(self._redis, [rows, age], args).addCallback(positions)


def _hex(value: int) -> str:
    return f"{value:016x}"


def _field(conv_kind: int, conv_id: int) -> str:
    return f"{int(conv_kind)}:{conv_id:016x}"


def _row(field: bytes, state: bytes | None, stored: bytes | None, user_id: int) -> ConvState:
    """A ConvState from a row's field, packed state and stored last record."""
    if state is None:
        raise RuntimeError(f"conversations of user {user_id}: row {field!r} has no state")
    kind, conv = field.split(b":")
    version, unread = state[65:].split(b":")
    last_id = int(state[0:16], 16)
    last = None
    if stored is not None:
        try:
            last = record_of_stored(stored)
        except CorruptRecord as e:
            raise RuntimeError(f"conversations of user {user_id}: {e}") from None
    return ConvState(
        conv_kind=int(kind), conv_id=int(conv, 16), version=int(version),
        hidden=state[64:65] == b"1", read_id=int(state[16:32], 16),
        peer_read_id=int(state[32:48], 16), unread=int(unread), last_id=last_id, last=last,
    )  # fmt: skip
