"""Push registrations and session revocations on Redis (the DeviceStore port).

Key layout (P = the prefix). Every key of one user carries the hash tag `{u<user_id>}`, so in
Redis Cluster they share the user's slot (the same as the user's inbox and presence):

    P:dev:{u<id>}:push     hash    device id (UTF-8) -> the target, encoded as
                                   "<preview: 0 or 1><platform>\\x00<token>" (UTF-8). The
                                   platform is short ASCII without NUL, so the first NUL
                                   after the flag ends it and everything after it is the
                                   token, whatever bytes it holds.
    P:dev:{u<id>}:reg      zset    device id -> registration time (ms, the injected clock;
                                   exact as a score). The per-user cap drops the lowest
                                   score first, ties by device id as bytes (a sorted set's
                                   own order), so the choice never depends on the server's
                                   locale as a comparison of strings in Lua would.
    P:dev:{u<id>}:revoked  string  revocation time in ms (tokens issued before it are
                                   refused); only ever raised.

push and reg always hold the same devices: only the scripts below change them, each in one
step. No key has a TTL: a registration lives until it is replaced, removed (unregistered or
reported dead by the gateway) or dropped by the cap, so a user keeps at most
MAX_TARGETS_PER_USER small entries; a revocation that expired would make the tokens it
refused valid again.

`targets` reads many users' hashes in one script call per TARGETS_USERS users (split by slot
first with `cluster=True`), so a call's reply stays bounded; users come back ascending, each
user's devices by device id, like the embedded store's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail

from improto_server.deferreds import as_deferred
from improto_server.model import MAX_TARGETS_PER_USER, PushTarget
from improto_server.production.redis_connection import (
    LuaScript,
    RedisClient,
    check_binary,
    gather,
    load_scripts,
)
from improto_server.production.redis_slots import slot_chunks

TARGETS_USERS = 64  # users one targets script reads at most: at most 64 x 64 targets
MAX_REVOKED_MS = 2**53  # exact as a Lua number (the script compares numbers)

# KEYS: push, reg. ARGV: device, encoded target, now (ms), cap. A device that is not
# registered yet first makes room: the oldest others go (several if the cap was lowered).
_SET = LuaScript("""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4]) + 1
  if over > 0 then
    local old = redis.call('ZRANGE', KEYS[2], 0, over - 1)
    redis.call('ZREM', KEYS[2], unpack(old))
    redis.call('HDEL', KEYS[1], unpack(old))
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
""")

# KEYS: push, reg. ARGV: device, "1" to compare the token (else "0"), token. Returns 1 if
# the device's target went.
_REMOVE = LuaScript("""
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then
  return 0
end
if ARGV[2] == '1' then
  local nul = string.find(v, string.char(0), 2, true)
  if string.sub(v, nul + 1) ~= ARGV[3] then
    return 0
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
""")

# KEYS: push hashes. Returns each one's {device, target, ...}.
_TARGETS = LuaScript("""
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HGETALL', KEYS[i])
end
return out
""")

# KEYS: revoked. ARGV: time (ms). Keeps the later of the stored time and this one.
_REVOKE = LuaScript("""
local old = redis.call('GET', KEYS[1])
if not old or tonumber(ARGV[1]) > tonumber(old) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
""")

SCRIPTS = (_SET, _REMOVE, _TARGETS, _REVOKE)


def encode_target(target: PushTarget) -> bytes:
    """A push hash value (see the module docstring)."""
    if "\x00" in target.platform:
        raise ValueError("a platform name cannot contain NUL")
    flag = b"1" if target.preview else b"0"
    return flag + target.platform.encode() + b"\x00" + target.token.encode()


def decode_target(value: bytes) -> PushTarget:
    nul = value.index(b"\x00", 1)
    return PushTarget(value[1:nul].decode(), value[nul + 1 :].decode(), value[:1] == b"1")


class RedisDevices:
    """DeviceStore on Redis: each change is one atomic script on one user's keys."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        now_ms: Callable[[], int],
        *,
        cluster: bool = False,
        max_targets: int = MAX_TARGETS_PER_USER,
    ) -> None:
        """`cluster`: split multi-user reads by slot (needed on Redis Cluster only)."""
        check_binary(redis)
        self._redis = redis
        self._prefix = prefix
        self._now_ms = now_ms
        self._cluster = cluster
        self.max_targets = max_targets

    def start(self) -> Deferred[None]:
        """Load the scripts (optional: an unknown script falls back to EVAL)."""
        return load_scripts(self._redis, SCRIPTS)

    def keys(self, user_id: int) -> list[str]:
        """push, reg, revoked of one user: one hash tag, hence one cluster slot."""
        base = f"{self._prefix}:dev:{{u{user_id}}}:"
        return [base + "push", base + "reg", base + "revoked"]

    def _push_key(self, user_id: int) -> str:
        return self.keys(user_id)[0]

    # ------------------------------------------------------------------ the port

    def set_target(self, user_id: int, device_id: str, target: PushTarget) -> Deferred[None]:
        try:
            value = encode_target(target)
        except ValueError as e:
            return fail(e)
        args = [device_id.encode(), value, self._now_ms(), self.max_targets]
        d = _SET(self._redis, self.keys(user_id)[:2], args)
        return d.addCallback(lambda _: None)

    def remove_target(
        self, user_id: int, device_id: str, token: str | None = None
    ) -> Deferred[bool]:
        check = [b"0", b""] if token is None else [b"1", token.encode()]
        d = _REMOVE(self._redis, self.keys(user_id)[:2], [device_id.encode(), *check])
        return d.addCallback(lambda n: int(n) == 1)

    @as_deferred
    async def targets(self, user_ids: Sequence[int]) -> dict[int, dict[str, PushTarget]]:
        users = sorted(set(user_ids))
        calls = slot_chunks(users, self._push_key, self._cluster, TARGETS_USERS)
        replies = await gather(
            _TARGETS(self._redis, [self._push_key(u) for u in call], []) for call in calls
        )
        found: dict[int, dict[str, PushTarget]] = {}
        for call, reply in zip(calls, replies, strict=True):
            for user, flat in zip(call, reply, strict=True):
                if flat:
                    found[user] = _by_device(flat)
        return {user: found[user] for user in users if user in found}

    def revoke(self, user_id: int, at_ms: int) -> Deferred[None]:
        if not 0 <= at_ms <= MAX_REVOKED_MS:
            return fail(ValueError(f"revocation time {at_ms} outside 0..2**53"))
        d = _REVOKE(self._redis, self.keys(user_id)[2:], [at_ms])
        return d.addCallback(lambda _: None)

    def revoked_before(self, user_id: int) -> Deferred[int]:
        d = self._redis.execute_command("GET", self.keys(user_id)[2])
        return d.addCallback(lambda v: 0 if v is None else int(v))


def _by_device(flat: list[Any]) -> dict[str, PushTarget]:
    """An HGETALL reply of a push hash, by device id (ascending: code point order is the
    UTF-8 byte order the embedded store sorts by)."""
    pairs = sorted((flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2))
    return {device: decode_target(value) for device, value in pairs}
