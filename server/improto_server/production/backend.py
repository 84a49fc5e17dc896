"""The production backend: the storage ports on RabbitMQ, Redis and HBase.

    queue          RabbitQueue         durable, confirmed publishes; dedup keys in Redis
    inbox          RedisInbox          inboxes, cursors, device positions (Lua, {u<id>} tags)
    conversations  RedisConversations  conversation lists, read positions (Lua, {u<id>} tags)
    groups         RedisGroups         groups, memberships (per-group and per-user slots)
    devices        RedisDevices        push registrations, revocations (Lua, {u<id>} tags)
    history        HBaseHistory        per-conversation history (happybase, own thread pool)
    timeline       ProductionTimeline  large groups' timelines: seqs in Redis ({g<id>} tags),
                                       records in the history's table (its pool)

One txredisapi pool serves the inbox, the conversation lists, the groups, the devices, the
queue's dedup keys and the presence of the push routers; the push routers share the queue's
AMQP connection.
"""

from __future__ import annotations

from collections.abc import Callable

import txredisapi

from twisted.internet.defer import Deferred, gatherResults

from improto_server.config import Config
from improto_server.deferreds import as_deferred
from improto_server.health import Health, probe
from improto_server.ids import wall_ms
from improto_server.model import ConvKey
from improto_server.production.hbase_history import HBaseHistory
from improto_server.production.presence import Presence
from improto_server.production.push_router import AmqpPushRouter
from improto_server.production.rabbit_notify import RabbitNotifyQueue
from improto_server.production.rabbit_queue import RabbitQueue
from improto_server.production.redis_cluster import ClusterRedis
from improto_server.production.redis_connection import connect
from improto_server.production.redis_conversations import RedisConversations
from improto_server.production.redis_devices import RedisDevices
from improto_server.production.redis_groups import RedisGroups
from improto_server.production.redis_inbox import RedisInbox
from improto_server.production.timeline import ProductionTimeline
from improto_server.reactor_types import IServerReactor, server_reactor


def _host_port(value: str, default_port: int) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return (host, int(port)) if host else (value, default_port)


class ProductionBackend:
    def __init__(
        self,
        config: Config,
        reactor: IServerReactor | None = None,
        now_ms: Callable[[], int] = wall_ms,
        *,
        hbase_family_ttl: bool = True,  # off only for tests whose clock is not wall time
    ) -> None:
        self.config = config
        self._reactor = reactor = reactor or server_reactor()
        hbase_host, hbase_port = _host_port(config.hbase, 9090)
        self.redis: txredisapi.ConnectionHandler | ClusterRedis
        # On a Redis Cluster every multi-key script call is split by slot (redis_slots.py).
        self.redis_cluster = cluster = bool(config.redis_cluster)
        if cluster:
            seeds = [s for s in config.redis_cluster.split(",") if s.strip()]
            self.redis = ClusterRedis(seeds, reactor)
        else:
            self.redis = connect(*_host_port(config.redis, 6379))
        prefix = config.key_prefix
        self.inbox = RedisInbox(
            self.redis, prefix, now_ms, config.inbox_retention_ms, caps=config.inbox_caps,
            cluster=cluster,
        )  # fmt: skip
        self.conversations = RedisConversations(
            self.redis, prefix, now_ms, config.history_retention_ms, cluster=cluster
        )
        self.groups = RedisGroups(
            self.redis, prefix, large_threshold=config.large_group_threshold, cluster=cluster,
            now_ms=now_ms,
        )  # fmt: skip
        self.devices = RedisDevices(self.redis, prefix, now_ms, cluster=cluster)
        self.notify_queue = RabbitNotifyQueue(config.amqp, prefix=prefix, reactor=reactor)
        self.queue = RabbitQueue(
            config.amqp,
            redis=self.redis,
            prefix=prefix,
            partitions=config.queue_partitions,
            dedup_ttl_ms=config.inbox_retention_ms,
            now_ms=now_ms,
            reactor=reactor,
            redis_cluster=cluster,
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
        self.timeline = ProductionTimeline(self.redis, self.history, prefix, cluster=cluster)

    def replication_barrier(self) -> Callable[[], Deferred[None]] | None:
        """The persister's wait before an ack, when configured (redis_wait_replicas on a
        Redis Cluster): a batch's Redis writes are on that many replicas of each master."""
        config, redis = self.config, self.redis
        if not isinstance(redis, ClusterRedis) or config.redis_wait_replicas <= 0:
            return None
        return lambda: redis.replicated(config.redis_wait_replicas, config.redis_wait_timeout_ms)

    @as_deferred
    async def start(self) -> None:
        if isinstance(self.redis, ClusterRedis):
            await self.redis.start()  # the slot map
        await self.inbox.start()
        await self.conversations.start()
        await self.groups.start()
        await self.devices.start()
        await self.history.start()
        await self.timeline.start()
        await self.queue.start()
        await self.notify_queue.start()

    def push_router(self) -> AmqpPushRouter:
        """A push router for a gateway: presence in this backend's Redis, pushes over the
        queue's AMQP connection (`start(hub)` it)."""
        config = self.config
        presence = Presence(
            self.redis, config.key_prefix, gateway_id=config.gateway_id, reactor=self._reactor,
            cluster=self.redis_cluster,
        )  # fmt: skip
        return AmqpPushRouter(self.queue, presence, config.key_prefix, self._reactor)

    @as_deferred
    async def health(self) -> Health:
        """One cheap call to each service, at once: PING, the persist queues' depth (AMQP
        messages ready, each one or more jobs), a one-row history scan."""
        clock = self._reactor
        depth: list[int] = []
        redis, rabbitmq, hbase = await gatherResults(
            [
                probe(lambda: self.redis.execute_command("PING"), clock),
                probe(lambda: self.queue.backlog().addCallback(depth.append), clock),
                probe(lambda: self.history.page(ConvKey.direct(1, 1), 0, 1, 0, 1), clock),
            ]
        )
        services = {"redis": redis, "rabbitmq": rabbitmq, "hbase": hbase}
        return Health(services, depth[0] if depth else None)

    @as_deferred
    async def close(self) -> None:
        await self.notify_queue.close()  # stop consuming first: handlers still use the stores
        await self.queue.close()
        await self.history.close()
        await self.redis.disconnect()

    def sweep(self) -> Deferred[dict[str, int]]:
        """Trim expired inbox entries. Nothing else to sweep: conversation rows are removed
        by the scripts that touch a user's list (and idle lists by their Redis TTLs), history
        and timeline rows by HBase's family TTL (reads filter them by the clock), timeline
        state by its Redis TTLs."""
        d = self.inbox.sweep()
        return d.addCallback(lambda n: {"inbox": n})
