"""The Redis plumbing the production stores share: the txredisapi pool, Lua scripts run by
their hash, and waiting for many commands at once."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import txredisapi

from twisted.internet.defer import Deferred, DeferredList
from twisted.python.failure import Failure

from improto_server.deferreds import as_deferred


class RedisClient(Protocol):
    """The part of a txredisapi connection or pool (charset=None) the stores use."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]: ...


def connect(
    host: str = "127.0.0.1", port: int = 6379, *, poolsize: int = 4, reply_timeout: float = 10
) -> txredisapi.ConnectionHandler:
    """A lazy txredisapi pool as the stores need it: bytes in and out (charset=None), and
    integer replies left as Redis sent them. The caller owns it (`disconnect()`)."""
    pool = txredisapi.lazyConnectionPool(
        host,
        port,
        poolsize=poolsize,
        charset=None,
        convertNumbers=False,
        replyTimeout=reply_timeout,
    )
    # The pool connects later (from the reactor), so its protocol class can still be swapped.
    pool._factory.protocol = _NoDelayRedis
    return pool


class _NoDelayRedis(txredisapi.RedisProtocol):
    """Commands leave at once: with Nagle on, a command written while an earlier one is
    unacknowledged waits for the server's delayed ACK (up to ~40 ms)."""

    def connectionMade(self) -> Any:
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        return super().connectionMade()


def check_binary(redis: object) -> None:
    """Refuse a txredisapi connection or pool that decodes replies: message bodies are binary."""
    # A pool's handler forwards unknown attributes as commands: read its factory's setting.
    owner = redis if isinstance(redis, txredisapi.BaseRedisProtocol) else None
    owner = owner or getattr(redis, "_factory", None)
    if owner is not None and getattr(owner, "charset", None) is not None:
        raise ValueError("the Redis connection must be made with charset=None")


class LuaScript:
    """A script run by its SHA1 (EVALSHA); EVAL when the server does not know it (a restart,
    a failover, SCRIPT FLUSH, another cluster node), which also caches it there again.

    txredisapi's own `eval` remembers hashes per pooled connection and so sends the whole
    source once per connection; here it is loaded once, at start."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest()

    def load(self, redis: RedisClient) -> Deferred[None]:
        def check(sha: bytes) -> None:
            if sha.decode() != self.sha:
                raise RuntimeError(f"SCRIPT LOAD returned {sha!r}, expected {self.sha}")

        return redis.execute_command("SCRIPT", "LOAD", self.source).addCallback(check)

    def __call__(
        self, redis: RedisClient, keys: Sequence[str], args: Sequence[Any]
    ) -> Deferred[Any]:
        d = redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        d.addErrback(self._noscript, redis, keys, args)
        return d

    def _noscript(
        self, failure: Failure, redis: RedisClient, keys: Sequence[str], args: Sequence[Any]
    ) -> Deferred[Any] | Failure:
        failure.trap(txredisapi.ResponseError)
        if not str(failure.value).startswith("NOSCRIPT"):
            return failure
        return redis.execute_command("EVAL", self.source, len(keys), *keys, *args)


@as_deferred
async def load_scripts(redis: RedisClient, scripts: Iterable[LuaScript]) -> None:
    """SCRIPT LOAD each of `scripts` (optional for the callers: EVAL is the fallback)."""
    await gather(script.load(redis) for script in scripts)


async def gather(ds: Iterable[Deferred[Any]]) -> list[Any]:
    """Wait for all (nothing left in flight), then raise the first failure as it was."""
    results = await DeferredList(list(ds), consumeErrors=True)
    out = []
    for ok, value in results:
        if not ok:
            assert isinstance(value, Failure)
            value.raiseException()
        out.append(value)
    return out


def glob_escape(text: str) -> str:
    """`text` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def text(value: bytes | str | int) -> str:
    """A Redis reply (bytes with charset=None) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
