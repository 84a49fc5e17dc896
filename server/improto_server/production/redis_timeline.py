"""The Redis half of the production TimelineStore (production/timeline.py): each large group's
seq counter, its done mark and head, and the msg_id index that keeps redelivered messages on
their seq and places read marks.

Key layout (P = the prefix). Both keys of one group carry the hash tag `{g<group_id>}`, so in
Redis Cluster a group's timeline state lives in one slot; a batch's groups share one script
call, split by slot first with `cluster=True`:

    P:tl:{g<id>}     hash  next: the last seq assigned; done: the highest seq whose record is
                           written (HBase), every one below it too; last: the msg_id (decimal)
                           of seq done; rec: its stored record (improto.records), so heads()
                           reads no HBase row; cut: how many entries the index dropped.
    P:tl:{g<id>}:ix  zset  "<16 hex msg_id>:<seq>", all with score 0, the TIMELINE_INDEX
                           highest msg_ids assigned. One lex range finds a msg_id's seq (a
                           redelivery keeps it: ZADD NX semantics), ZLEXCOUNT counts the
                           msg_ids at or below a read mark (rank), and the lex range from a
                           member's join msg_id up (TIMELINE_JOIN_PROBE entries) holds the
                           seqs its pulls may start before (join_floor).

Why score 0 and the seq in the member, not score = seq: lex ranges are defined only over
members of one score, and the count of msg_ids at or below a read mark must be by msg_id,
which need not rise with seq (two gateways' clocks). The index drops its lowest msg_ids, so
every dropped msg_id is at or below every kept one and rank = cut + the kept ones at or below:
exact for a msg_id at or above the lowest kept one (in practice the newest TIMELINE_INDEX
messages), and for a lower one at least the true count (unread = done - rank then a lower
bound). A join floor (where a member's pulls may start) must never be too high, so below
the lowest kept msg_id, once some were dropped, join_floor says it cannot tell (None). A
redelivered msg_id below the index gets a new seq (a second copy in the timeline): the index
spans far more than a redelivery lags behind.

Seqs are scores nowhere and Lua numbers only below 2**53 (a group's message count); msg_ids
are 16-hex text in members, decimal text in `last`, never Lua numbers.

The index expires retention + a margin after the last append (refreshed by every append);
the head has no TTL, as the inbox's and the lists' counters: seqs never start again, since a
client holding a position would miss the messages numbered below it. An append finding the
index gone (the group idle past retention) counts every seq assigned before as cut: those
messages have expired, and rank counts them as read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, fail, succeed

from improto.limits import U64_MAX
from improto_server.config import DAY_MS
from improto_server.deferreds import as_deferred
from improto_server.model import TIMELINE_INDEX
from improto_server.production.redis_connection import (
    LuaScript,
    RedisClient,
    check_binary,
    gather,
    load_scripts,
)
from improto_server.production.redis_slots import script_calls, slot_chunks, slot_groups

ASSIGN_ENTRIES = 2048  # msg_ids one assign script takes at most: bounds Redis' pause
HEADS_GROUPS = 128  # groups one heads script reads at most: bounds its reply

# KEYS: head, ix of each group (2 per group). ARGV: ttl_ms, index size, then per group: a
# count k and k msg_ids (16 hex), in order. Returns the seqs, in the order of the ids.
_ASSIGN = LuaScript(
    """
local ttl, size = ARGV[1], tonumber(ARGV[2])
local pos = 3
local out = {}
for g = 0, #KEYS / 2 - 1 do
  local head, ix = KEYS[2 * g + 1], KEYS[2 * g + 2]
  local k = tonumber(ARGV[pos])
  local last = tonumber(redis.call('HGET', head, 'next')) or 0
  if last > 0 and redis.call('EXISTS', ix) == 0 then  -- expired with its messages
    redis.call('HSET', head, 'cut', string.format('%d', last))
  end
  local nxt, seen, added = last, {}, {}
  for i = pos + 1, pos + k do
    local id = ARGV[i]
    local seq = seen[id]
    if not seq then
      local m = redis.call('ZRANGEBYLEX', ix, '[' .. id .. ':', '(' .. id .. ';', 'LIMIT', 0, 1)
      if m[1] then
        seq = tonumber(string.sub(m[1], 18))
      else  -- a new message (or one below the index: see the module's docstring)
        nxt = nxt + 1
        seq = nxt
        added[#added + 1] = 0
        added[#added + 1] = id .. ':' .. string.format('%d', seq)
      end
      seen[id] = seq
    end
    out[#out + 1] = seq
  end
  pos = pos + k + 1
  if nxt > last then
    for i = 1, #added, 1000 do
      redis.call('ZADD', ix, unpack(added, i, math.min(i + 999, #added)))
    end
    redis.call('HSET', head, 'next', string.format('%d', nxt))
    local extra = redis.call('ZCARD', ix) - size
    if extra > 0 then  -- the lowest msg_ids go (score 0: rank order is lex order)
      redis.call('ZREMRANGEBYRANK', ix, 0, extra - 1)
      redis.call('HINCRBY', head, 'cut', extra)
    end
  end
  redis.call('PEXPIRE', ix, ttl)
end
return out
"""
)

# KEYS: head of each group. ARGV: per group, its highest seq just written, that message's
# msg_id (decimal) and stored record. done only moves forward.
_SETTLE = LuaScript(
    """
for g = 1, #KEYS do
  local seq = ARGV[3 * g - 2]
  local done = tonumber(redis.call('HGET', KEYS[g], 'done')) or 0
  if tonumber(seq) > done then
    redis.call('HSET', KEYS[g], 'done', seq, 'last', ARGV[3 * g - 1], 'rec', ARGV[3 * g])
  end
end
return 0
"""
)

# KEYS: head of each group. Returns per group {done, last, rec} (nil where absent).
_HEADS = LuaScript(
    """
local out = {}
for g = 1, #KEYS do
  out[g] = redis.call('HMGET', KEYS[g], 'done', 'last', 'rec')
end
return out
"""
)

# KEYS: head, ix. ARGV: a msg_id (16 hex). Returns cut + the indexed msg_ids at or below it
# (every member "<id>:<seq>" of a lower or equal id sorts below "<id>;").
_RANK = LuaScript(
    """
local cut = tonumber(redis.call('HGET', KEYS[1], 'cut')) or 0
return cut + redis.call('ZLEXCOUNT', KEYS[2], '-', '(' .. ARGV[1] .. ';')
"""
)

# KEYS: head, ix. ARGV: since_id (16 hex), the probe size. Returns the join floor
# (TimelineStore.join_floor), or -1 when the index cannot tell: it dropped entries (cut),
# all below its lowest kept msg_id, and that one is above since_id (so the dropped ones may
# be at or above since_id too). Every msg_id below since_id counts (cut + below): exact
# otherwise, since the dropped ones are then below since_id.
_JOIN_FLOOR = LuaScript(
    """
local cut = tonumber(redis.call('HGET', KEYS[1], 'cut')) or 0
local below = redis.call('ZLEXCOUNT', KEYS[2], '-', '(' .. ARGV[1] .. ':')
local m = redis.call('ZRANGEBYLEX', KEYS[2], '[' .. ARGV[1] .. ':', '+', 'LIMIT', 0,
                     tonumber(ARGV[2]))
if cut > 0 and below == 0 and (not m[1] or string.sub(m[1], 1, 16) ~= ARGV[1]) then
  return -1
end
local floor = cut + below
for i = 1, #m do
  local seq = tonumber(string.sub(m[i], 18))
  if seq - 1 < floor then
    floor = seq - 1
  end
end
return floor
"""
)

SCRIPTS = (_ASSIGN, _SETTLE, _HEADS, _RANK, _JOIN_FLOOR)


class Settled(NamedTuple):
    """A group's highest seq of a written batch, and that message."""

    seq: int
    msg_id: int
    stored: bytes  # its stored record


class Head(NamedTuple):
    done: int
    last_msg_id: int
    stored: bytes | None  # the stored record of seq done


def _hex(msg_id: int) -> str:
    if not 0 <= msg_id <= U64_MAX:
        raise ValueError(f"{msg_id} is not an unsigned 64-bit value")
    return f"{msg_id:016x}"


class RedisTimelines:
    """The seqs, done marks and msg_id indexes of the large groups' timelines."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        retention_ms: int,
        *,
        ttl_margin_ms: int = DAY_MS,
        cluster: bool = False,
        index_size: int = TIMELINE_INDEX,
    ) -> None:
        """`retention_ms`: the history's; `cluster`: split multi-group scripts by slot;
        `index_size`: msg_ids indexed per group (smaller in tests)."""
        check_binary(redis)
        self._redis = redis
        self._prefix = prefix
        self._cluster = cluster
        self.index_size = index_size
        # Real-time expiry of idle timelines; the margin covers clock differences between the
        # servers' clocks (retention) and Redis' clock (TTL).
        self.ttl_ms = retention_ms + ttl_margin_ms

    def start(self) -> Deferred[None]:
        """Load the scripts (optional: an unknown script falls back to EVAL)."""
        return load_scripts(self._redis, SCRIPTS)

    def keys(self, group_id: int) -> list[str]:
        """head, ix of one group: one hash tag, hence one cluster slot."""
        head = f"{self._prefix}:tl:{{g{group_id}}}"
        return [head, head + ":ix"]

    def _head_key(self, group_id: int) -> str:
        return self.keys(group_id)[0]

    @as_deferred
    async def assign(self, msg_ids: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
        """The seqs of each group's msg_ids (group -> msg_ids in order), new ones assigned."""
        hexes = {group: [_hex(m) for m in ids] for group, ids in msg_ids.items() if ids}
        calls = script_calls(hexes, self._head_key, self._cluster, ASSIGN_ENTRIES)
        replies = await gather(self._assign_call(groups, hexes) for groups in calls)
        out: dict[int, list[int]] = {}
        for groups, reply in zip(calls, replies, strict=True):
            seqs = iter(reply)
            for group in groups:
                out[group] = [int(next(seqs)) for _ in hexes[group]]
        return out

    def _assign_call(self, groups: list[int], hexes: dict[int, list[str]]) -> Deferred[Any]:
        keys: list[str] = []
        args: list[Any] = [self.ttl_ms, self.index_size]
        for group in groups:
            keys.extend(self.keys(group))
            args.append(len(hexes[group]))
            args.extend(hexes[group])
        return _ASSIGN(self._redis, keys, args)

    @as_deferred
    async def settle(self, written: Mapping[int, Settled]) -> None:
        """Move each group's done up to its seq (never down), with its head message."""
        calls = slot_groups(sorted(written), self._head_key, self._cluster)
        await gather(self._settle_call(groups, written) for groups in calls)

    def _settle_call(self, groups: list[int], written: Mapping[int, Settled]) -> Deferred[Any]:
        args: list[Any] = []
        for group in groups:
            args.extend(written[group])
        return _SETTLE(self._redis, [self._head_key(g) for g in groups], args)

    def done(self, group_id: int) -> Deferred[int]:
        d = self._redis.execute_command("HGET", self._head_key(group_id), b"done")
        return d.addCallback(lambda v: 0 if v is None else int(v))

    @as_deferred
    async def heads(self, group_ids: Sequence[int]) -> dict[int, Head]:
        """The head of each group with a done seq (the others left out), ascending."""
        groups = sorted(set(group_ids))
        calls = slot_chunks(groups, self._head_key, self._cluster, HEADS_GROUPS)
        replies = await gather(
            _HEADS(self._redis, [self._head_key(g) for g in call], []) for call in calls
        )
        found: dict[int, Head] = {}
        for call, reply in zip(calls, replies, strict=True):
            for group, (done, last, rec) in zip(call, reply, strict=True):
                if done is not None and int(done) > 0:
                    found[group] = Head(int(done), int(last or 0), rec)
        return {g: found[g] for g in groups if g in found}

    def rank(self, group_id: int, msg_id: int) -> Deferred[int]:
        try:
            arg = _hex(msg_id)
        except ValueError:
            return fail()
        return _RANK(self._redis, self.keys(group_id), [arg]).addCallback(int)

    def join_floor(self, group_id: int, since_id: int, probe: int) -> Deferred[int | None]:
        """TimelineStore.join_floor over the `probe` lowest indexed msg_ids >= since_id."""
        try:
            arg = _hex(since_id)
        except ValueError:
            return fail()
        if since_id == 0:
            return succeed(0)
        d = _JOIN_FLOOR(self._redis, self.keys(group_id), [arg, probe])
        return d.addCallback(lambda v: None if int(v) < 0 else int(v))
