"""Groups on Redis (the GroupStore port), through txredisapi.

Key layout (P = the prefix):

    P:{groups}:g:<gid>          hash    name, owner (0: nobody), joins (the join counter),
                                        large (1: read-diffused, 0 or absent: not; absent
                                        in groups created before the flag). Exists exactly
                                        when the group was created, and for ever (so an
                                        id is never reused).
    P:{groups}:g:<gid>:since    hash    member -> since_id: the member list
    P:{groups}:g:<gid>:joined   zset    member -> join number (small, exact as a score): the
                                        earliest joiner inherits the group
    P:{groups}:u:<user>         set     the user's groups: groups_of and the per-user limit

Why one hash tag, `{groups}`, for all of it: the limits span a group and every member's
group set, and a refused request must write nothing, so each check-and-write is one Lua
script over those keys, which Redis Cluster allows only within one slot. The alternative (a
tag per group, the per-user sets updated in a second step) cannot enforce 500 groups per user
without a reservation protocol, and leaves windows where groups_of and the member list
disagree. Group data is small and changes rarely next to messages, so one slot (one shard,
plus replicas for reads) is the simple correct choice. Some scripts build key names from the
data (the new group id, the ids in a user's set): all share the tag, so they stay in the slot.

User ids, since ids and group ids are u64: the scripts keep them as decimal strings and never
turn them into Lua numbers (doubles) or sorted-set scores (doubles, exact only to 2^53).

Group ids are random in 1..2^63-1 (spec section 5: they reveal neither how many groups exist
nor where to probe for one); the range is the embedded store's, whose INTEGER key holds no
more. Python draws the candidate and the create script refuses one that a group already has
(checked and written in the same script, so two creates cannot take the same id); a refused
candidate is replaced by a new draw. Deployments from before random ids may hold a
`P:{groups}:seq` counter: it is no longer read or written, and the sequential ids it gave out
are still refused as candidates because their groups exist.

The `large` flag (docs/design/large-groups.md) follows embedded/groups.py's rules: set by
the create or add script that leaves the group with more than the threshold (an argument, so
the scripts hold no configuration), cleared by the remove script that leaves it with 90% of it
or fewer, in the same script as the membership write, so _INFO reads both from one state.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import txredisapi

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from improto.limits import MAX_GROUP_MEMBERS, MAX_GROUPS_PER_USER
from improto_server.config import Config
from improto_server.model import GroupInfo, GroupNotFound, LimitExceeded
from improto_server.production.redis_connection import (
    LuaScript,
    RedisClient,
    check_binary,
    load_scripts,
)

# The first lines of a script on an existing group (KEYS[1], its hash): refuse a missing one.
_GROUP_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOGROUP no such group')
end
"""

# KEYS: the group sets of the users (owner first). ARGV: key base, name, since,
# groups-per-user limit, the candidate group id, the large threshold, the users. Returns the
# new group id; TAKEN (nothing written) if a group has the candidate id. The limits are
# checked first, so a refusal for them does not depend on the draw.
_CREATE = LuaScript("""
local base, name, since, cap, gid = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local n = #KEYS
for i = 1, n do
  if redis.call('SCARD', KEYS[i]) >= cap then
    return redis.error_reply('LIMIT user ' .. ARGV[6 + i] .. ' is in ' .. ARGV[4] .. ' groups')
  end
end
local g = base .. 'g:' .. gid
if redis.call('EXISTS', g) == 1 then
  return redis.error_reply('TAKEN group id in use')
end
local large = n > tonumber(ARGV[6]) and '1' or '0'
redis.call('HSET', g, 'name', name, 'owner', ARGV[7], 'joins', n, 'large', large)
for i = 1, n do
  local u = ARGV[6 + i]
  redis.call('HSET', g .. ':since', u, since)
  redis.call('ZADD', g .. ':joined', i, u)  -- in the given order: owner, then ascending ids
  redis.call('SADD', KEYS[i], gid)
end
return gid
""")

# KEYS: group, since, joined, then the group sets of the users. ARGV: gid, since, member
# limit, groups-per-user limit, the large threshold, the users (ascending). Returns the users
# added.
_ADD = LuaScript(
    _GROUP_EXISTS
    + """
local gid, since, maxm, cap = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local new = {}
for i = 6, #ARGV do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then
    new[#new + 1] = i
  end
end
if #new == 0 then
  return {}
end
local count = redis.call('HLEN', KEYS[2]) + #new
if count > maxm then
  return redis.error_reply('LIMIT a group has at most ' .. ARGV[3] .. ' members')
end
for _, i in ipairs(new) do
  if redis.call('SCARD', KEYS[i - 2]) >= cap then
    return redis.error_reply('LIMIT user ' .. ARGV[i] .. ' is in ' .. ARGV[4] .. ' groups')
  end
end
local out = {}
for _, i in ipairs(new) do
  local u = ARGV[i]
  redis.call('HSET', KEYS[2], u, since)
  redis.call('ZADD', KEYS[3], redis.call('HINCRBY', KEYS[1], 'joins', 1), u)
  redis.call('SADD', KEYS[i - 2], gid)
  out[#out + 1] = u
end
if count > tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'large', '1')
end
return out
"""
)

# KEYS: group, since, joined, then the group sets of the users. ARGV: gid, the large
# threshold, the users (ascending). Returns the users removed.
_REMOVE = LuaScript(
    _GROUP_EXISTS
    + """
local owner = redis.call('HGET', KEYS[1], 'owner')
local out, owner_left = {}, false
for i = 3, #ARGV do
  local u = ARGV[i]
  if redis.call('HDEL', KEYS[2], u) == 1 then
    redis.call('ZREM', KEYS[3], u)
    redis.call('SREM', KEYS[i + 1], ARGV[1])
    out[#out + 1] = u
    if u == owner then
      owner_left = true
    end
  end
end
if owner_left then
  local first = redis.call('ZRANGE', KEYS[3], 0, 0)  -- the lowest join number
  redis.call('HSET', KEYS[1], 'owner', first[1] or '0')
end
local threshold = tonumber(ARGV[2])
if #out > 0 and redis.call('HLEN', KEYS[2]) <= math.floor(threshold * 9 / 10)
    and redis.call('HGET', KEYS[1], 'large') == '1' then
  redis.call('HSET', KEYS[1], 'large', '0')
end
return out
"""
)

# KEYS: group, since. Returns nil for an unknown group, else {name, owner, {members}, large
# (1 or 0; 0 when absent)}: one script so that owner, members and flag are read from the same
# state.
_INFO = LuaScript("""
local v = redis.call('HMGET', KEYS[1], 'name', 'owner', 'large')
if not v[1] then
  return false
end
return {v[1], v[2], redis.call('HKEYS', KEYS[2]), v[3] == '1' and 1 or 0}
""")

# KEYS: the user's group set. ARGV: key base. Returns {gid1, name1, gid2, name2, ...}.
_GROUPS_OF = LuaScript("""
local out = {}
for _, gid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = gid
  out[#out + 1] = redis.call('HGET', ARGV[1] .. 'g:' .. gid, 'name')
end
return out
""")

SCRIPTS = (_CREATE, _ADD, _REMOVE, _INFO, _GROUPS_OF)

GROUP_ID_MAX = 2**63 - 1  # the embedded store's range (see the module docstring)
# Draws before giving up: one draw collides with probability (groups so far) / 2^63.
CREATE_ATTEMPTS = 8


def random_group_id() -> int:
    """A uniformly random group id in 1..GROUP_ID_MAX (cryptographic: not predictable)."""
    return secrets.randbelow(GROUP_ID_MAX) + 1


def _translate(failure: Failure, group_id: int) -> Failure:
    """Script refusals (nothing was written) -> the port's exceptions."""
    failure.trap(txredisapi.ResponseError)
    text = str(failure.value)
    if text.startswith("NOGROUP"):
        raise GroupNotFound(group_id)
    if text.startswith("LIMIT "):
        raise LimitExceeded(text.removeprefix("LIMIT "))
    return failure


def _ids(values: list[bytes]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


class RedisGroups:
    """GroupStore on Redis: each operation is one atomic script (see the module docstring)."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        *,
        large_threshold: int = Config.large_group_threshold,
    ) -> None:
        check_binary(redis)
        self._redis = redis
        self._base = f"{prefix}:{{groups}}:"
        # Draws candidate group ids; tests replace it to force collisions or to give two
        # stores the same ids.
        self.new_id: Callable[[], int] = random_group_id
        # Config.large_group_threshold, passed to each script (tests may set a small one).
        self.large_threshold = large_threshold

    def start(self) -> Deferred[None]:
        """Load the scripts (optional: an unknown script falls back to EVAL)."""
        return load_scripts(self._redis, SCRIPTS)

    def _group_keys(self, group_id: int) -> list[str]:
        g = f"{self._base}g:{group_id}"
        return [g, g + ":since", g + ":joined"]

    def _user_key(self, user_id: int) -> str:
        return f"{self._base}u:{user_id}"

    # ------------------------------------------------------------------ the port

    def create(
        self, owner_id: int, name: str, members: tuple[int, ...], since_id: int
    ) -> Deferred[int]:
        users = [owner_id, *sorted(set(members) - {owner_id})]
        if len(users) > MAX_GROUP_MEMBERS:
            return fail(LimitExceeded(f"a group has at most {MAX_GROUP_MEMBERS} members"))
        keys = list(map(self._user_key, users))

        def attempt(tries: int) -> Deferred[bytes]:
            gid = self.new_id()
            if not 1 <= gid <= GROUP_ID_MAX:
                return fail(ValueError(f"group id {gid} outside 1..{GROUP_ID_MAX}"))
            args = [
                self._base, name.encode(), since_id, MAX_GROUPS_PER_USER, gid,
                self.large_threshold, *users,
            ]  # fmt: skip
            d = _CREATE(self._redis, keys, args)
            return d.addErrback(taken, tries)

        def taken(failure: Failure, tries: int) -> Deferred[bytes]:
            if failure.check(txredisapi.ResponseError) and tries > 1:
                if str(failure.value).startswith("TAKEN"):
                    return attempt(tries - 1)
            return fail(failure)

        return attempt(CREATE_ATTEMPTS).addCallbacks(int, _translate, errbackArgs=(0,))

    def add(
        self, group_id: int, users: tuple[int, ...], since_id: int
    ) -> Deferred[tuple[int, ...]]:
        wanted = sorted(set(users))
        keys = [*self._group_keys(group_id), *map(self._user_key, wanted)]
        args = [
            group_id, since_id, MAX_GROUP_MEMBERS, MAX_GROUPS_PER_USER, self.large_threshold,
            *wanted,
        ]  # fmt: skip
        d = _ADD(self._redis, keys, args)
        return d.addCallbacks(_ids, _translate, errbackArgs=(group_id,))

    def remove(self, group_id: int, users: tuple[int, ...]) -> Deferred[tuple[int, ...]]:
        wanted = sorted(set(users))
        keys = [*self._group_keys(group_id), *map(self._user_key, wanted)]
        d = _REMOVE(self._redis, keys, [group_id, self.large_threshold, *wanted])
        return d.addCallbacks(_ids, _translate, errbackArgs=(group_id,))

    def info(self, group_id: int) -> Deferred[GroupInfo | None]:
        def build(reply: list[Any] | None) -> GroupInfo | None:
            if reply is None:
                return None
            name, owner, members, large = reply
            ids = tuple(sorted(_ids(members)))
            return GroupInfo(group_id, name.decode(), int(owner), ids, large == 1)

        return _INFO(self._redis, self._group_keys(group_id)[:2], []).addCallback(build)

    def since(self, group_id: int, user_id: int) -> Deferred[int | None]:
        d = self._redis.execute_command("HGET", self._group_keys(group_id)[1], user_id)
        return d.addCallback(lambda v: None if v is None else int(v))

    def groups_of(self, user_id: int) -> Deferred[tuple[tuple[int, str], ...]]:
        def build(flat: list[bytes]) -> tuple[tuple[int, str], ...]:
            pairs = ((int(flat[i]), flat[i + 1].decode()) for i in range(0, len(flat), 2))
            return tuple(sorted(pairs))

        return _GROUPS_OF(self._redis, [self._user_key(user_id)], [self._base]).addCallback(build)
