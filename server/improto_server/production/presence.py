"""Which gateway holds which device, which gateways are alive, and message-id node leases.

Redis keys (P = the prefix):

    P:presence:{u<id>}   hash   device id -> "<gateway id>/<session number>" of the session
                                that device has now (the {u<id>} tag: the user's slot).
    P:gwdev:{g<gid>}     set    "<user id>/<device id>" of every presence entry the gateway
                                wrote: what to clean when it dies.
    P:gateways           zset   gateway id -> last heartbeat (ms, Redis clock).
    P:node:<n>           string gateway id holding message-id node n (0..1023), with a lease.

A gateway heartbeats every HEARTBEAT_S. One that missed DEAD_AFTER_MS is dead: the first
live gateway to notice (ZREM decides which) removes every presence entry that still names
it, so pushes stop being routed to it. Its node lease expires by itself; a restarted
gateway gets a new gateway id and another node, so message ids never repeat.

Presence is a routing hint, never a delivery guarantee: an entry can be stale for up to
DEAD_AFTER_MS + HEARTBEAT_S, and a push routed to a gateway that no longer holds the device
is dropped. The offline inbox is what guarantees delivery.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from improto_server.deferreds import as_deferred
from improto_server.ids import MAX_NODE
from improto_server.production.redis_connection import (
    LuaScript,
    RedisClient,
    gather,
    load_scripts,
    text,
)
from improto_server.production.redis_slots import slot_groups
from improto_server.reactor_types import server_reactor

_log = Logger()

HEARTBEAT_S = 2.0
DEAD_AFTER_MS = 10_000
NODE_LEASE_MS = 60_000  # a node id is reused at the earliest this long after its last renewal

# KEYS[1] presence hash. ARGV: device, value. Returns the value it replaced (or false).
_CLAIM = LuaScript(
    """
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return old
"""
)

# KEYS[1] presence hash. ARGV: device, value. Deletes the field only if it still holds value
# (a newer session of the device, here or elsewhere, keeps its entry).
_RELEASE = LuaScript(
    """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""
)

# KEYS[1] presence hash. ARGV: device, gateway prefix "<gid>/". Deletes the field if it
# names that gateway (cleanup after its death).
_FORGET = LuaScript(
    """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v and string.sub(v, 1, string.len(ARGV[2])) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""
)

# KEYS: presence hashes. Returns one flat HGETALL reply per key.
_LOOKUP = LuaScript(
    """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HGETALL', KEYS[i])
end
return out
"""
)

# KEYS[1] node key. ARGV: gateway id, lease ms. Takes the node if free, renews it if ours.
_LEASE = LuaScript(
    """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
)

SCRIPTS = (_CLAIM, _RELEASE, _FORGET, _LOOKUP, _LEASE)


class Presence:
    """The presence map and the gateway registry, seen from one gateway (`gateway_id`)."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        *,
        gateway_id: str | None = None,
        reactor: IReactorTime | None = None,
        cluster: bool = False,
        heartbeat_s: float = HEARTBEAT_S,
        dead_after_ms: int = DEAD_AFTER_MS,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.gateway_id = gateway_id or uuid.uuid4().hex[:12]
        if "/" in self.gateway_id:
            raise ValueError("a gateway id cannot contain '/'")
        self._reactor = reactor or server_reactor()
        self._cluster = cluster
        self._heartbeat_s = heartbeat_s
        self._dead_after_ms = dead_after_ms
        self._sessions = 0
        self._beat: LoopingCall | None = None
        self.node: int | None = None
        self.cleaned: list[str] = []  # dead gateways this one cleaned up (tests, logs)
        self.on_revived: Callable[[], object] | None = None
        self._announced = False

    # ------------------------------------------------------------------ keys

    def presence_key(self, user_id: int) -> str:
        return f"{self._prefix}:presence:{{u{user_id}}}"

    def _devices_key(self, gateway_id: str) -> str:
        return f"{self._prefix}:gwdev:{{g{gateway_id}}}"

    @property
    def _gateways_key(self) -> str:
        return f"{self._prefix}:gateways"

    def _node_key(self, node: int) -> str:
        return f"{self._prefix}:node:{node}"

    # ------------------------------------------------------------- lifecycle

    @as_deferred
    async def start(self, *, lease_node: bool = True) -> None:
        """Load the scripts, lease a node id (if asked), announce this gateway, and start
        heartbeating (which also cleans up after dead gateways)."""
        await load_scripts(self._redis, SCRIPTS)
        if lease_node:
            self.node = await self._lease_any()
        await self._heartbeat()
        self._beat = LoopingCall(self._tick)
        self._beat.clock = self._reactor
        self._beat.start(self._heartbeat_s, now=False)

    async def _lease_any(self) -> int:
        for node in range(MAX_NODE + 1):
            got = await _LEASE(
                self._redis, [self._node_key(node)], [self.gateway_id, NODE_LEASE_MS]
            )
            if int(got):
                return node
        raise RuntimeError(f"all {MAX_NODE + 1} message-id nodes are leased")

    def _tick(self) -> Deferred[None]:
        d = self._heartbeat()
        d.addErrback(lambda f: _log.failure("presence heartbeat failed", f))
        return d

    @as_deferred
    async def _heartbeat(self) -> None:
        now = await self._now_ms()
        added = await self._redis.execute_command("ZADD", self._gateways_key, now, self.gateway_id)
        if int(added) and self._announced and self.on_revived is not None:
            # Declared dead (a pause longer than DEAD_AFTER_MS) and cleaned up: the gateway
            # must announce its live sessions again.
            _log.warn("gateway {gid} was presumed dead; re-announcing", gid=self.gateway_id)
            self.on_revived()
        self._announced = True
        if self.node is not None:
            kept = await _LEASE(self._redis, [self._node_key(self.node)],
                                [self.gateway_id, NODE_LEASE_MS])  # fmt: skip
            if not int(kept):  # only after a pause longer than the lease: ids could repeat
                _log.critical("lost message-id node {node}", node=self.node)
        dead = await self._redis.execute_command(
            "ZRANGEBYSCORE", self._gateways_key, "-inf", now - self._dead_after_ms
        )
        for gid in map(text, dead):
            if gid != self.gateway_id and int(
                await self._redis.execute_command("ZREM", self._gateways_key, gid)
            ):
                await self.forget_gateway(gid)

    async def _now_ms(self) -> int:
        sec, usec = await self._redis.execute_command("TIME")
        return int(sec) * 1000 + int(usec) // 1000

    @as_deferred
    async def forget_gateway(self, gateway_id: str) -> int:
        """Remove every presence entry that still names `gateway_id`; returns how many."""
        devices_key = self._devices_key(gateway_id)
        members = await self._redis.execute_command("SMEMBERS", devices_key)
        removed = 0
        for member in members:
            user, _, device = text(member).partition("/")
            removed += int(
                await _FORGET(
                    self._redis, [self.presence_key(int(user))], [device, gateway_id + "/"]
                )
            )
        await self._redis.execute_command("DEL", devices_key)
        self.cleaned.append(gateway_id)
        _log.info("gateway {gid} is gone: {n} presence entries removed", gid=gateway_id,
                  n=removed)  # fmt: skip
        return removed

    @as_deferred
    async def close(self) -> None:
        """Stop heartbeating and withdraw this gateway's entries and lease."""
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        try:
            await self._redis.execute_command("ZREM", self._gateways_key, self.gateway_id)
            await self.forget_gateway(self.gateway_id)
            if self.node is not None:
                await self._redis.execute_command("DEL", self._node_key(self.node))
        except Exception:
            _log.failure("withdrawing gateway {gid} failed", gid=self.gateway_id)

    # ------------------------------------------------------------- sessions

    def new_session(self) -> str:
        """A presence value unique to one session on this gateway."""
        self._sessions += 1
        return f"{self.gateway_id}/{self._sessions}"

    @as_deferred
    async def claim(self, user_id: int, device_id: str, session: str) -> str | None:
        """Record that `session` holds the device; returns the session it replaced."""
        # The gateway's own index first: a janitor can then never miss the entry.
        await self._redis.execute_command(
            "SADD", self._devices_key(self.gateway_id), f"{user_id}/{device_id}"
        )
        old = await _CLAIM(self._redis, [self.presence_key(user_id)], [device_id, session])
        if old is None or old is False:
            return None
        return text(old)

    @as_deferred
    async def release(self, user_id: int, device_id: str, session: str) -> None:
        await _RELEASE(self._redis, [self.presence_key(user_id)], [device_id, session])

    @as_deferred
    async def lookup(self, users: Iterable[int]) -> dict[int, dict[str, str]]:
        """user -> {device: session} for every user with a presence entry."""
        users = list(dict.fromkeys(users))
        groups = slot_groups(users, self.presence_key, self._cluster)
        replies = await gather(
            _LOOKUP(self._redis, [self.presence_key(u) for u in group], []) for group in groups
        )
        out: dict[int, dict[str, str]] = {}
        for group, reply in zip(groups, replies, strict=True):
            for user, flat in zip(group, reply, strict=True):
                if flat:
                    out[user] = {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}
        return out


def gateway_of(session: str) -> str:
    return session.partition("/")[0]
