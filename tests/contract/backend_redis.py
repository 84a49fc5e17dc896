"""Contract backend "sqlite+redis": the embedded SQLite backend for the queue and history,
with the inboxes and groups on the Redis at 127.0.0.1:6379.

Keys live under a prefix derived from the test's data directory, so a restart (a new
instance on the same directory) reaches the same data. The contract conftest gives a backend
no end-of-test hook (close() also ends every restart), so a test's keys are deleted (SCAN +
DEL on its prefix only) when the next test creates its backend, and at interpreter exit;
a new prefix is also cleaned before first use, for runs that reuse a --basetemp.

Redis unreachable: the test is skipped, or fails when CI is set.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from services import SyncRedis, delete_redis_prefix

from twisted.internet.defer import Deferred

from improto_server.embedded.sqlite import SQLiteBackend
from improto_server.production.redis_groups import RedisGroups
from improto_server.production.redis_inbox import RedisInbox, connect

HOST, PORT = "127.0.0.1", 6379
DAY_MS = 86_400_000
INBOX_RETENTION_MS = 7 * DAY_MS  # the contract suite's retentions (conftest.py)
HISTORY_RETENTION_MS = 180 * DAY_MS
PREFIX_ROOT = "improto-contract"


def require_redis() -> None:
    """Skip the calling test if Redis does not answer; under CI fail instead."""
    try:
        client = SyncRedis(timeout=1.0)
        try:
            if client("PING") != b"PONG":
                raise ConnectionError("PING was not answered with PONG")
        finally:
            client.close()
    except OSError as e:
        if "CI" in os.environ:
            raise RuntimeError(f"Redis at {HOST}:{PORT} is required under CI: {e}") from e
        pytest.skip(f"Redis not reachable at {HOST}:{PORT}: {e}")


def delete_prefix(prefix: str) -> None:
    delete_redis_prefix(prefix)


def prefix_for(data_dir: Path) -> str:
    digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return f"{PREFIX_ROOT}:{digest}"


class SQLiteRedisBackend:
    """Queue and history from SQLiteBackend; inbox and groups on Redis."""

    def __init__(self, data_dir: Path, clock: Callable[[], int]) -> None:
        self.prefix = prefix_for(data_dir)
        self._sqlite = SQLiteBackend(
            data_dir / "improto.sqlite3",
            now_ms=clock,
            inbox_retention_ms=INBOX_RETENTION_MS,
            history_retention_ms=HISTORY_RETENTION_MS,
        )
        self.redis = connect(HOST, PORT)
        self.queue = self._sqlite.queue
        self.history = self._sqlite.history
        self.inbox = RedisInbox(self.redis, self.prefix, clock, INBOX_RETENTION_MS)
        self.groups = RedisGroups(self.redis, self.prefix)
        self._closing: Deferred[None] | None = None

    def start(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            await self.redis.execute_command("PING")
            await self.inbox.start()
            await self.groups.start()
            await self._sqlite.start()
        except BaseException:
            await self.close()
            raise

    def close(self) -> Deferred[None]:
        """Stop both. A second call waits for the first close (whose caller sees errors)."""
        if self._closing is None:
            self._closing = Deferred.fromCoroutine(self._close())
            return self._closing
        waiter: Deferred[None] = Deferred()

        def fire(result: object) -> object:
            waiter.callback(None)
            return result

        self._closing.addBoth(fire)
        return waiter

    async def _close(self) -> None:
        # The SQLite queue's consumer may be writing inboxes: stop it before Redis.
        try:
            await self._sqlite.close()
        finally:
            await self.redis.disconnect()

    def sweep(self) -> Deferred[dict[str, int]]:
        return Deferred.fromCoroutine(self._sweep())

    async def _sweep(self) -> dict[str, int]:
        counts = await self._sqlite.sweep()
        counts["inbox"] = counts.get("inbox", 0) + await self.inbox.sweep()
        return counts


_current_prefix: str | None = None  # the data of the test running now


def _cleanup_at_exit() -> None:
    if _current_prefix is not None:
        try:
            delete_prefix(_current_prefix)
        except OSError:
            pass  # Redis went away: nothing can be cleaned


atexit.register(_cleanup_at_exit)


def _factory(data_dir: Path, clock: Callable[[], int]) -> SQLiteRedisBackend:
    global _current_prefix
    require_redis()
    prefix = prefix_for(data_dir)
    if prefix != _current_prefix:  # a new test, not a restart: the previous test is over
        if _current_prefix is not None:
            delete_prefix(_current_prefix)
        delete_prefix(prefix)
        _current_prefix = prefix
    return SQLiteRedisBackend(data_dir, clock)


def register(backends: dict[str, Any]) -> None:
    backends["sqlite+redis"] = _factory
