"""Conversation lists on Redis (the ConversationStore port), through txredisapi.

Key layout (P = the prefix; R = a row's field, `<conv_kind>:<16 hex conv_id>`, the
conversation as the user sees it). Every key of one user carries the hash tag `{u<user_id>}`,
so in Redis Cluster a user's list lives in one slot; a batch changes many users' rows in one
script call, split by slot first with `cluster=True` (a 1:1 read mark changes two users' rows:
the reader's and the peer's, two slots):

    P:conv:{u<id>}:meta  hash  ver: the user's last list version; total: the sum of unread
                               over the rows not hidden; old: a lower bound of the scores in
                               age (absent: unknown), so a change probes for expired rows only
                               when one may be due; fold: the inbox cursor the rows are folded
                               to (absent: 0, never folded). No TTL (see below).
    P:conv:{u<id>}:rows  hash  R -> the row's state: last_id, read_id, peer_read_id, the
                               newest hide's msg_id (16 hex digits each), hidden (0/1), then
                               "version:unread:ms" (decimal; ms as in age).
    P:conv:{u<id>}:last  hash  R -> the last message's stored record (improto.records: a
                               storage format byte, then the MESSAGE record).
    P:conv:{u<id>}:unr   zset  "R:<16 hex msg_id>" (score 0): the unread ids counted, at most
                               MAX_UNREAD_TRACKED per row (one lex range per row); a row
                               tracks at most its unread count of them.
    P:conv:{u<id>}:ver   zset  R -> version: CONV_CHANGES in version order.
    P:conv:{u<id>}:act   zset  "<16 hex last_id>:R" (score 0) of the rows not hidden:
                               CONV_LIST in last_id order (ZREVRANGEBYLEX; rows without a
                               message have last_id 0, so they come last).
    P:conv:{u<id>}:age   zset  R -> the ms (injected clock) of the row's last change.

    P:conv:behind        set   users whose inbox may hold entries above their fold: no
                               user's key (one set; on Redis Cluster one per slot, see
                               redis_inbox.behind_key). The inbox append adds the users it
                               gave an entry, a fold up to the inbox's seq removes the user;
                               it expires with the inbox entries it names.

Rows follow the inbox: the persister does not write rows per message; `fold` brings a user's
rows up to its inbox entries (P:inbox:{u<id>}:ent/rec, redis_inbox.inbox_keys), applying the
entries above `fold` as `record` would, coalesced (one row write per conversation per fold,
not per message). A fold reads (one read-only script), builds the ops in Python, then applies
them with a compare-and-set on `fold` in the change script, so two folds of one user at once
never apply an entry twice: the loser changes nothing and reads again. The behind set is the
recovery list: a persister that stopped with users unfolded folds `behind()` when it starts.
No record crosses the wire twice: the read returns per entry its msg_id and a 17-byte head
(sender, conv_kind, conv_id: what decides its op and row, read from the stored record in
Lua); Python makes one op per (user, row) from them, the ops and rows worked out once per
distinct head; the change script takes each row's new last record from the user's inbox
itself (rec is in the user's slot). Only a record in an older format goes through Python
(converted, and shipped to the change as `record` ships them).

msg_ids and user ids are u64: they are fixed-width hex in members and fields (so lex order is
numeric order; scripts compare them in two exact 32-bit halves), never Lua numbers. Scores
hold versions and milliseconds only. Unread is counted as in the embedded store (ids tracked
to count each message once; beyond MAX_UNREAD_TRACKED the oldest are counted, not tracked),
and a batch gives each visibly changed row one version, in the order the rows were first
touched, so both backends answer alike.

Retention: a row lives `retention_ms` (the history's) after its last change, by the injected
clock: every script first removes the user's expired rows (bounded per call; a read calls
again until none is left), so what is served never depends on Redis' own expiry. rows, last,
unr, ver, act and age share one deadline and vanish together once every row has expired: a
script that writes the user's list gives them all PEXPIRE retention + margin when less than
retention + margin / 2 is left on rows (or rows had none), else gives the keys it may have
created (unr, act, last) the rows' deadline. meta has no TTL: versions must never go back (a
client holding version V asks for the changes since V; a list restarting at 1 would hide
versions up to V from it; `fold` must not go back either, or entries would apply twice), and
it stays four small integers per user. A script that finds rows gone resets total to 0.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, succeed

from improto.enums import ConvKind
from improto.records import (
    CONV_OVERHEAD,
    STORE_FORMAT,
    CorruptRecord,
    conversation_of,
    record_of_stored,
)
from improto.records import stored as stored_form
from improto_server.config import DAY_MS
from improto_server.deferreds import as_deferred
from improto_server.model import (
    FOLD_ENTRIES,
    MAX_UNREAD_TRACKED,
    ConvRows,
    ConvState,
    PersistJob,
    StateJob,
)
from improto_server.production.redis_connection import (
    LuaScript,
    RedisClient,
    check_binary,
    gather,
    load_scripts,
)
from improto_server.production.redis_inbox import behind_key, behind_slot_key, inbox_keys
from improto_server.production.redis_slots import SLOTS, script_calls, slot_chunks

CHANGE_WINDOW = 64  # change scripts in flight at once for one batch (pipelined)
CHANGE_ENTRIES = 2048  # row changes one script applies at most: bounds Redis' pause
CHANGE_TRIM = 64  # expired rows a change removes in passing
READ_TRIM = 1000  # expired rows one read call removes: bounds the time Redis is blocked
MAX_PAGE = 1000  # rows one page returns at most ("at most limit"; has_more stays exact)
FOLD_USERS = 128  # users one fold read script reads at most
FOLD_READ = CHANGE_ENTRIES  # entries one fold read reads (then only whole users' left out)
FOLD_READ_BYTES = 1 << 20  # record bytes one fold read copies (about): bounds Redis' pause
FOLD_RETRIES = 2  # re-reads of a user whose fold lost to another fold, in one call
BEHIND_WINDOW = 1024  # behind sets counted at once (Redis Cluster: one per slot)
NAMES = ("meta", "rows", "last", "unr", "ver", "act", "age")

# --------------------------------------------------------------------------- scripts
# KEYS of one user, in NAMES order (7 per user; user_keys(b): those from KEYS[b + 1]).

_COMMON = """
local ZERO = '0000000000000000'
local sub = string.sub

-- a < b for two u64s written as 16 lowercase hex digits (two exact 32-bit halves; ids close
-- in time share the high one).
local function lt(a, b)
  if a == b then
    return false
  end
  local ah, bh = sub(a, 1, 8), sub(b, 1, 8)
  if ah == bh then
    return tonumber(sub(a, 9), 16) < tonumber(sub(b, 9), 16)
  end
  return tonumber(ah, 16) < tonumber(bh, 16)
end

local function user_keys(b)
  return {meta = KEYS[b + 1], rows = KEYS[b + 2], last = KEYS[b + 3], unr = KEYS[b + 4],
    ver_key = KEYS[b + 5], act = KEYS[b + 6], age = KEYS[b + 7]}
end

-- A row's state: last_id, read_id, peer_read_id, hide (16 hex each), hidden (0/1), then
-- "version:unread:ms" (ms: the row's last change; absent in rows written before it was kept).
local function load(K, f)
  local s = redis.call('HGET', K.rows, f)
  if not s then
    return nil
  end
  local ver, unread, at = string.match(s, '^(%d+):(%d+):?(%d*)$', 66)
  return {last = string.sub(s, 1, 16), read = string.sub(s, 17, 32),
    peer = string.sub(s, 33, 48), hide = string.sub(s, 49, 64),
    hidden = string.sub(s, 65, 65) == '1', ver = tonumber(ver), unread = tonumber(unread),
    at = tonumber(at)}
end

-- The lex range of one row's tracked unread ids in unr.
local function lo(f)
  return '[' .. f .. ':'
end
local function hi(f)
  return '(' .. f .. ';'
end

-- The user's version, total and `old` (a lower bound of the oldest change in age, nil if
-- unknown), kept in memory (K.ver, K.t, K.old) until flush; the total is reset when the rows
-- are gone (all of them expired in Redis at once). probe: K.pttl := the rows' PTTL.
local function total_of(K, probe)
  local m = redis.call('HMGET', K.meta, 'ver', 'total', 'old')
  K.ver = tonumber(m[1]) or 0
  K.t = tonumber(m[2]) or 0
  K.old = tonumber(m[3])
  K.ver0, K.t0, K.old0 = K.ver, K.t, K.old
  if probe then
    K.pttl = redis.call('PTTL', K.rows)
    if K.pttl == -2 then
      K.t = 0
    end
  elseif K.t ~= 0 and redis.call('EXISTS', K.rows) == 0 then
    K.t = 0
  end
end

local function add_total(K, delta)
  K.t = K.t + delta
  if K.t < 0 then
    K.t = 0
  end
end

local function flush(K)
  local a = {}
  if K.ver ~= K.ver0 then
    a[#a + 1] = 'ver'
    a[#a + 1] = string.format('%d', K.ver)
  end
  if K.t ~= K.t0 then
    a[#a + 1] = 'total'
    a[#a + 1] = string.format('%d', K.t)
  end
  if K.old ~= K.old0 then
    if K.old then
      a[#a + 1] = 'old'
      a[#a + 1] = string.format('%d', K.old)
    else
      redis.call('HDEL', K.meta, 'old')
    end
  end
  if #a > 0 then
    redis.call('HSET', K.meta, unpack(a))
  end
  K.ver0, K.t0, K.old0 = K.ver, K.t, K.old
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
    redis.call('ZREM', K.ver_key, f)
    K.dropped = true
    redis.call('ZREMRANGEBYLEX', K.unr, lo(f), hi(f))
  end
  redis.call('ZREM', K.age, f)
end

-- Remove up to `max` rows whose last change is before `cutoff`; true if more remain. Nothing
-- to do while `old` is not before it; else K.old := the oldest change left (nil: none).
local function trim(K, cutoff, max)
  if K.old and K.old >= tonumber(cutoff) then
    return false
  end
  local old = redis.call('ZRANGEBYSCORE', K.age, '-inf', '(' .. cutoff, 'LIMIT', 0, max + 1)
  for i = 1, math.min(#old, max) do
    drop(K, old[i])
  end
  if #old > max then
    return true
  end
  K.old = tonumber(redis.call('ZRANGE', K.age, 0, 0, 'WITHSCORES')[2])
  return false
end
"""

# KEYS: for each user its 7, then (a fold, below) its inbox meta and inbox rec; last, when the
# call folds, the behind set of the call's slot. ARGV: now_ms, cutoff_ms, ttl_ms, trim max, max
# tracked, refresh_ms (the PTTL below which the TTL is extended), the number of messages M,
# then M (16-hex msg_id, stored record) pairs, then for each user: its compare-and-set, then a
# count k and k (op, row field, value) triples, applied in order. The compare-and-set is '-'
# (none: record, apply) or, for a fold, the fold it read (decimal), the fold to set and the
# user id: a user whose meta fold is no longer the one read (another fold won) is left
# untouched and named in the reply; else its ops apply, fold is set, and the user leaves the
# behind set when the fold reaches its inbox's seq (an entry appended since keeps it there).
# op: 'o' messages of the user's own (value: their 1-based message indexes, space-separated,
# in order), 'm' messages from others in a group (indexes), 'q' messages from the peer (1:1:
# they also move peer_read_id), 'r' a read mark, 'p' the peer's read mark (1:1), 'h' a hide
# (value: the 16-hex msg_id for these three). A fold gives each row one op, 'f' (a fold's
# only op), value: "<newest> <source> <tokens>": the row's newest message's 16-hex msg_id and
# the source of its stored record (its decimal msg_id, a field of the inbox rec, or '#' and
# its message index: an older format, stored again by the caller), then a 17-character token
# per message, in order: its 16-hex msg_id and its op ('o', 'm' or 'q', as above). So a fold
# ships no records (but older formats): the script takes them from the inbox. The sources are
# read before anything of the user changes; one gone from the inbox since the fold's read
# (trimmed) leaves the user untouched and named in the reply, as a lost compare-and-set does
# (its fold reads again).
# A user's rows are changed in memory in order, then each visibly changed row is written once
# with the user's next version (so a batch gives a row one version, as the embedded store
# does); a row whose hide alone moved is written without one. Returns the users whose
# compare-and-set failed or whose sources were gone (decimal ids).
_CHANGE = LuaScript(
    _COMMON
    + """
local function save(K, f, r, now)
  redis.call('HSET', K.rows, f, r.last .. r.read .. r.peer .. r.hide
    .. (r.hidden and '1' or '0') .. r.ver .. ':' .. r.unread .. ':' .. now)
end

-- A message `m` from another user, counted once (one at a time: the reference). With the
-- tracked ids full, one older than all of them may have been counted and dropped already:
-- it is not counted.
local function count_one(K, f, r, m, maxt)
  if redis.call('ZSCORE', K.unr, f .. ':' .. m) then
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
  if n == 0 then
    K.unr_new = true
  end
  redis.call('ZADD', K.unr, 0, f .. ':' .. m)
  r.unread = r.unread + 1
  if n + 1 > maxt then
    redis.call('ZREM', K.unr, low)  -- still counted, no longer tracked
  end
end

-- The row's pending messages from others (r.pend, msg_ids above read_id, in order) are
-- counted as count_one would one after the other, in fewer commands: below maxt unread the
-- tracked ids (at most unread) cannot fill, so one ZADD NX decides; beyond, ids rising in
-- order above every tracked one are each the newest when added, so all are counted and
-- the oldest beyond maxt dropped. Anything else goes one at a time.
local function settle(K, f, r)
  local p = r.pend
  if not p then
    return
  end
  r.pend = nil
  local maxt = K.maxt
  if r.unread == 0 then
    K.unr_new = true  -- the key may be created here (no TTL yet)
  end
  if r.unread + #p < maxt then
    local args = {}
    for i = 1, #p do
      args[2 * i - 1] = 0
      args[2 * i] = f .. ':' .. p[i]
    end
    r.unread = r.unread + redis.call('ZADD', K.unr, 'NX', unpack(args))
    return
  end
  local rising = true
  for i = 2, #p do
    if not lt(p[i - 1], p[i]) then
      rising = false
      break
    end
  end
  if rising then
    local top = redis.call('ZREVRANGEBYLEX', K.unr, hi(f), lo(f), 'LIMIT', 0, 1)[1]
    if top and not lt(string.sub(top, #f + 2), p[1]) then
      rising = false
    end
  end
  if not rising then
    for i = 1, #p do
      count_one(K, f, r, p[i], maxt)
    end
    return
  end
  -- Of the tracked and the pending ids together the newest maxt stay tracked: pending ones
  -- that would be dropped at once are not added, and the oldest tracked ones go by rank (every
  -- score is 0, so rank order is lex order, and the row's ids are one run of it). Added
  -- first: removing first could empty the key, and ZADD would make it again without a TTL.
  local keep = math.min(#p, maxt)
  local args = {}
  for i = #p - keep + 1, #p do
    args[#args + 1] = 0
    args[#args + 1] = f .. ':' .. p[i]
  end
  redis.call('ZADD', K.unr, unpack(args))
  local drop = redis.call('ZLEXCOUNT', K.unr, lo(f), hi(f)) - maxt
  if drop > 0 then  -- still counted, no longer tracked: the oldest, all of them tracked before
    local first = redis.call('ZLEXCOUNT', K.unr, '-', '(' .. f .. ':')
    redis.call('ZREMRANGEBYRANK', K.unr, first, first + drop - 1)
  end
  r.unread = r.unread + #p
end

-- read_id := max(read_id, m); the tracked ids at or below it are read. The untracked ones
-- are older than every tracked id: if a tracked one is read, so are they (else they stay).
-- Tracked ids are counted too (at most unread of them): none to read while unread is 0.
local function read_to(K, f, r, m)
  if not lt(r.read, m) then
    return
  end
  settle(K, f, r)
  r.read = m
  if r.unread > 0 and redis.call('ZREMRANGEBYLEX', K.unr, lo(f), '[' .. f .. ':' .. m) > 0 then
    r.unread = redis.call('ZLEXCOUNT', K.unr, lo(f), hi(f))
  end
end

local function count_unread(r, m)
  if lt(r.read, m) then
    local p = r.pend
    if not p then
      p = {}
      r.pend = p
    end
    p[#p + 1] = m
  end
end

local function copy(r)
  local c = {}
  for k, v in pairs(r) do
    c[k] = v
  end
  return c
end

local now, cutoff, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local nowms = tonumber(now)
local trimmax, maxt, refresh = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local base = 8
local pos = base + 2 * tonumber(ARGV[7])

-- Message m (16 hex) on row f (r its state) of op 'o', 'm' or 'q', but for the row's last
-- message and hide (the caller's).
local function count(K, f, r, op, m)
  if op == 'o' then
    read_to(K, f, r, m)  -- one has read what one answers
  else
    count_unread(r, m)
    if op == 'q' and lt(r.peer, m) then  -- 1:1: the peer read what it answers
      r.peer = m
    end
  end
end

-- A fold's ops at ARGV[pos] (k, then k triples): K.src := row field -> the stored record of
-- the row's newest message, from the inbox rec (K.rec) or the message table; false if one
-- has left the inbox.
local function sources(K, pos)
  K.src = {}
  for i = pos + 1, pos + 3 * tonumber(ARGV[pos]), 3 do
    local v = ARGV[i + 2]
    local src = sub(v, 18, string.find(v, ' ', 18, true) - 1)
    local rec
    if sub(src, 1, 1) == '#' then
      rec = ARGV[base + 2 * tonumber(sub(src, 2)) - 1]
    else
      rec = redis.call('HGET', K.rec, src)
    end
    if not rec then
      return false
    end
    K.src[ARGV[i + 1]] = rec
  end
  return true
end

-- Apply one user's ops (from ARGV[pos]: k, then k triples); returns the position after them.
local function change(K, pos)
  total_of(K, true)
  K.maxt = maxt
  local more = trim(K, ARGV[2], trimmax)
  local due = not K.old or K.old < cutoff  -- rows left expired by a bounded trim
  local rows, order = {}, {}
  local k = tonumber(ARGV[pos])
  for i = pos + 1, pos + 3 * k, 3 do
    local op, f, v = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local c = rows[f]
    if not c then
      local before = load(K, f)
      if before and due then
        local at = before.at or tonumber(redis.call('ZSCORE', K.age, f))
        if at and at < cutoff then
          drop(K, f)  -- expired, left by a bounded trim: a new row starts
          before = nil
        end
      end
      local r = before and copy(before) or {last = ZERO, read = ZERO, peer = ZERO,
        hide = ZERO, hidden = false, ver = 0, unread = 0}
      c = {r = r, before = before, rec = false}
      rows[f] = c
      order[#order + 1] = f
    end
    local r = c.r
    if op == 'f' then  -- a fold's messages on the row, the newest first
      local newest = sub(v, 1, 16)
      if lt(r.last, newest) then
        r.last = newest
        c.rec = K.src[f]
      end
      if r.hidden and lt(r.hide, newest) then
        r.hidden = false
      end
      for j = string.find(v, ' ', 18, true) + 1, #v, 17 do
        count(K, f, r, sub(v, j + 16, j + 16), sub(v, j, j + 15))
      end
    elseif op == 'o' or op == 'm' or op == 'q' then
      for index in string.gmatch(v, '%d+') do  -- a run of messages, in order
        local at = base + 2 * tonumber(index) - 2
        local m = ARGV[at]
        if lt(r.last, m) then
          r.last = m
          c.rec = ARGV[at + 1]
        end
        if r.hidden and lt(r.hide, m) then
          r.hidden = false
        end
        count(K, f, r, op, m)
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
  for _, f in ipairs(order) do
    settle(K, f, rows[f].r)
  end
  local written, last_new, act_new = false, false, false
  for _, f in ipairs(order) do
    local c = rows[f]
    local r, b = c.r, c.before
    local visible = not b or b.hidden ~= r.hidden or b.read ~= r.read or b.peer ~= r.peer
      or b.unread ~= r.unread or b.last ~= r.last
    if visible or b.hide ~= r.hide then
      if visible then
        K.ver = K.ver + 1
        r.ver = K.ver
        redis.call('ZADD', K.ver_key, r.ver, f)
      end
      save(K, f, r, now)
      redis.call('ZADD', K.age, now, f)
      if K.old and K.old > nowms then
        K.old = nowms  -- a clock behind: old stays a lower bound
      end
      if c.rec then
        -- the row had a record already if it had a message: else the key may be new
        last_new = last_new or not b or b.last == ZERO
        redis.call('HSET', K.last, f, c.rec)
      end
      local was_hidden = not b or b.hidden  -- a new row is in no list yet
      add_total(K, (r.hidden and 0 or r.unread) - (was_hidden and 0 or b.unread))
      -- add before removing: act holding the row's old member cannot vanish in between
      if not r.hidden and (was_hidden or b.last ~= r.last) then
        act_new = act_new or was_hidden
        redis.call('ZADD', K.act, 0, r.last .. ':' .. f)
      end
      if not was_hidden and (r.hidden or b.last ~= r.last) then
        redis.call('ZREM', K.act, b.last .. ':' .. f)
      end
      written = true
    end
  end
  if written then
    -- One deadline for all of them (meta excepted), extended to ttl when less than
    -- `refresh` is left. rows, ver and age exist (and empty) together; unr, act and last
    -- may have been created here (without a TTL): they get the rows' deadline.
    if not K.old and not more then
      K.old = nowms  -- age was empty
    end
    local left = K.pttl  -- at the start; a drop may have deleted the keys since
    if left < refresh or K.dropped then
      for _, key in ipairs({K.rows, K.last, K.unr, K.ver_key, K.act, K.age}) do
        redis.call('PEXPIRE', key, ttl)
      end
    else
      if K.unr_new then
        redis.call('PEXPIRE', K.unr, left)
      end
      if last_new then
        redis.call('PEXPIRE', K.last, left)
      end
      if act_new then
        redis.call('PEXPIRE', K.act, left)
      end
    end
  end
  flush(K)
  return pos
end

local lost = {}
local kp = 0  -- the KEYS taken so far
while pos <= #ARGV do
  local K = user_keys(kp)
  kp = kp + 7
  local expected, fold_to, user, seq_key = ARGV[pos], nil, nil, nil
  pos = pos + 1
  if expected ~= '-' then
    fold_to, user, seq_key, K.rec = ARGV[pos], ARGV[pos + 1], KEYS[kp + 1], KEYS[kp + 2]
    pos = pos + 2
    kp = kp + 2
  end
  if fold_to and ((tonumber(redis.call('HGET', K.meta, 'fold')) or 0) ~= tonumber(expected)
      or not sources(K, pos)) then
    lost[#lost + 1] = user  -- another fold won (it applied these entries), or one is gone
    pos = pos + 3 * tonumber(ARGV[pos]) + 1
  else
    pos = change(K, pos)
    if fold_to then
      redis.call('HSET', K.meta, 'fold', fold_to)
      if tonumber(fold_to) >= (tonumber(redis.call('HGET', seq_key, 'seq')) or 0) then
        redis.call('SREM', KEYS[#KEYS], user)
      end
    end
  end
end
return lost
"""
)

# The end of a page script: `fields` (up to limit + 1 candidates, in page order) become
# {version, total, has_more, field1, state1, record1, ...} while the CONV records fit the
# budget (at least one), reading no record that does not fit.
_PAGE_END = """
local limit, budget, overhead = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local out = {K.ver, K.t, 0}  -- total_of, then flush
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
local more = trim(K, ARGV[1], tonumber(ARGV[2]))
flush(K)
if more then
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
local more = trim(K, ARGV[1], tonumber(ARGV[2]))
flush(K)
if more then
  return {-1}
end
local fields = redis.call('ZRANGEBYSCORE', K.ver_key, '(' .. ARGV[3], '+inf',
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

# KEYS: 4 per user: its conv meta, inbox meta, inbox ent, inbox rec. ARGV: entries per user
# (at most), entries per call, the storage format byte (STORE_FORMAT), record bytes per call.
# Reads only. For each user while fewer than `entries per call` entries and `record bytes per
# call` bytes of records were read (so at least the first user and its first entry): fold
# (the meta's, '0' if absent), the inbox's seq ('0' if absent), `to` (the fold to set: seq,
# or when entries are left above those returned the cursor of the last one), left (1 if so,
# else 0), a count n, then the n entries above fold (at most `entries per user`) in cursor
# order as two strings: their msg_ids (decimal, space-separated) and their heads (HEAD.size
# bytes each: sender_id u64, conv_kind u8, conv_id u64 of the stored record), then a count
# k and k (0-based entry index, whole stored record or nil) pairs for the entries whose
# record is not a whole one in the current format (an older format, or broken: their head
# is 17 zero bytes). The users left out (at the end) are read by another call.
_FOLD_READ = LuaScript(
    """
local limit, budget, format = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local max_bytes = tonumber(ARGV[4])
local sub = string.sub
local PAD = string.rep('\\0', 17)
local out, used, bytes, seen = {}, 0, 0, {}  -- seen: stored record -> its head
for b = 0, #KEYS - 4, 4 do
  if used >= budget or bytes >= max_bytes then
    break
  end
  local fold = redis.call('HGET', KEYS[b + 1], 'fold') or '0'
  local seq = redis.call('HGET', KEYS[b + 2], 'seq') or '0'
  local ids = redis.call('ZRANGEBYSCORE', KEYS[b + 3], '(' .. fold, '+inf', 'LIMIT', 0,
    limit + 1)  -- one more: are entries left?
  local read = #ids
  local n, to, left = math.min(read, limit), seq, 0
  -- Whole records are copied to read their heads: one at a time, so that one call copies
  -- about max_bytes at most and Redis is not blocked by a run of large messages.
  local recs = {}
  for i = 1, n do
    local s = redis.call('HGET', KEYS[b + 4], ids[i])
    recs[i] = s
    if s then
      bytes = bytes + #s
    end
    if bytes >= max_bytes then
      n = i
      break
    end
  end
  if read > n then
    for i = read, n + 1, -1 do
      ids[i] = nil
    end
    to, left = redis.call('ZSCORE', KEYS[b + 3], ids[n]), 1
  end
  local heads, other = {}, {}
  if n > 0 then
    for i = 1, n do
      -- format byte, msg_id, server_time, sender_id @18, device length d @26, device,
      -- conv_kind @27+d, conv_id, content_type, client_msg_id, body length @54+d, body
      local s = recs[i]
      local head = s and seen[s]  -- a group's message, read for another member already
      if s and not head and sub(s, 1, 1) == format then
        local d = string.byte(s, 26) or 0
        local hi, lo = string.byte(s, 54 + d, 55 + d)
        if lo and #s == 55 + d + hi * 256 + lo then
          head = sub(s, 18, 25) .. sub(s, 27 + d, 35 + d)
          seen[s] = head
        end
      end
      if head then
        heads[i] = head
      else
        heads[i] = PAD
        other[#other + 1] = i - 1
        other[#other + 1] = s
      end
    end
  end
  out[#out + 1] = fold
  out[#out + 1] = seq
  out[#out + 1] = to
  out[#out + 1] = left
  out[#out + 1] = n
  out[#out + 1] = table.concat(ids, ' ')
  out[#out + 1] = table.concat(heads)
  out[#out + 1] = #other / 2
  for i = 1, #other do
    out[#out + 1] = other[i]
  end
  used = used + read
end
return out
"""
)

# KEYS: rows, last, age. ARGV: cutoff_ms, then row fields. Reads only: for each field, the
# row's state and its stored last record (false when absent), or false, false for a row that
# is absent or past retention.
_ROWS = LuaScript(
    """
local cutoff = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local s = redis.call('HGET', KEYS[1], ARGV[i])
  local at = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[i]))
  if s and at and at >= cutoff then
    out[#out + 1] = s
    out[#out + 1] = redis.call('HGET', KEYS[2], ARGV[i])
  else
    out[#out + 1] = false
    out[#out + 1] = false
  end
end
return out
"""
)

SCRIPTS = (_CHANGE, _BY_ACTIVITY, _CHANGES, _READ_POSITIONS, _FOLD_READ, _ROWS)


class _FoldRow(NamedTuple):
    """A fold's messages on one row (op 'f'): the newest one's msg_id (16 hex) and the
    source of its stored record (its decimal msg_id, a field of the inbox rec, or for an
    older format stored again here its index in the call's messages), then their tokens
    (16-hex msg_id, then the op letter, each) in order."""

    newest: str
    source: str | int
    tokens: str


Entry = tuple[str, str, int | str | _FoldRow]  # op, row field, message index, msg_id or row
Cas = tuple[int, int]  # a fold's compare-and-set: the fold read, the fold to set
HEAD = struct.Struct(">QBQ")  # an entry's head in a fold read: sender_id, conv_kind, conv_id


@dataclass
class _Folding:
    """What a fold read of one user found: its fold, its inbox's seq, the fold to set (`to`:
    seq unless entries are `left` beyond those read), and the entries above `fold`: their
    msg_ids (decimal), heads (HEAD.size bytes each) and, by entry index, the stored records
    whose head could not be read in Redis (older formats; None: no record)."""

    fold: int
    seq: int
    to: int
    left: bool
    ids: list[bytes]
    heads: bytes
    others: dict[int, bytes | None]


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
        self._ttl_margin_ms = ttl_margin_ms

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

    @as_deferred
    async def record(self, jobs: Sequence[PersistJob]) -> None:
        messages: list[tuple[str, bytes]] = []
        entries: dict[int, list[Entry]] = {}
        for job in jobs:
            m = job.message
            messages.append((_hex(m.msg_id), job.stored_record))
            index = len(messages) - 1
            for user in dict.fromkeys(job.inbox_users):
                op, field = _message_op(user, m.sender_id, m.conv_kind, m.conv_id)
                entries.setdefault(user, []).append((op, field, index))
        await self._change(entries, messages)

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
        return self._change(entries, []).addCallback(lambda _: None)

    @as_deferred
    async def _change(
        self,
        entries: dict[int, list[Entry]],
        messages: list[tuple[str, bytes]],
        cas: dict[int, Cas] | None = None,
        sizes: Mapping[int, Sized] | None = None,
    ) -> list[int]:
        """Apply `entries` (user -> ops); `cas`: every user's fold compare-and-set (a fold);
        `sizes`: user -> its messages (their count bounds the calls), if not one per op.
        Returns the users whose compare-and-set failed (or whose rows' newest records left
        the inbox since the fold's read): nothing of theirs changed."""
        lost: list[int] = []
        if not entries:
            return lost
        now = self._now_ms()
        # the lists' TTL is extended to ttl when less than ttl - margin / 2 is left
        refresh = self._ttl_ms - self._ttl_margin_ms // 2
        head = [now, now - self.retention_ms, self._ttl_ms, CHANGE_TRIM, self.max_tracked, refresh]
        # Many users per script call, at most CHANGE_ENTRIES changes per call (one user's
        # always in one call, so they apply in order), split by slot on Redis Cluster.
        calls = script_calls(sizes or entries, self._slot_key, self._cluster, CHANGE_ENTRIES)
        for i in range(0, len(calls), CHANGE_WINDOW):
            replies = await gather(
                self._change_call(users, entries, messages, head, cas)
                for users in calls[i : i + CHANGE_WINDOW]
            )
            lost.extend(int(user) for reply in replies for user in reply)
        return lost

    def _change_call(
        self,
        users: list[int],
        entries: dict[int, list[Entry]],
        messages: list[tuple[str, bytes]],
        head: list[Any],
        cas: dict[int, Cas] | None = None,
    ) -> Deferred[Any]:
        used: set[int] = set()
        for user in users:
            for _, _, v in entries[user]:
                if isinstance(v, _FoldRow):
                    if isinstance(v.source, int):
                        used.add(v.source)
                elif isinstance(v, int):
                    used.add(v)
        local = {i: n for n, i in enumerate(sorted(used), 1)}
        keys: list[str] = []
        args: list[Any] = [*head, len(local)]
        for i in local:
            args.extend(messages[i])
        for user in users:
            keys.extend(self.keys(user))
            if cas is None:
                args.append("-")
            else:
                meta, _, _, rec, *_ = inbox_keys(self._prefix, user)
                keys.extend((meta, rec))
                args.extend((cas[user][0], cas[user][1], user))
            # a run of messages of one op on one row goes as one entry: "i j k ..."
            ops: list[Any] = []
            for op, field, value in entries[user]:
                if isinstance(value, _FoldRow):
                    src = value.source
                    src = src if isinstance(src, str) else f"#{local[src]}"
                    ops.append([op, field, f"{value.newest} {src} {value.tokens}"])
                elif not isinstance(value, int):
                    ops.append([op, field, value])
                elif ops and ops[-1][0] == op and ops[-1][1] == field and op in "omq":
                    ops[-1][2] += f" {local[value]}"
                else:
                    ops.append([op, field, str(local[value])])
            args.append(len(ops))
            for entry in ops:
                args.extend(entry)
        if cas is not None:
            keys.append(behind_key(self._prefix, users[0], self._cluster))  # one slot per call
        return _CHANGE(self._redis, keys, args)

    def _slot_key(self, user_id: int) -> str:
        return self.keys(user_id)[0]

    # ------------------------------------------------------------------ folds

    @as_deferred
    async def fold(self, user_ids: Sequence[int], *, reader: bool = False) -> list[int]:
        """Apply each user's inbox entries above its fold as `record` applies their
        messages, FOLD_ENTRIES at most per user (the rest: the user is returned, still
        behind). A user never folded has fold 0 (meta without `fold`): its retained entries
        apply again, harmless as `record` is idempotent (the rows written by the persister
        before folds existed). The ops apply with a compare-and-set on fold, so a fold
        running at the same time (another process) never makes an entry apply twice: the
        loser reads again, FOLD_RETRIES times at most, then is returned as still behind (as
        is a user one of whose rows' newest records left the inbox between read and change).
        (`reader` changes nothing here: Redis has no queue of writes to jump.)"""
        behind: list[int] = []
        lost: dict[int, int] = {}  # user -> folds it lost
        todo = list(dict.fromkeys(user_ids))
        while todo:
            calls = slot_chunks(todo, self._slot_key, self._cluster, FOLD_USERS)
            todo = []
            for i in range(0, len(calls), CHANGE_WINDOW):
                window = calls[i : i + CHANGE_WINDOW]
                read: dict[int, _Folding] = {}
                for users, got in zip(
                    window, await gather(map(self._fold_read, window)), strict=True
                ):
                    read.update(got)
                    todo.extend(u for u in users if u not in got)  # left for another call
                more, beaten = await self._fold_apply(read)
                behind.extend(more)
                for user in beaten:
                    lost[user] = lost.get(user, 0) + 1
                    (todo if lost[user] <= FOLD_RETRIES else behind).append(user)
        return behind

    def _fold_read(self, users: list[int]) -> Deferred[dict[int, _Folding]]:
        keys: list[str] = []
        for user in users:
            meta, ent, _, rec, *_ = inbox_keys(self._prefix, user)
            keys.extend((self.keys(user)[0], meta, ent, rec))

        def parse(reply: list[Any]) -> dict[int, _Folding]:
            out: dict[int, _Folding] = {}
            at = 0
            for user in users:
                if at >= len(reply):
                    break  # the users read are a prefix of `users`
                fold, seq, to, left, _, ids, heads, k = reply[at : at + 8]
                others = reply[at + 8 : at + 8 + 2 * int(k)]
                at += 8 + 2 * int(k)
                out[user] = _Folding(
                    int(fold), int(seq), int(to), bool(int(left)), ids.split(), heads,
                    dict(zip(map(int, others[0::2]), others[1::2], strict=True)),
                )  # fmt: skip
            return out

        args = [FOLD_ENTRIES, FOLD_READ, _STORE_TAG, FOLD_READ_BYTES]
        return _FOLD_READ(self._redis, keys, args).addCallback(parse)

    async def _fold_apply(self, read: dict[int, _Folding]) -> tuple[list[int], list[int]]:
        """Apply what `read` found; returns the users with entries left (more than
        FOLD_ENTRIES) and the users whose compare-and-set failed. Each user's entries become
        one op per row ('f': the tokens of its messages, in order), the rows in the order
        they were first touched, as `record` orders its versions; a head's op and row are
        worked out once per user. Only records in an older format are shipped (stored
        again): the change script reads the others from the inbox."""
        messages: list[tuple[str, bytes]] = []  # the older formats' records, stored again
        index: dict[int, int] = {}  # msg_id -> its place in messages (one copy per call)
        older: dict[int, tuple[bytes, int, int, int]] = {}  # msg_id -> _stored_message
        entries: dict[int, list[Entry]] = {}
        sizes: dict[int, Sized] = {}
        cas: dict[int, Cas] = {}
        left: list[int] = []
        size = HEAD.size
        for user, got in read.items():
            if not got.ids and got.seq <= got.fold:
                continue  # nothing appended since its last fold: not in the behind set
            heads = got.heads
            keys: list[bytes | int] = [heads[i : i + size] for i in range(0, len(heads), size)]
            for i, data in got.others.items():
                keys[i] = i  # an older format: worked out from its record
                msg_id = int(got.ids[i])
                if msg_id not in older:
                    older[msg_id] = _stored_message(data, user)
            # each head's token format (16-hex msg_id, then the op) and row, once per user
            known = {
                key: _token_of(user, *(
                    older[int(got.ids[key])][1:] if isinstance(key, int) else HEAD.unpack(key)
                ))
                for key in set(keys)
            }  # fmt: skip
            rows: dict[str, list[str]] = {}  # row field -> its tokens, in order
            for key, text in zip(keys, got.ids, strict=True):
                form, field = known[key]
                token = form % int(text)
                row = rows.get(field)
                if row is None:
                    rows[field] = [token]
                else:
                    row.append(token)
            ops = entries[user] = []
            for field, row in rows.items():
                newest = max(row)[:16]  # tokens start with the msg_id: fixed-width hex
                msg_id = int(newest, 16)
                source: str | int = str(msg_id)
                if msg_id in older:
                    if msg_id not in index:
                        index[msg_id] = len(messages)
                        messages.append((newest, older[msg_id][0]))
                    source = index[msg_id]
                ops.append(("f", field, _FoldRow(newest, source, "".join(row))))
            sizes[user] = range(len(got.ids))  # its messages bound the calls
            cas[user] = (got.fold, got.to)
            if got.left:
                left.append(user)
        beaten = set(await self._change(entries, messages, cas, sizes))
        return [u for u in left if u not in beaten], sorted(beaten)

    @as_deferred
    async def behind(self) -> list[int]:
        """The members of the behind set(s): users an append gave an entry that no fold has
        reached yet. On Redis Cluster: every slot's set, counted BEHIND_WINDOW at a time."""
        if not self._cluster:
            keys = [behind_key(self._prefix, 0, False)]
        else:
            keys = []
            for first in range(0, SLOTS, BEHIND_WINDOW):
                window = [
                    behind_slot_key(self._prefix, s) for s in range(first, first + BEHIND_WINDOW)
                ]
                sizes = await gather(self._redis.execute_command("SCARD", k) for k in window)
                keys.extend(k for k, n in zip(window, sizes, strict=True) if n)
        users: dict[int, None] = {}
        for key in keys:
            cursor: bytes = b"0"
            while True:
                cursor, found = await self._redis.execute_command(
                    "SSCAN", key, cursor, "COUNT", 1000
                )
                users.update(dict.fromkeys(map(int, found)))
                if cursor == b"0":
                    break
        return list(users)

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

    def rows(
        self, user_id: int, convs: Sequence[tuple[int, int]]
    ) -> Deferred[dict[tuple[int, int], ConvState]]:
        wanted = list(dict.fromkeys(convs))
        if not wanted:
            return succeed({})
        fields = [_field(k, c) for k, c in wanted]
        _, rows, last, *_, age = self.keys(user_id)

        def found(reply: list[bytes | None]) -> dict[tuple[int, int], ConvState]:
            out = {}
            for conv, field, state, stored in zip(
                wanted, fields, reply[0::2], reply[1::2], strict=True
            ):
                if state is not None:
                    out[conv] = _row(field.encode(), state, stored, user_id)
            return out

        args = [self._cutoff(), *fields]
        return _ROWS(self._redis, [rows, last, age], args).addCallback(found)


def _hex(value: int) -> str:
    return f"{value:016x}"


def _message_op(user: int, sender: int, conv_kind: int, conv_id: int) -> tuple[str, str]:
    """The op and row field a message is for `user` (record, fold): 'o' the user's own, 'm'
    from another in a group, 'q' from the peer (1:1: who read what it answers, so the row's
    peer_read_id moves)."""
    own = sender == user
    if conv_kind == ConvKind.GROUP:
        return ("o" if own else "m"), _field(ConvKind.GROUP, conv_id)
    return ("o" if own else "q"), _field(ConvKind.USER, conv_id if own else sender)


def _token_of(user: int, sender: int, conv_kind: int, conv_id: int) -> tuple[str, str]:
    """A fold's token format for a message (its msg_id as 16 hex, then its op letter) and
    its row field, for `user`."""
    op, field = _message_op(user, sender, conv_kind, conv_id)
    return "%016x" + op, field


_STORE_TAG = bytes((STORE_FORMAT,))


def _stored_message(data: bytes | None, user_id: int) -> tuple[bytes, int, int, int]:
    """An inbox entry's stored record in the current storage format (as `record` keeps
    the last message), with its sender, conv_kind and conv_id."""
    if data is None:
        raise RuntimeError(f"fold of user {user_id}: an inbox entry has no record")
    try:
        if data[:1] == _STORE_TAG:
            return (data, *conversation_of(data[1:]))  # checks the record is whole
        record = record_of_stored(data)  # an older format: stored again as `record` would
        return (stored_form(record), *conversation_of(record))
    except CorruptRecord as e:
        raise RuntimeError(f"fold of user {user_id}: {e}") from None


def _field(conv_kind: int, conv_id: int) -> str:
    return f"{int(conv_kind)}:{conv_id:016x}"


def _row(field: bytes, state: bytes | None, stored: bytes | None, user_id: int) -> ConvState:
    """A ConvState from a row's field, packed state and stored last record."""
    if state is None:
        raise RuntimeError(f"conversations of user {user_id}: row {field!r} has no state")
    kind, conv = field.split(b":")
    version, unread = state[65:].split(b":")[:2]
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
        hide_id=int(state[48:64], 16),
    )  # fmt: skip
