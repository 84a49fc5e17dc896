"""Groups on Redis (the GroupStore port), through txredisapi, spread over a Redis Cluster.

Key layout (P = the prefix). A group's keys carry the hash tag `{g<gid>}` (the slot of its
timeline keys, redis_timeline.py), a user's the tag `{u<uid>}` (the slot of the user's inbox,
list and devices), so every script below touches one slot and groups spread over the shards:

    P:groups:{g<gid>}         hash  name, owner (0: nobody), joins (the join counter), large
                                    (1: read-diffused, 0 or absent: not; absent in groups
                                    created before the flag). Exists exactly when the group
                                    was created, and for ever (so an id is never reused).
    P:groups:{g<gid>}:since   hash  member -> since_id: the member list
    P:groups:{g<gid>}:joined  zset  member -> join number (the `joins` count at the join:
                                    small, exact as a score): the earliest joiner inherits
                                    the group, and the number names this membership
    P:groups:{g<gid>}:void    zset  token -> ms: operations whose reservations were given up
                                    (below); their commit is refused. TTL VOID_KEEP_MS.
    P:groups:{u<uid>}         hash  gid -> join number: the user's groups (the per-user
                                    limit); removed when empty
    P:groups:{u<uid>}:res     zset  "<gid>:<token>" -> deadline (ms): places reserved by
                                    operations in flight; empty (absent) between operations
    P:groups:{layout}         string  2: the layout version, written once the single-slot
                                    layout below is migrated (a tag like every key's)

Every check-and-write of one side is one script: the member limit, since ids, the join order,
the owner and the `large` flag on the group's slot; the per-user limit on the user's slot.
There is no cross-slot transaction; the two sides are kept by this protocol:

- The invariant: a member of a group has the group in its hash or a reservation for it. The
  per-user count is the number of gids in the hash or the reservations (expired ones
  included), so count >= the user's groups, and a reservation of a gid not yet counted is
  refused when the count is at MAX_GROUPS_PER_USER: the limit can never be exceeded, whatever
  runs concurrently. A commit adds only users holding the operation's reservation, and a
  reservation goes only with the hash entry written (confirm), for a user the commit did not
  add (release), or once its token is void and the membership read (resolution).
- Create / add (one random `token` per operation): (1) RESERVE the group in every added
  user's `res` (one script per slot: all or nothing; any refusal releases the others and the
  operation is refused with LimitExceeded before the group is touched). (2) COMMIT on the
  group's slot: refused (nothing written) for a missing group, the member limit, a taken id
  (create draws again), or a token in `void`; it returns each user it added with the join
  number. (3) CONFIRM: the added users' hashes get gid -> join number (kept at the highest
  number, the newest membership), and every reservation of the token is removed (RELEASE for
  those not added). A definite refusal at (2) releases them all; a reply that never came
  (connection lost) leaves them (the commit may have run) to the resolution below.
- Remove: the group side first (returns the removed users with their join numbers), then
  each user's hash drops gid only if it still holds that join number (a later join confirmed
  meanwhile keeps its entry).
- Resolution: groups_of(user) reads the hash and the reservations in one script, then each
  group's name and the user's join number. A reservation past its deadline is resolved on its
  group: VOID adds the token to `void` (a commit still on its way is refused from now on) and
  reads the membership, so the outcome is settled at one place: a member gets the hash entry,
  a non-member nothing, and the reservation goes. A hash entry of a group the user is not in
  is dropped (compare and delete), one missing or older is written. A reserve refused at the
  limit runs the same check on the refused user and tries once more if it freed a place, so
  an expired reservation or a stale entry holds a place at most until the place is needed.
- What a crash between steps leaves: after (1), reservations that count until they expire
  (RESERVATION_MS) and are resolved as not joined; after (2), members whose place is still a
  reservation (listed by groups_of at once, confirmed at resolution); after a removal's group
  step, hash entries of groups the user left: counted, never listed, dropped by the next
  check. Each step is ordered so that the entry may outlive the membership, never the
  reverse: what can remain makes the limit stricter for a while, it never lets it pass.
  groups_of lists exactly the groups the user is a member of when it reads them.
- Clocks only decide when a reservation may be resolved (the writer's deadline, the reader's
  clock): a reader whose clock runs ahead voids early and the operation fails UNAVAILABLE
  (nothing written, retried by the client); correctness never depends on them.

User ids, since ids and group ids are u64: the scripts keep them as decimal strings and never
turn them into Lua numbers (doubles) or sorted-set scores (doubles, exact only to 2^53); join
numbers and deadlines are small enough.

Group ids are random in 1..2^63-1 (spec section 5: they reveal neither how many groups exist
nor where to probe for one); the range is the embedded store's, whose INTEGER key holds no
more. Python draws the candidate and the create script refuses one that a group already has
(checked and written in the same script, so two creates cannot take the same id); a refused
candidate is released and replaced by a new draw. The limits are reserved first, so a refusal
for them does not depend on the draw.

The `large` flag (docs/design/large-groups.md) follows embedded/groups.py's rules: set by
the create or add script that leaves the group with more than the threshold (an argument, so
the scripts hold no configuration), cleared by the remove script that leaves it with 90% of it
or fewer, in the same script as the membership write, so _INFO reads both from one state.

Before this layout all group keys shared one `{groups}` tag (`P:{groups}:g:<gid>`, `:since`,
`:joined`, `P:{groups}:u:<user>`, maybe `P:{groups}:seq`): one slot, so one shard held every
group. start() migrates them once (`migrate_from_single_slot`: copy each group to its slot if
not there yet, write its members' hash entries, then delete the old keys and write
P:groups:{layout}); it is idempotent, so a crash or two servers starting together are safe.
Servers of the old layout must be stopped first: nothing reads the old keys afterwards.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import txredisapi

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from improto.limits import MAX_GROUP_MEMBERS, MAX_GROUPS_PER_USER
from improto_server.config import DAY_MS, Config
from improto_server.deferreds import as_deferred
from improto_server.ids import wall_ms
from improto_server.model import GroupInfo, GroupNotFound, LimitExceeded
from improto_server.production.redis_cluster import ClusterRedis, scan_targets
from improto_server.production.redis_connection import (
    LuaScript,
    RedisClient,
    check_binary,
    gather,
    glob_escape,
    load_scripts,
)
from improto_server.production.redis_slots import slot_chunks

_log = Logger()
_T = TypeVar("_T")

# ----------------------------------------------------------------- the user side ({u<id>})

# KEYS: (hash, res) of each user. ARGV: gid, token, deadline, groups-per-user limit, the
# users. Reserves the group for every user, or for none: returns {} or {the refused user}.
# A user whose count already includes the gid (in the hash or reserved) is never refused.
_RESERVE = LuaScript("""
local gid, cap = ARGV[1], tonumber(ARGV[4])
local entry = gid .. ':' .. ARGV[2]
for i = 1, #KEYS / 2 do
  local h, r = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('HEXISTS', h, gid) == 0 then
    local count, seen, counted = redis.call('HLEN', h), {}, false
    for _, e in ipairs(redis.call('ZRANGE', r, 0, -1)) do
      local g = string.sub(e, 1, string.find(e, ':', 1, true) - 1)
      if g == gid then
        counted = true
        break
      end
      if not seen[g] and redis.call('HEXISTS', h, g) == 0 then
        seen[g] = true
        count = count + 1
      end
    end
    if not counted and count >= cap then
      return {ARGV[4 + i]}
    end
  end
end
for i = 1, #KEYS / 2 do
  redis.call('ZADD', KEYS[2 * i], ARGV[3], entry)
end
return {}
""")

# KEYS: (hash, res) of each user. ARGV: quads (user index, gid, token or '', join number or
# ''): a join number is written unless the hash holds a higher one (the newest membership);
# a token's reservation is removed.
_LINK = LuaScript("""
for k = 1, #ARGV, 4 do
  local i = tonumber(ARGV[k])
  local h, gid, token, j = KEYS[2 * i - 1], ARGV[k + 1], ARGV[k + 2], ARGV[k + 3]
  if j ~= '' then
    local held = redis.call('HGET', h, gid)
    if not held or tonumber(held) < tonumber(j) then
      redis.call('HSET', h, gid, j)
    end
  end
  if token ~= '' then
    redis.call('ZREM', KEYS[2 * i], gid .. ':' .. token)
  end
end
return 1
""")

# KEYS: the hash of each user. ARGV: triples (user index, gid, join number): the entry goes
# only if it still holds that number.
_UNLINK = LuaScript("""
for k = 1, #ARGV, 3 do
  local h = KEYS[tonumber(ARGV[k])]
  if redis.call('HGET', h, ARGV[k + 1]) == ARGV[k + 2] then
    redis.call('HDEL', h, ARGV[k + 1])
  end
end
return 1
""")

# KEYS: hash, res of one user. Returns {gid, join number, ...} and {entry, deadline, ...}
# read together (an entry moving from res to the hash is seen in one of them).
_HELD = LuaScript("""
return {redis.call('HGETALL', KEYS[1]), redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')}
""")

# ----------------------------------------------------------------- the group side ({g<id>})

# The first lines of a script on an existing group (KEYS[1], its hash): refuse a missing one.
_GROUP_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOGROUP no such group')
end
"""

# KEYS[4] is the group's void set, ARGV[4] the operation's token.
_NOT_VOID = """
if redis.call('ZSCORE', KEYS[4], ARGV[4]) then
  return redis.error_reply('EXPIRED the reservations of this change were given up')
end
"""

# KEYS: group, since, joined, void. ARGV: name, since, the large threshold, token, the users
# (owner first, then ascending: their join numbers are 1, 2, ...). TAKEN (nothing written)
# if a group has the id.
_CREATE = LuaScript(
    """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('TAKEN group id in use')
end
"""
    + _NOT_VOID
    + """
local n = #ARGV - 4
local large = n > tonumber(ARGV[3]) and '1' or '0'
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'owner', ARGV[5], 'joins', n, 'large', large)
for i = 1, n do
  redis.call('HSET', KEYS[2], ARGV[4 + i], ARGV[2])
  redis.call('ZADD', KEYS[3], i, ARGV[4 + i])
end
return n
"""
)

# KEYS: group, since, joined, void. ARGV: since, member limit, the large threshold, token,
# the users (ascending). Returns {user, join number, ...} of the users added.
_ADD = LuaScript(
    _GROUP_EXISTS
    + _NOT_VOID
    + """
local new = {}
for i = 5, #ARGV do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then
    new[#new + 1] = ARGV[i]
  end
end
if #new == 0 then
  return {}
end
local count = redis.call('HLEN', KEYS[2]) + #new
if count > tonumber(ARGV[2]) then
  return redis.error_reply('LIMIT a group has at most ' .. ARGV[2] .. ' members')
end
local out = {}
for _, u in ipairs(new) do
  local j = redis.call('HINCRBY', KEYS[1], 'joins', 1)
  redis.call('HSET', KEYS[2], u, ARGV[1])
  redis.call('ZADD', KEYS[3], j, u)
  out[#out + 1] = u
  out[#out + 1] = j
end
if count > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'large', '1')
end
return out
"""
)

# KEYS: group, since, joined. ARGV: the large threshold, the users (ascending). Returns
# {user, join number, ...} of the users removed.
_REMOVE = LuaScript(
    _GROUP_EXISTS
    + """
local owner = redis.call('HGET', KEYS[1], 'owner')
local out, owner_left = {}, false
for i = 2, #ARGV do
  local u = ARGV[i]
  if redis.call('HDEL', KEYS[2], u) == 1 then
    out[#out + 1] = u
    out[#out + 1] = redis.call('ZSCORE', KEYS[3], u) or '0'
    redis.call('ZREM', KEYS[3], u)
    if u == owner then
      owner_left = true
    end
  end
end
if owner_left then
  local first = redis.call('ZRANGE', KEYS[3], 0, 0)  -- the lowest join number
  redis.call('HSET', KEYS[1], 'owner', first[1] or '0')
end
local threshold = tonumber(ARGV[1])
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

# KEYS: (group, joined) of groups of one slot. ARGV: a user. Returns {name or nil, the user's
# join number or nil, ...}.
_PEEK = LuaScript("""
local out = {}
for i = 1, #KEYS, 2 do
  out[#out + 1] = redis.call('HGET', KEYS[i], 'name')
  out[#out + 1] = redis.call('ZSCORE', KEYS[i + 1], ARGV[1])
end
return out
""")

# KEYS: joined, void. ARGV: a user, now (ms), how long void tokens are kept (ms), the tokens
# of the user's expired reservations. Voids them (their commit is refused from now on) and
# returns the user's join number, or nil: whether the user is a member, settled here.
_VOID = LuaScript("""
local now, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4, #ARGV do
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - keep)
redis.call('PEXPIRE', KEYS[2], keep)
return redis.call('ZSCORE', KEYS[1], ARGV[1])
""")

# KEYS: group, since, joined (the new layout). ARGV: the number of hash fields F, F field
# and value pairs, then (member, since, join number) triples. Writes the group unless it is
# there already (a migration run before); returns 1 if written.
_IMPORT = LuaScript("""
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local f = tonumber(ARGV[1])
for k = 2, 2 * f, 2 do
  redis.call('HSET', KEYS[1], ARGV[k], ARGV[k + 1])
end
for k = 2 * f + 2, #ARGV, 3 do
  redis.call('HSET', KEYS[2], ARGV[k], ARGV[k + 1])
  redis.call('ZADD', KEYS[3], ARGV[k + 2], ARGV[k])
end
return 1
""")

SCRIPTS = (
    _RESERVE, _LINK, _UNLINK, _HELD, _CREATE, _ADD, _REMOVE, _INFO, _PEEK, _VOID, _IMPORT,
)  # fmt: skip

GROUP_ID_MAX = 2**63 - 1  # the embedded store's range (see the module docstring)
# Draws before giving up: one draw collides with probability (groups so far) / 2^63.
CREATE_ATTEMPTS = 8
# How long a reservation holds before a reader may resolve it: far above an operation's
# three round trips, above the cluster client's failover retries (15 s).
RESERVATION_MS = 60_000
# How long a voided token is remembered: far above any delay of a commit in flight.
VOID_KEEP_MS = DAY_MS
USERS_PER_CALL = 1000  # users per user-side script call (their keys share a slot)
GROUPS_PER_CALL = 500  # groups per _PEEK call
MIGRATE_GROUPS = 64  # groups migrated at once


def random_group_id() -> int:
    """A uniformly random group id in 1..GROUP_ID_MAX (cryptographic: not predictable)."""
    return secrets.randbelow(GROUP_ID_MAX) + 1


def _refusal(error: txredisapi.ResponseError, group_id: int) -> Exception:
    """A script's refusal (nothing was written) as the port's exception."""
    text = str(error)
    if text.startswith("NOGROUP"):
        return GroupNotFound(group_id)
    if text.startswith("LIMIT "):
        return LimitExceeded(text.removeprefix("LIMIT "))
    if text.startswith("EXPIRED"):  # not a refusal of the request: UNAVAILABLE, retried
        return RuntimeError(f"group {group_id}: {text.removeprefix('EXPIRED ')}")
    return error


def _pairs(flat: Sequence[Any]) -> dict[int, int]:
    """{a, b, ...} replies of ids and join numbers (a score: may read "3" or "3.0")."""
    return {int(flat[i]): int(float(flat[i + 1])) for i in range(0, len(flat), 2)}


def _join(value: bytes | None) -> int | None:
    return None if value is None else int(float(value))


class RedisGroups:
    """GroupStore on Redis or a Redis Cluster: per-group and per-user slots, reservations
    between them (see the module docstring)."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        *,
        large_threshold: int = Config.large_group_threshold,
        cluster: bool | None = None,
        now_ms: Callable[[], int] = wall_ms,
    ) -> None:
        """`cluster`: split the per-user and per-group batches by slot (None: when `redis`
        is a ClusterRedis); `now_ms`: the clock of reservation deadlines."""
        check_binary(redis)
        self._redis = redis
        self._prefix = prefix
        self._cluster = isinstance(redis, ClusterRedis) if cluster is None else cluster
        self._now = now_ms
        # Draws candidate group ids; tests replace it to force collisions or to give two
        # stores the same ids.
        self.new_id: Callable[[], int] = random_group_id
        # Config.large_group_threshold, passed to each script (tests may set a small one).
        self.large_threshold = large_threshold

    @as_deferred
    async def start(self) -> None:
        """Load the scripts (optional: an unknown script falls back to EVAL); migrate the
        single-slot layout the first time."""
        await load_scripts(self._redis, SCRIPTS)
        if not await self._redis.execute_command("EXISTS", self.layout_key):
            await self.migrate_from_single_slot()

    # ------------------------------------------------------------------ keys

    def group_keys(self, group_id: int) -> list[str]:
        """hash, since, joined, void of one group: one hash tag, hence one cluster slot."""
        g = f"{self._prefix}:groups:{{g{group_id}}}"
        return [g, g + ":since", g + ":joined", g + ":void"]

    def user_keys(self, user_id: int) -> list[str]:
        """hash (the user's groups), res (reservations): one hash tag, the user's slot."""
        u = f"{self._prefix}:groups:{{u{user_id}}}"
        return [u, u + ":res"]

    @property
    def layout_key(self) -> str:
        return f"{self._prefix}:groups:{{layout}}"

    def _user_calls(self, users: Sequence[int]) -> list[list[int]]:
        return slot_chunks(users, lambda u: self.user_keys(u)[0], self._cluster, USERS_PER_CALL)

    # ------------------------------------------------------------------ the steps

    def _token(self) -> tuple[str, int]:
        """A new operation's token and its reservations' deadline."""
        return secrets.token_hex(8), self._now() + RESERVATION_MS

    async def reserve(
        self, group_id: int, users: Sequence[int], token: str, deadline: int, *, check: bool = True
    ) -> None:
        """Step 1: a place in each user's groups, or LimitExceeded and none (any taken is
        released). A refusal first checks the refused users' entries (resolving what
        expired, dropping what is stale) and tries once more if that freed a place."""
        calls = self._user_calls(users)
        replies = await gather(
            _RESERVE(
                self._redis,
                [k for u in call for k in self.user_keys(u)],
                [group_id, token, deadline, MAX_GROUPS_PER_USER, *call],
            )
            for call in calls
        )
        refused = sorted(int(r[0]) for r in replies if r)
        if not refused:
            return
        await self._quietly(self.finish(group_id, token, dict.fromkeys(users)), "release", group_id)
        if check and any(
            freed
            for _, freed in await gather(Deferred.fromCoroutine(self._check(u)) for u in refused)
        ):
            return await self.reserve(group_id, users, token, deadline, check=False)
        raise LimitExceeded(f"user {refused[0]} is in {MAX_GROUPS_PER_USER} groups")

    async def finish(self, group_id: int, token: str, joins: Mapping[int, int | None]) -> None:
        """Step 3: each user's reservation of `token` removed; the users with a join number
        (those the commit added) get the group in their hash (confirm), the others not
        (release)."""
        users = sorted(joins)

        def call(chunk: list[int]) -> Deferred[Any]:
            args: list[Any] = []
            for i, user in enumerate(chunk, 1):
                j = joins[user]
                args += [i, group_id, token, "" if j is None else j]
            keys = [k for u in chunk for k in self.user_keys(u)]
            return _LINK(self._redis, keys, args)

        await gather(call(chunk) for chunk in self._user_calls(users))

    async def unlink(self, group_id: int, joins: Mapping[int, int]) -> None:
        """After a removal: the group leaves each user's hash if it still names that
        membership (join number)."""

        def call(chunk: list[int]) -> Deferred[Any]:
            args = [x for i, u in enumerate(chunk, 1) for x in (i, group_id, joins[u])]
            return _UNLINK(self._redis, [self.user_keys(u)[0] for u in chunk], args)

        await gather(call(chunk) for chunk in self._user_calls(sorted(joins)))

    async def _quietly(self, step: Awaitable[None], what: str, group_id: int) -> None:
        """A step whose failure leaves what the resolution repairs: logged, not raised."""
        try:
            await step
        except Exception:
            _log.failure("group {gid}: {what} failed (repaired later)", gid=group_id, what=what)

    async def _check(self, user_id: int) -> tuple[list[tuple[int, str]], bool]:
        """The groups the user is a member of, by ascending id, and the user's entries
        repaired (the resolution of the module docstring); True if a place was freed."""
        held, pending = await _HELD(self._redis, self.user_keys(user_id), [])
        linked = _pairs(held)
        now = self._now()
        live: set[int] = set()
        expired: dict[int, list[bytes]] = {}
        for i in range(0, len(pending), 2):
            gid_text, _, token = pending[i].partition(b":")
            if int(float(pending[i + 1])) > now:
                live.add(int(gid_text))
            else:
                expired.setdefault(int(gid_text), []).append(token)
        gids = sorted(set(linked) | live | set(expired))
        peeked = await self._peek(gids, user_id)
        voided = await gather(
            _VOID(self._redis, self.group_keys(g)[2:], [user_id, now, VOID_KEEP_MS, *tokens])
            for g, tokens in expired.items()
        )
        settled = {g: _join(j) for g, j in zip(expired, voided, strict=True)}
        out, fixes, stale, freed = [], [], [], False
        for gid in gids:
            name, j = peeked[gid]
            if gid in settled:  # read after the void: the membership that stands
                j = settled[gid]
            if j is not None:
                if name is not None:
                    out.append((gid, name.decode()))
                if linked.get(gid, 0) < j:
                    fixes += [1, gid, "", j]
            elif gid in linked:
                stale += [1, gid, linked[gid]]
                freed = True
            for token in expired.get(gid, ()):
                fixes += [1, gid, token, "" if j is None else j]
                freed = freed or j is None
        keys = self.user_keys(user_id)
        if fixes:
            await _LINK(self._redis, keys, fixes)
        if stale:
            await _UNLINK(self._redis, keys[:1], stale)
        return out, freed

    async def _peek(self, gids: Sequence[int], user_id: int) -> dict[int, tuple[Any, int | None]]:
        """Each group's name (None: no such group) and the user's join number in it."""
        calls = slot_chunks(gids, lambda g: self.group_keys(g)[0], self._cluster, GROUPS_PER_CALL)
        replies = await gather(
            _PEEK(self._redis, [k for g in call for k in self.group_keys(g)[:3:2]], [user_id])
            for call in calls
        )
        found: dict[int, tuple[Any, int | None]] = {}
        for call, flat in zip(calls, replies, strict=True):
            for i, gid in enumerate(call):
                found[gid] = (flat[2 * i], _join(flat[2 * i + 1]))
        return found

    # ------------------------------------------------------------------ the port

    @as_deferred
    async def create(
        self, owner_id: int, name: str, members: tuple[int, ...], since_id: int
    ) -> int:
        users = [owner_id, *sorted(set(members) - {owner_id})]
        if len(users) > MAX_GROUP_MEMBERS:
            raise LimitExceeded(f"a group has at most {MAX_GROUP_MEMBERS} members")
        for tries in range(CREATE_ATTEMPTS, 0, -1):
            gid = self.new_id()
            if not 1 <= gid <= GROUP_ID_MAX:
                raise ValueError(f"group id {gid} outside 1..{GROUP_ID_MAX}")
            token, deadline = self._token()
            await self.reserve(gid, users, token, deadline)
            args = [name.encode(), since_id, self.large_threshold, token, *users]
            try:
                await _CREATE(self._redis, self.group_keys(gid), args)
            except txredisapi.ResponseError as e:
                await self._quietly(self.finish(gid, token, dict.fromkeys(users)), "release", gid)
                if tries > 1 and str(e).startswith("TAKEN"):
                    continue
                raise _refusal(e, 0) from None
            joins = {user: i for i, user in enumerate(users, 1)}
            await self._quietly(self.finish(gid, token, joins), "confirm", gid)
            return gid
        raise AssertionError("unreachable")  # pragma: no cover - the last try raises

    @as_deferred
    async def add(self, group_id: int, users: tuple[int, ...], since_id: int) -> tuple[int, ...]:
        wanted = sorted(set(users))
        token, deadline = self._token()
        if wanted:
            try:
                await self.reserve(group_id, wanted, token, deadline)
            except LimitExceeded:
                if not await self._redis.execute_command("EXISTS", self.group_keys(group_id)[0]):
                    raise GroupNotFound(group_id) from None
                raise
        args = [since_id, MAX_GROUP_MEMBERS, self.large_threshold, token, *wanted]
        try:
            reply = await _ADD(self._redis, self.group_keys(group_id), args)
        except txredisapi.ResponseError as e:
            release = self.finish(group_id, token, dict.fromkeys(wanted))
            await self._quietly(release, "release", group_id)
            raise _refusal(e, group_id) from None
        added = _pairs(reply)
        joins = {user: added.get(user) for user in wanted}
        await self._quietly(self.finish(group_id, token, joins), "confirm", group_id)
        return tuple(sorted(added))

    @as_deferred
    async def remove(self, group_id: int, users: tuple[int, ...]) -> tuple[int, ...]:
        wanted = sorted(set(users))
        keys = self.group_keys(group_id)[:3]
        try:
            reply = await _REMOVE(self._redis, keys, [self.large_threshold, *wanted])
        except txredisapi.ResponseError as e:
            raise _refusal(e, group_id) from None
        removed = _pairs(reply)
        await self._quietly(self.unlink(group_id, removed), "unlink", group_id)
        return tuple(sorted(removed))

    def info(self, group_id: int) -> Deferred[GroupInfo | None]:
        def build(reply: list[Any] | None) -> GroupInfo | None:
            if reply is None:
                return None
            name, owner, members, large = reply
            ids = tuple(sorted(int(m) for m in members))
            return GroupInfo(group_id, name.decode(), int(owner), ids, large == 1)

        return _INFO(self._redis, self.group_keys(group_id)[:2], []).addCallback(build)

    def since(self, group_id: int, user_id: int) -> Deferred[int | None]:
        d = self._redis.execute_command("HGET", self.group_keys(group_id)[1], user_id)
        return d.addCallback(lambda v: None if v is None else int(v))

    @as_deferred
    async def groups_of(self, user_id: int) -> tuple[tuple[int, str], ...]:
        groups, _ = await self._check(user_id)
        return tuple(groups)

    # ------------------------------------------------------------------ the old layout

    @as_deferred
    async def migrate_from_single_slot(self) -> int:
        """Move the groups of the single-slot layout (`P:{groups}:...`) to their own slots,
        delete the old keys, write the layout key; returns how many groups moved. Idempotent
        (see the module docstring); SCANs every master once."""
        old = f"{self._prefix}:{{groups}}:"
        found: list[bytes] = []
        for node in scan_targets(self._redis):
            cursor = b"0"
            while True:
                cursor, keys = await node.execute_command(
                    "SCAN", cursor, "MATCH", glob_escape(old) + "*", "COUNT", 1000
                )
                found.extend(keys)
                if cursor == b"0":
                    break
        shape = re.compile(re.escape(old.encode()) + rb"g:(\d+)")
        gids = sorted({int(m[1]) for k in found if (m := shape.fullmatch(k))})
        moved = 0
        for i in range(0, len(gids), MIGRATE_GROUPS):  # some at a time
            batch = gids[i : i + MIGRATE_GROUPS]
            moved += sum(await gather(Deferred.fromCoroutine(self._import(old, g)) for g in batch))
        for i in range(0, len(found), 500):  # one slot, {groups}: many keys per DEL
            await self._redis.execute_command("DEL", *found[i : i + 500])
        await self._redis.execute_command("SET", self.layout_key, b"2")
        if gids:
            _log.info("groups: {n} groups moved from the {{groups}} slot", n=moved)
        return moved

    async def _import(self, old: str, gid: int) -> int:
        g = f"{old}g:{gid}"
        fields, since, joined = await gather([
            self._redis.execute_command("HGETALL", g),
            self._redis.execute_command("HGETALL", g + ":since"),
            self._redis.execute_command("ZRANGE", g + ":joined", 0, -1, "WITHSCORES"),
        ])  # fmt: skip
        scores = {joined[i]: joined[i + 1] for i in range(0, len(joined), 2)}
        args: list[Any] = [len(fields) // 2, *fields]
        for i in range(0, len(since), 2):
            args += [since[i], since[i + 1], scores.get(since[i], b"0")]
        keys = self.group_keys(gid)
        written = await _IMPORT(self._redis, keys[:3], args)
        # The members' entries from the group as it is now (also when an earlier run wrote
        # it): an entry may outlive a membership, never the reverse.
        members = await self._redis.execute_command("ZRANGE", keys[2], 0, -1, "WITHSCORES")
        await self.finish(gid, "", _pairs(members))
        return int(written)
