"""Contract backend "sqlite+rabbit": the embedded SQLite backend whose queue is a RabbitQueue
(RabbitMQ at 127.0.0.1:5672, dedup keys in the Redis at 127.0.0.1:6379).

Queue names and Redis keys live under a prefix derived from the test's data directory, so a
restart (a new instance on the same directory) reaches the same queue. A test's queues and
keys are deleted by `destroy()` at its end (where the conftest calls that hook), else when
the next test creates its backend, and at interpreter exit; a new prefix is also cleaned
before first use, for runs that reuse a --basetemp. Only our own queues/exchange and keys
are ever touched.

RabbitMQ or Redis unreachable: the test is skipped, or fails when CI is set.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pytest
from services import delete_redis_prefix

from twisted.internet.defer import Deferred

from improto_server.embedded.sqlite import SQLiteBackend
from improto_server.production.rabbit_queue import RabbitQueue, queue_names

AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672
AMQP_URL = f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/%2F"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
DAY_MS = 86_400_000
INBOX_RETENTION_MS = 7 * DAY_MS  # the contract suite's retentions (conftest.py)
HISTORY_RETENTION_MS = 180 * DAY_MS
PREFIX_ROOT = "improto-rabbit-contract"
PARTITIONS = 1  # the contract expects one global acceptance order


def require_services() -> None:
    """Skip the calling test unless RabbitMQ and Redis answer; under CI fail instead."""
    for name, host, port in (("RabbitMQ", AMQP_HOST, AMQP_PORT), ("Redis", REDIS_HOST, REDIS_PORT)):
        try:
            socket.create_connection((host, port), timeout=1.0).close()
        except OSError as e:
            if "CI" in os.environ:
                raise RuntimeError(f"{name} at {host}:{port} is required under CI: {e}") from e
            pytest.skip(f"{name} not reachable at {host}:{port}: {e}")


def delete_prefix(prefix: str, partitions: int = PARTITIONS) -> None:
    """Delete the queues, the dead-letter exchange and the Redis keys of `prefix` (blocking,
    usable outside the reactor)."""
    names = queue_names(prefix, partitions)
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        ch = conn.channel()
        for queue in (*names.partitions, names.dead_queue):
            ch.queue_delete(queue)
        ch.exchange_delete(names.dead_exchange)
    finally:
        conn.close()
    delete_redis_prefix(prefix)


def prefix_for(data_dir: Path) -> str:
    digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return f"{PREFIX_ROOT}-{digest}"


class SQLiteRabbitBackend:
    """SQLiteBackend for inboxes, history and groups; its queue replaced by a RabbitQueue."""

    def __init__(self, data_dir: Path, clock: Callable[[], int]) -> None:
        self.prefix = prefix_for(data_dir)
        self._sqlite = SQLiteBackend(
            data_dir / "improto.sqlite3",
            now_ms=clock,
            inbox_retention_ms=INBOX_RETENTION_MS,
            history_retention_ms=HISTORY_RETENTION_MS,
        )
        self.queue = RabbitQueue(
            AMQP_URL,
            redis_host=REDIS_HOST,
            redis_port=REDIS_PORT,
            prefix=self.prefix,
            partitions=PARTITIONS,
            now_ms=clock,
        )
        # SQLiteBackend.close() stops its queue before closing the database: keep it so.
        self._sqlite.queue = self.queue  # type: ignore[assignment]
        self.inbox = self._sqlite.inbox
        self.history = self._sqlite.history
        self.groups = self._sqlite.groups

    def start(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            await self.queue.start()
            await self._sqlite.start()
        except BaseException:
            await self.close()
            raise

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        try:
            await self._sqlite.close()  # closes the queue first (consumer, connection)
        finally:
            await self.queue.close()  # once started only by us; idempotent

    def sweep(self) -> Deferred[dict[str, int]]:
        return self._sqlite.sweep()

    def destroy(self) -> None:
        """End of the test (called after close() where the conftest has this hook): delete
        the test's queues, exchange and keys now rather than at the next test."""
        global _current_prefix
        delete_prefix(self.prefix)
        if _current_prefix == self.prefix:
            _current_prefix = None


_current_prefix: str | None = None  # the data of the test running now


def _cleanup_at_exit() -> None:
    if _current_prefix is not None:
        try:
            delete_prefix(_current_prefix)
        except Exception:
            pass  # a service went away: nothing can be cleaned


atexit.register(_cleanup_at_exit)


def _factory(data_dir: Path, clock: Callable[[], int]) -> SQLiteRabbitBackend:
    global _current_prefix
    require_services()
    prefix = prefix_for(data_dir)
    if prefix != _current_prefix:  # a new test, not a restart: the previous test is over
        if _current_prefix is not None:
            delete_prefix(_current_prefix)
        delete_prefix(prefix)
        _current_prefix = prefix
    return SQLiteRabbitBackend(data_dir, clock)


def register(backends: dict[str, Any]) -> None:
    backends["sqlite+rabbit"] = _factory
