"""A Redis Cluster client over txredisapi connections: one pipelined connection per master,
each command sent to the master of its key's slot (docs/ARCHITECTURE.md, "Redis Cluster").

txredisapi has no Cluster support; the stores only call `execute_command`, so routing that
one method is enough. The slot map comes from CLUSTER SLOTS (asked of any node that answers)
and is kept current by the replies: MOVED updates a slot and refreshes the whole map in the
background, ASK sends ASKING and the command back to back on the target's one connection (so
they arrive together), TRYAGAIN / CLUSTERDOWN / a master that cannot be reached are retried
with a short backoff and a fresh map until `retry_for` has passed (a failover). A command
whose connection is lost after it was sent is not retried here (it may have run): the caller
gets the ConnectionError, as from a single Redis, and the map is refreshed for the next one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import txredisapi

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto_server.production.redis_connection import _NoDelayRedis
from improto_server.production.redis_slots import SLOTS, key_slot
from improto_server.reactor_types import IServerReactor

log = Logger()

# Commands without a key that any master answers (PING, TIME) or that go to every master
# (SCRIPT: a script is cached per node).
_ANY_NODE = frozenset({b"PING", b"TIME", b"INFO", b"CLUSTER", b"ECHO"})
_EVERY_MASTER = frozenset({b"SCRIPT"})
_EVAL = frozenset({b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL"})
# Retried after a pause and a fresh map: the slot is moving or its master failing over.
_TRANSIENT = ("TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "LOADING")


def _word(value: bytes | str | int) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


@functools.lru_cache(maxsize=65536)
def _slot(key: bytes) -> int:
    return key_slot(key)


def command_key(args: Sequence[Any]) -> bytes | None:
    """The key a command is routed by: a script's first key, else the first argument; None
    for a script without keys and for the keyless commands (routed to any master)."""
    name = _word(args[0]).upper()
    if name in _EVAL:
        return _word(args[3]) if int(args[2]) > 0 else None
    if name in _ANY_NODE or name in _EVERY_MASTER or len(args) < 2:
        return None
    if name == b"SCAN":
        raise ValueError("SCAN on Redis Cluster sees one node: scan each of masters()")
    return _word(args[1])


class _Node:
    """One master: a single pipelined connection, made when first needed and again after it
    is lost. A command sent on it is answered in order (ASKING relies on that)."""

    def __init__(self, reactor: IServerReactor, addr: str, reply_timeout: float) -> None:
        self.addr = addr
        host, _, port = addr.rpartition(":")
        self._endpoint = HostnameEndpoint(reactor, host, int(port), timeout=reply_timeout)
        self._reply_timeout = reply_timeout
        self._proto: _NoDelayRedis | None = None
        self._waiters: list[Deferred[_NoDelayRedis]] = []  # callers waiting for a connection
        self.closed = False

    async def connection(self) -> _NoDelayRedis:
        proto = self._proto
        if proto is not None and proto.connected:
            return proto
        if self.closed:
            raise txredisapi.ConnectionError(f"{self.addr}: closed")
        waiter: Deferred[_NoDelayRedis] = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:  # the first caller connects, the others wait for it
            connecting = connectProtocol(
                self._endpoint,
                _NoDelayRedis(charset=None, convertNumbers=False, replyTimeout=self._reply_timeout),
            )
            connecting.addBoth(self._connected)
        return await waiter

    def _connected(self, result: _NoDelayRedis | Failure) -> None:
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure):
            error = _Unreached(f"{self.addr}: {result.value}")
            for waiter in waiters:
                waiter.errback(error)
            return
        self._proto = result
        if self.closed and result.transport is not None:
            result.transport.loseConnection()
        for waiter in waiters:
            waiter.callback(result)

    async def execute(self, args: Sequence[Any], *, asking: bool = False) -> Any:
        proto = await self.connection()
        if asking:
            ok = proto.execute_command(b"ASKING")  # same connection, right before the command
            reply = proto.execute_command(*args)
            await ok
            return await reply
        return await proto.execute_command(*args)

    def close(self) -> None:
        self.closed = True
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.loseConnection()


class ReplicationTimeout(txredisapi.ConnectionError):
    """WAIT returned fewer replicas than asked for: the writes may not survive a failover."""


class _Unreached(txredisapi.ConnectionError):
    """The command was not sent: the node could not be connected to (safe to retry)."""


def parse_addr(addr: str, default_port: int = 6379) -> str:
    host, sep, port = addr.strip().rpartition(":")
    if not sep:
        host, port = addr.strip(), str(default_port)
    return f"{host or '127.0.0.1'}:{int(port)}"


class ClusterRedis:
    """`execute_command` as a txredisapi pool's, over a Redis Cluster. `seeds`: any of its
    nodes, "host:port". `start()` reads the slot map; commands before it wait for it."""

    def __init__(
        self,
        seeds: Iterable[str],
        reactor: IServerReactor,
        *,
        reply_timeout: float = 10.0,
        retry_for: float = 15.0,
        max_redirects: int = 16,
    ) -> None:
        self._seeds = [parse_addr(s) for s in seeds]
        if not self._seeds:
            raise ValueError("a Redis Cluster needs at least one seed node")
        self._reactor = reactor
        self._reply_timeout = reply_timeout
        self._retry_for = retry_for
        self._max_redirects = max_redirects
        self._slots: list[str | None] = [None] * SLOTS
        self._nodes: dict[str, _Node] = {}
        self._mapped = False  # a slot map was read
        self._waiters: list[Deferred[None]] = []
        self.refreshes = 0  # how many times the slot map was read (tests, metrics)

    # -------------------------------------------------------------------- the slot map

    def _node(self, addr: str) -> _Node:
        node = self._nodes.get(addr)
        if node is None:
            node = self._nodes[addr] = _Node(self._reactor, addr, self._reply_timeout)
        return node

    def _masters(self) -> list[_Node]:
        """The masters of the current slot map, by address."""
        return [self._node(a) for a in sorted({a for a in self._slots if a})]

    def masters(self) -> list[_NodeClient]:
        """A client per master of the current map (SCAN, per-node work)."""
        return [_NodeClient(node) for node in self._masters()]

    def refresh(self) -> Deferred[None]:
        """Read the slot map again: one read at a time, whose result every caller shares."""
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            Deferred.fromCoroutine(self._refresh()).addBoth(self._refreshed)
        return waiter

    def _refreshed(self, result: object) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    async def _refresh(self) -> None:
        candidates = list(dict.fromkeys([*(a for a in self._slots if a), *self._seeds]))
        errors = []
        for addr in candidates:
            try:
                reply = await self._node(addr).execute([b"CLUSTER", b"SLOTS"])
            except Exception as e:  # another node may answer
                errors.append(f"{addr}: {e}")
                continue
            self._apply(addr, reply)
            return
        raise txredisapi.ConnectionError("no cluster node answered: " + "; ".join(errors))

    def _apply(self, asked: str, reply: list[Any]) -> None:
        slots: list[str | None] = [None] * SLOTS
        asked_host = asked.rpartition(":")[0]
        for start, end, master, *_replicas in reply:
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            addr = f"{host or asked_host}:{int(master[1])}"
            self._node(addr)
            slots[int(start) : int(end) + 1] = [addr] * (int(end) - int(start) + 1)
        self._slots = slots
        self._mapped = True
        self.refreshes += 1
        live = set(slots)
        for addr in [a for a in self._nodes if a not in live and a not in self._seeds]:
            self._nodes.pop(addr).close()  # a former master (failed over): its replies are stale

    # --------------------------------------------------------------------- commands

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._execute(args))

    async def _execute(self, args: Sequence[Any]) -> Any:
        key = command_key(args)
        name = _word(args[0]).upper()
        if name in _EVERY_MASTER:
            return await self._every_master(args)
        deadline = self._reactor.seconds() + self._retry_for
        pause = 0.05
        asking: str | None = None
        redirects = 0
        while True:
            if not self._mapped:
                await self.refresh()
            addr = asking
            if addr is None and key is not None:
                addr = self._slots[_slot(key)]
            if addr is None:  # a keyless command, or a slot no master serves
                addr = next((a for a in self._slots if a), None)
                if addr is None:
                    raise txredisapi.ConnectionError("the cluster serves no slot")
            try:
                return await self._node(addr).execute(args, asking=asking is not None)
            except txredisapi.ResponseError as e:
                text = str(e)
                word, _, rest = text.partition(" ")
                if word in ("MOVED", "ASK") and redirects < self._max_redirects:
                    redirects += 1
                    slot, _, target = rest.partition(" ")
                    target = parse_addr(target)
                    if word == "MOVED":
                        self._slots[int(slot)] = target
                        asking = None
                        self._refresh_soon()
                    else:
                        asking = target
                    continue
                if not text.startswith(_TRANSIENT) or self._reactor.seconds() >= deadline:
                    raise
            except _Unreached:
                if self._reactor.seconds() >= deadline:
                    raise
            asking = None
            await deferLater(self._reactor, pause, lambda: None)
            pause = min(pause * 2, 1.0)
            try:
                await self.refresh()
            except txredisapi.ConnectionError:
                pass  # no node answers yet: try again until the deadline

    def _refresh_soon(self) -> None:
        d = self.refresh()
        d.addErrback(lambda f: log.failure("reading the cluster slot map failed", f))

    async def _every_master(self, args: Sequence[Any]) -> Any:
        if not self._mapped:
            await self.refresh()
        nodes = self._masters()
        results = await DeferredList(
            [Deferred.fromCoroutine(n.execute(args)) for n in nodes], consumeErrors=True
        )
        for ok, value in results:
            if not ok:
                value.raiseException()
        return results[0][1]

    def start(self) -> Deferred[None]:
        return self.refresh()

    def replicated(self, replicas: int, timeout_ms: int) -> Deferred[None]:
        """WAIT on every master's connection: the writes sent on it so far (every write this
        process sent that master: one connection each) have reached `replicas` replicas, or
        ReplicationTimeout after `timeout_ms`. What a failover can still lose is then at most
        what arrived after the WAIT (docs/GUARANTEES.md)."""
        return Deferred.fromCoroutine(self._replicated(replicas, timeout_ms))

    async def _replicated(self, replicas: int, timeout_ms: int) -> None:
        if not self._mapped:
            await self.refresh()
        nodes = self._masters()
        results = await DeferredList(
            [Deferred.fromCoroutine(n.execute([b"WAIT", replicas, timeout_ms])) for n in nodes],
            consumeErrors=True,
        )
        short = []
        for node, (ok, value) in zip(nodes, results, strict=True):
            if not ok:
                value.raiseException()
            if int(value) < replicas:
                short.append(f"{node.addr}: {int(value)} of {replicas}")
        if short:
            raise ReplicationTimeout("writes not on enough replicas: " + ", ".join(short))

    def disconnect(self) -> Deferred[None]:
        for node in self._nodes.values():
            node.close()
        self._nodes.clear()
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


class _NodeClient:
    """One node as a RedisClient (for SCAN over each master)."""

    def __init__(self, node: _Node) -> None:
        self._node = node
        self.addr = node.addr

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._node.execute(args))


def scan_targets(redis: Any) -> list[Any]:
    """Where a SCAN over every key must run: each master of a cluster, else the one Redis.
    (`getattr` cannot tell: a txredisapi pool answers every attribute with a command.)"""
    return list(redis.masters()) if isinstance(redis, ClusterRedis) else [redis]
