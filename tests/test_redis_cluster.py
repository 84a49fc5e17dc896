"""ClusterRedis (production/redis_cluster.py) on a real Redis Cluster
(`scripts/services start redis-cluster`; the contract suite's redis-cluster rows run the
stores on it): routing by slot, the redirects, the commands that go to every master or are
refused, and the sweep that scans every master."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import pytest_twisted

from twisted.internet import reactor

from improto_server.production.redis_cluster import ClusterRedis, command_key
from improto_server.production.redis_inbox import RedisInbox
from improto_server.production.redis_slots import key_slot
from tests.support import services
from tests.support.clock import FakeClock
from tests.support.services import needs

RETENTION_MS = 7 * 86_400_000


def test_command_key_routes_scripts_by_their_first_key_and_refuses_scan() -> None:
    assert command_key(("GET", "a{u1}")) == b"a{u1}"
    assert command_key((b"EVALSHA", "abc", 2, "k{u2}:x", "k{u2}:y", 5)) == b"k{u2}:x"
    assert command_key(("EVAL", "return 1", 0)) is None
    assert command_key(("PING",)) is None and command_key(("SCRIPT", "LOAD", "x")) is None
    with pytest.raises(ValueError, match="masters"):
        command_key(("SCAN", b"0"))


@pytest.fixture
@needs("redis-cluster")
def cluster() -> Iterator[tuple[ClusterRedis, str]]:
    prefix = f"improto-test-cluster:{uuid.uuid4().hex}"
    client = ClusterRedis([str(services.REDIS_CLUSTER)], reactor)  # type: ignore[arg-type]
    pytest_twisted.blockon(client.start())
    try:
        yield client, prefix
    finally:
        pytest_twisted.blockon(client.disconnect())
        services.delete_cluster_prefix(prefix)


@pytest_twisted.ensureDeferred
async def test_keys_of_every_master_are_reached(cluster: tuple[ClusterRedis, str]) -> None:
    client, prefix = cluster
    masters = {m.addr for m in client.masters()}
    assert len(masters) >= 3
    keys = [f"{prefix}:{{u{i}}}" for i in range(60)]
    for i, key in enumerate(keys):
        await client.execute_command("SET", key, b"%d" % i)
    assert [await client.execute_command("GET", k) for k in keys] == [b"%d" % i for i in range(60)]
    # the keys really are spread: each master holds some (CLUSTER COUNTKEYSINSLOT on it)
    held = set()
    for m in client.masters():
        for key in keys:
            if await m.execute_command("CLUSTER", "COUNTKEYSINSLOT", key_slot(key)):
                held.add(m.addr)
    assert held == masters


@pytest_twisted.ensureDeferred
async def test_a_stale_slot_map_is_corrected_by_moved(cluster: tuple[ClusterRedis, str]) -> None:
    client, prefix = cluster
    key = f"{prefix}:{{u7}}"
    await client.execute_command("SET", key, b"x")
    right = client._slots[key_slot(key)]
    wrong = next(m.addr for m in client.masters() if m.addr != right)
    client._slots = [wrong] * len(client._slots)  # every slot on one master: MOVED for most
    before = client.refreshes
    assert await client.execute_command("GET", key) == b"x"
    assert client._slots[key_slot(key)] == right
    await client.refresh()
    assert client.refreshes > before
    assert len(set(client._slots)) == len(client.masters()) >= 3  # map whole again


@pytest_twisted.ensureDeferred
async def test_script_load_reaches_every_master(cluster: tuple[ClusterRedis, str]) -> None:
    client, prefix = cluster
    source = f"return '{prefix}'"
    sha = await client.execute_command("SCRIPT", "LOAD", source)
    for m in client.masters():
        assert await m.execute_command("SCRIPT", "EXISTS", sha) == [1]
    for i in range(20):  # EVALSHA finds it whichever master the key is on
        key = f"{prefix}:{{u{i}}}"
        assert await client.execute_command("EVALSHA", sha, 1, key) == prefix.encode()


@pytest_twisted.ensureDeferred
async def test_a_cross_slot_command_is_refused_as_redis_refuses_it(
    cluster: tuple[ClusterRedis, str],
) -> None:
    import txredisapi

    client, prefix = cluster
    with pytest.raises(txredisapi.ResponseError, match="CROSSSLOT"):
        await client.execute_command("MSET", f"{prefix}:{{a}}", 1, f"{prefix}:{{b}}", 2)


@pytest_twisted.ensureDeferred
async def test_the_inbox_sweep_scans_every_master(cluster: tuple[ClusterRedis, str]) -> None:
    from improto.enums import ContentType, ConvKind
    from improto.frames import Message
    from improto_server.model import PersistJob

    client, prefix = cluster
    clock = FakeClock()
    inbox = RedisInbox(client, prefix, clock, RETENTION_MS, cluster=True)
    await inbox.start()
    users = tuple(range(1001, 1041))  # 40 users: their inboxes on every master
    m = Message(7, clock(), 1, "d", ConvKind.USER, 1, ContentType.TEXT, bytes(16), b"hello")
    await inbox.append(PersistJob(m, users))
    clock.advance(RETENTION_MS + 1)
    assert await inbox.sweep() == len(users)


@pytest_twisted.ensureDeferred
async def test_replicated_waits_for_the_replicas_and_says_when_too_few(
    cluster: tuple[ClusterRedis, str],
) -> None:
    from improto_server.production.redis_cluster import ReplicationTimeout

    client, prefix = cluster
    for i in range(30):
        await client.execute_command("SET", f"{prefix}:{{u{i}}}", b"x")
    await client.replicated(1, 2000)  # each master has one replica (scripts/services)
    with pytest.raises(ReplicationTimeout, match="of 2"):
        await client.replicated(2, 50)


@pytest_twisted.ensureDeferred
async def test_the_persister_barrier_is_there_only_when_configured() -> None:
    from improto_server.config import Config
    from improto_server.production.backend import ProductionBackend

    seeds = {"redis_cluster": str(services.REDIS_CLUSTER)}
    configs = [
        (Config(storage="production", **services.config_fields()), False),
        (Config(storage="production", **services.config_fields(), **seeds), False),  # 0: none
        (Config(storage="production", redis_wait_replicas=1, **services.config_fields(),
                **seeds), True),
    ]  # fmt: skip
    for config, expected in configs:
        backend = ProductionBackend(config)
        try:
            assert callable(backend.replication_barrier()) is expected
        finally:
            await backend.redis.disconnect()
