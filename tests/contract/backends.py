"""The backends of the contract suite: what each row of a port's tests runs on.

    sqlite      the embedded SQLiteBackend: every port
    memory      `--storage memory`: MemoryQueue (the rest on     queue
                the in-RAM SQLite database)
    redis       RedisInbox, RedisGroups, RedisConversations,       inbox, groups, conversations,
                RedisDevices (the rest SQLite)                     devices
    redis-cluster  the same on a Redis Cluster (ClusterRedis,      the same
                cluster=True; scripts/services start redis-cluster)
    hbase       HBaseHistory (the rest SQLite)                     history
    rabbitmq    RabbitQueue, its dedup keys in Redis,               queue, notify_queue
                RabbitNotifyQueue (rest SQLite)
    production  ProductionBackend, as `imserver --storage production` runs it: every port
    production-cluster  the same with `redis_cluster` (ClusterRedis): queue, timeline,
                persister (the Redis stores' own rows: redis-cluster)
                (timeline: Redis and HBase at once, so it has no single-service row)

A factory takes the test's data directory and the fake clock and returns an unstarted backend
(`start()`, `close()`, `sweep()`, `destroy()` and the ports). Called again with the same
directory it reaches the same data (the restart tests rely on that). Names on the services
(key prefixes, queues, tables) derive from the directory; a name is emptied before its first
use in this process (a killed run may have left data under it) and by `destroy()`, which the
fixture calls at the end of the test. Service addresses: tests.support.services.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from improto_server.config import Config
from improto_server.embedded.backend import SQLiteBackend
from tests.support import services
from tests.support.clock import DAY_MS, HISTORY_RETENTION_MS, INBOX_RETENTION_MS, FakeClock

Factory = Callable[[Path, FakeClock], Any]
_emptied: set[str] = set()  # names emptied before their first use in this process


def _name(data_dir: Path, root: str) -> str:
    """A name for this test's data on a service, the same for every restart."""
    digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return f"{root}{digest}"


def _fresh(name: str, empty: Callable[[], object]) -> None:
    if name not in _emptied:
        _emptied.add(name)
        empty()


def _sqlite(data_dir: Path, clock: FakeClock) -> SQLiteBackend:
    return SQLiteBackend(
        data_dir / "improto.sqlite3",
        now_ms=clock,
        inbox_retention_ms=INBOX_RETENTION_MS,
        history_retention_ms=HISTORY_RETENTION_MS,
    )


# The memory queues' state per test directory: a restart (a new backend over the same
# directory) finds the jobs the last one left, as the other rows' restarts find their data.
_memory_queues: dict[Path, Any] = {}


def _memory(data_dir: Path, clock: FakeClock) -> SQLiteBackend:
    """`--storage memory`: the in-RAM database (inline) and its MemoryQueue."""
    from twisted.internet import reactor

    from improto_server.embedded.memory_queue import MemoryQueue, MemoryQueueData

    backend = SQLiteBackend(
        ":memory:",
        now_ms=clock,
        inbox_retention_ms=INBOX_RETENTION_MS,
        history_retention_ms=HISTORY_RETENTION_MS,
    )
    data = _memory_queues.setdefault(Path(data_dir).resolve(), MemoryQueueData())
    backend.queue = MemoryQueue(reactor, clock, data)
    backend.destroy = lambda: _memory_queues.pop(Path(data_dir).resolve(), None)  # type: ignore[attr-defined]
    return backend


class Composed:
    """The SQLite backend with some of its ports on services' adapters.

    Starts the adapters' `opens`, then SQLite; closes SQLite first (its queue consumer, which
    may be writing inboxes or history, stops there), then the adapters' `closes`."""

    def __init__(
        self,
        sqlite: SQLiteBackend,
        ports: dict[str, Any],
        *,
        opens: list[Callable[[], Awaitable[object]]],
        closes: list[Callable[[], Awaitable[object]]],
        destroy: Callable[[], object],
    ) -> None:
        self._sqlite = sqlite
        self.queue, self.inbox = sqlite.queue, sqlite.inbox
        self.history, self.groups = sqlite.history, sqlite.groups
        self.conversations, self.devices = sqlite.conversations, sqlite.devices
        self.notify_queue, self.timeline = sqlite.notify_queue, sqlite.timeline
        for port, adapter in ports.items():
            setattr(self, port, adapter)
            if port == "queue":  # SQLiteBackend.close() stops its queue first: keep it so
                sqlite.queue = adapter
        self._opens, self._closes, self._destroy = opens, closes, destroy
        self._closing: Deferred[None] | None = None

    def start(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            for step in self._opens:
                await step()
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
        try:
            await self._sqlite.close()
        finally:
            for step in self._closes:
                await step()

    def sweep(self) -> Deferred[dict[str, int]]:
        return Deferred.fromCoroutine(self._sweep())

    async def _sweep(self) -> dict[str, int]:
        counts = await self._sqlite.sweep()
        if self.inbox is not self._sqlite.inbox:
            counts["inbox"] = counts.get("inbox", 0) + await self.inbox.sweep()
        sweep = getattr(self.conversations, "sweep", None)  # optional where reads filter
        if self.conversations is not self._sqlite.conversations and sweep is not None:
            counts["conversations"] = await sweep()
        # History on HBase: retention is the read-side filter (and the family TTL in
        # production), nothing to sweep.
        return counts

    def destroy(self) -> None:
        self._destroy()


# The service adapters are imported by their factories: the SQLite rows need none of them.


def _redis(data_dir: Path, clock: FakeClock, *, cluster: bool = False) -> Composed:
    """The Redis stores on the single Redis, or with `cluster` on the Redis Cluster
    (ClusterRedis, the stores' cluster=True)."""
    from twisted.internet import reactor

    from improto_server.production.redis_cluster import ClusterRedis
    from improto_server.production.redis_connection import connect
    from improto_server.production.redis_conversations import RedisConversations
    from improto_server.production.redis_devices import RedisDevices
    from improto_server.production.redis_groups import RedisGroups
    from improto_server.production.redis_inbox import RedisInbox

    prefix = _name(data_dir, "improto-contract:")
    empty = services.delete_cluster_prefix if cluster else services.delete_redis_prefix
    _fresh(prefix, lambda: empty(prefix))
    redis: Any
    if cluster:
        redis = ClusterRedis([str(services.REDIS_CLUSTER)], reactor)  # type: ignore[arg-type]
    else:
        redis = connect(services.REDIS.host, services.REDIS.port)
    inbox = RedisInbox(redis, prefix, clock, INBOX_RETENTION_MS, cluster=cluster)
    groups = RedisGroups(redis, prefix)
    convs = RedisConversations(redis, prefix, clock, HISTORY_RETENTION_MS, cluster=cluster)
    devices = RedisDevices(redis, prefix, clock, cluster=cluster)

    async def ping() -> None:
        if cluster:
            await redis.start()  # the slot map
        await redis.execute_command("PING")

    starts = [s.start for s in (inbox, groups, convs, devices) if hasattr(s, "start")]
    return Composed(
        _sqlite(data_dir, clock),
        {"inbox": inbox, "groups": groups, "conversations": convs, "devices": devices},
        opens=[ping, *starts],
        closes=[redis.disconnect],
        destroy=lambda: empty(prefix),
    )


def _rabbitmq(data_dir: Path, clock: FakeClock) -> Composed:
    from improto_server.production.rabbit_notify import RabbitNotifyQueue
    from improto_server.production.rabbit_queue import RabbitQueue

    prefix = _name(data_dir, "improto-rabbit-contract-")
    _fresh(prefix, lambda: (services.delete_queue_prefix(prefix), _delete_notify_queue(prefix)))
    queue = RabbitQueue(
        services.AMQP_URL,
        redis_host=services.REDIS.host,
        redis_port=services.REDIS.port,
        prefix=prefix,
        partitions=1,  # the contract expects one global acceptance order
        now_ms=clock,
    )
    notify = RabbitNotifyQueue(services.AMQP_URL, prefix=prefix)

    def destroy() -> None:
        services.delete_queue_prefix(prefix)
        _delete_notify_queue(prefix)

    return Composed(
        _sqlite(data_dir, clock),
        {"queue": queue, "notify_queue": notify},
        opens=[queue.start, notify.start],
        # the queue is closed by SQLiteBackend.close() already; both closes are idempotent
        closes=[queue.close, notify.close],
        destroy=destroy,
    )


def _delete_notify_queue(prefix: str) -> None:
    from improto_server.production.rabbit_notify import notify_queue_name

    conn = services.amqp_connection()
    try:
        conn.channel().queue_delete(notify_queue_name(prefix))
    finally:
        conn.close()


def _hbase(data_dir: Path, clock: FakeClock) -> Composed:
    from improto_server.production.hbase_history import HBaseHistory

    table = _name(data_dir, "improto_test_")
    _fresh(table, lambda: services.drop_hbase_tables([table]))
    history = HBaseHistory(
        services.HBASE.host,
        services.HBASE.port,
        table,
        now_ms=clock,
        retention_ms=HISTORY_RETENTION_MS,
        # The fake clock starts in 2025 and jumps days ahead: cells stamped with its times
        # would be expired by a TTL on HBase's real clock. Retention is the read filter here.
        family_ttl=False,
    )
    return Composed(
        _sqlite(data_dir, clock),
        {"history": history},
        opens=[history.start],
        closes=[history.close],
        destroy=lambda: services.drop_hbase_tables([table]),
    )


def _production(data_dir: Path, clock: FakeClock, *, cluster: bool = False) -> Any:
    from improto_server.production.backend import ProductionBackend

    def purge(config: Config) -> None:
        services.purge(config.key_prefix, config.hbase_table)
        if cluster:
            services.delete_cluster_prefix(config.key_prefix)

    class ContractProduction(ProductionBackend):
        def destroy(self) -> None:
            purge(self.config)

    prefix = _name(data_dir, "contract-cluster" if cluster else "contract")
    on_cluster = {"redis_cluster": str(services.REDIS_CLUSTER)} if cluster else {}
    config = Config(
        storage="production",
        key_prefix=prefix,
        hbase_table=prefix.replace("contract", "contract_"),
        inbox_retention_days=INBOX_RETENTION_MS // DAY_MS,
        history_retention_days=HISTORY_RETENTION_MS // DAY_MS,
        **services.config_fields(),
        **on_cluster,
    )
    _fresh(prefix, lambda: purge(config))
    # The fake clock is far from wall time: HBase's own TTL would hide every cell.
    return ContractProduction(config, None, now_ms=clock, hbase_family_ttl=False)


FACTORIES: dict[str, Factory] = {
    "sqlite": _sqlite,
    "memory": _memory,
    "redis": _redis,
    "redis-cluster": lambda data_dir, clock: _redis(data_dir, clock, cluster=True),
    "hbase": _hbase,
    "rabbitmq": _rabbitmq,
    "production": _production,
    "production-cluster": lambda data_dir, clock: _production(data_dir, clock, cluster=True),
}
# The services each backend needs (the `services` marker of its rows).
NEEDS: dict[str, tuple[str, ...]] = {
    "sqlite": (),
    "memory": (),
    "redis": ("redis",),
    "redis-cluster": ("redis-cluster",),
    "hbase": ("hbase",),
    "rabbitmq": ("rabbitmq", "redis"),
    "production": services.NAMES,
    "production-cluster": ("redis-cluster", "rabbitmq", "hbase"),
}
# The rows of each port's contract: each adapter once, and the production composition.
ROWS: dict[str, tuple[str, ...]] = {
    "queue": ("sqlite", "memory", "rabbitmq", "production", "production-cluster"),
    "inbox": ("sqlite", "redis", "redis-cluster", "production"),
    "history": ("sqlite", "hbase", "production"),
    "groups": ("sqlite", "redis", "redis-cluster", "production"),
    "conversations": ("sqlite", "redis", "redis-cluster", "production"),
    "devices": ("sqlite", "redis", "redis-cluster", "production"),
    "notify_queue": ("sqlite", "rabbitmq", "production"),
    "timeline": ("sqlite", "production", "production-cluster"),
    # all ports at once: SQLite's, production's
    "persister": ("sqlite", "production", "production-cluster"),
}
