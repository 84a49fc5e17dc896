"""The production backend: the four storage ports on RabbitMQ, Redis and HBase.

    queue   RabbitQueue   durable, confirmed publishes; dedup keys in Redis
    inbox   RedisInbox    per-user inboxes, cursors and device positions (Lua, {u<id>} tags)
    groups  RedisGroups   groups and memberships (one {groups} slot: limits are atomic)
    history HBaseHistory  per-conversation history (happybase on its own thread pool)

One txredisapi pool serves the inbox, the groups and the queue's dedup keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from improto_server.config import Config
from improto_server.ids import wall_ms
from improto_server.production.hbase_history import HBaseHistory
from improto_server.production.rabbit_queue import RabbitQueue
from improto_server.production.redis_groups import RedisGroups
from improto_server.production.redis_inbox import RedisInbox, connect


def _host_port(value: str, default_port: int) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return (host, int(port)) if host else (value, default_port)


class ProductionBackend:
    def __init__(
        self,
        config: Config,
        reactor: Any,
        now_ms: Callable[[], int] = wall_ms,
        *,
        hbase_family_ttl: bool = True,  # off only for tests whose clock is not wall time
    ) -> None:
        self.config = config
        redis_host, redis_port = _host_port(config.redis, 6379)
        hbase_host, hbase_port = _host_port(config.hbase, 9090)
        self.redis = connect(redis_host, redis_port)
        prefix = config.key_prefix
        self.inbox = RedisInbox(self.redis, prefix, now_ms, config.inbox_retention_ms)
        self.groups = RedisGroups(self.redis, prefix)
        self.queue = RabbitQueue(
            config.amqp,
            redis=self.redis,
            prefix=prefix,
            partitions=config.queue_partitions,
            dedup_ttl_ms=config.inbox_retention_ms,
            now_ms=now_ms,
            reactor=reactor,
        )
        self.history = HBaseHistory(
            hbase_host,
            hbase_port,
            config.hbase_table,
            now_ms=now_ms,
            retention_ms=config.history_retention_ms,
            reactor=reactor,
            family_ttl=hbase_family_ttl,
        )

    def start(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        await self.inbox.start()
        await self.groups.start()
        await self.history.start()
        await self.queue.start()

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        await self.queue.close()  # stop consuming first: handlers still use the stores
        await self.history.close()
        await self.redis.disconnect()

    def sweep(self) -> Deferred[dict[str, int]]:
        """Trim expired inbox entries (Redis TTLs and HBase's family TTL do the rest)."""
        d = self.inbox.sweep()
        d.addCallback(lambda n: {"inbox": n})
        return d
