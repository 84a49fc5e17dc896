"""Several gateways on one production stack: pushes cross gateways through RabbitMQ using the
presence map in Redis, devices move between gateways, ids stay unique, and the presence of a
killed gateway is cleaned up. Real processes, real services."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted

from improto.conformance.conn import Conn, eventually, new_device, new_user
from improto.enums import CloseReason, ConvKind, Feature
from improto.frames import (
    Close,
    Features,
    FeaturesOk,
    GroupCreate,
    GroupCreated,
    ReadMark,
    ReadMarkOk,
    ReadUpdate,
)
from improto_server.ids import NODE_BITS, SEQ_BITS
from improto_server.production.presence import Presence
from improto_server.production.push_router import NOTIFY, PUSH, pack_routed, unpack_routed
from improto_server.production.redis_connection import connect
from tests.support import services, waiting
from tests.support.server import ServerHandle, start_server
from tests.support.services import SyncRedis, delete_redis_prefix, needs

SECRET = "gateway-test-secret-0123456789abcdef0123456789abcdef"


@dataclass
class Stack:
    a: ServerHandle  # --role all (gateway + persister)
    b: ServerHandle  # --role gateway
    b_id: str
    prefix: str

    def login(self, gw: ServerHandle, user: int, device: str | None = None) -> Conn:
        c = Conn("127.0.0.1", gw.port, 5.0)
        c.login(SECRET, user, device or new_device())
        return c


@pytest.fixture(scope="module")
@needs()
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run = uuid.uuid4().hex[:10]
    prefix, table = f"gateways{run}", f"gateways_{run}"
    common = ["--storage", "production", "--key-prefix", prefix, "--hbase-table", table]
    a = start_server(tmp_path_factory.mktemp("gw-a"), SECRET, *common, "--gateway-id", f"a{run}")
    b_id = f"b{run}"
    b = start_server(
        tmp_path_factory.mktemp("gw-b"), SECRET, *common, "--role", "gateway", "--gateway-id", b_id
    )
    try:
        yield Stack(a, b, b_id, prefix)
    finally:
        for proc in (a, b):
            proc.stop()
        services.purge(prefix, table)


def node_of(msg_id: int) -> int:
    return (msg_id >> SEQ_BITS) & ((1 << NODE_BITS) - 1)


def test_pushes_cross_gateways_to_every_device(stack: Stack) -> None:
    alice, bob = new_user(), new_user()
    alice_a = stack.login(stack.a, alice)
    alice_b = stack.login(stack.b, alice)  # the sender's other device, on the other gateway
    bob_b = stack.login(stack.b, bob)
    bob_a = stack.login(stack.a, bob)
    ack = alice_a.send_msg(bob, b"across")
    for conn in (bob_b, bob_a, alice_b):
        assert conn.push_for(ack.msg_id).body == b"across"
    back = bob_b.send_msg(alice, b"and back")
    for conn in (alice_a, alice_b, bob_a):
        assert conn.push_for(back.msg_id).body == b"and back"
    assert not alice_a.queued_pushes(ack.msg_id)  # the sending connection gets the ack only


def test_group_pushes_reach_members_on_both_gateways(stack: Stack) -> None:
    owner, m1, m2 = new_user(), new_user(), new_user()
    c_owner = stack.login(stack.a, owner)
    c1, c2 = stack.login(stack.b, m1), stack.login(stack.a, m2)
    gid = c_owner.call(GroupCreate("team", (m1, m2)), GroupCreated).group_id
    ack = c1.send_msg(gid, b"hello team", kind=ConvKind.GROUP)
    for conn in (c_owner, c2):
        assert conn.push_for(ack.msg_id).body == b"hello team"


def test_gateways_take_distinct_id_nodes(stack: Stack) -> None:
    alice, bob = new_user(), new_user()
    on_a, on_b = stack.login(stack.a, alice), stack.login(stack.b, bob)
    ids_a = [on_a.send_msg(bob).msg_id for _ in range(20)]
    ids_b = [on_b.send_msg(alice).msg_id for _ in range(20)]
    assert len({node_of(i) for i in ids_a}) == len({node_of(i) for i in ids_b}) == 1
    assert node_of(ids_a[0]) != node_of(ids_b[0])
    assert len(set(ids_a) | set(ids_b)) == 40


def test_a_device_logging_in_on_another_gateway_replaces_its_session(stack: Stack) -> None:
    bob, device = new_user(), new_device()
    old = stack.login(stack.b, bob, device)
    new = stack.login(stack.a, bob, device)
    close = old.wait_for(lambda f: isinstance(f, Close), 5.0, "CLOSE REPLACED")
    assert isinstance(close, Close) and close.reason == CloseReason.REPLACED
    assert old.closed_within(5.0)
    # The device's pushes now go to its new session only.
    ack = stack.login(stack.b, new_user()).send_msg(bob, b"to the new session")
    assert new.push_for(ack.msg_id).body == b"to the new session"


def test_read_updates_cross_gateways_to_devices_with_the_feature(stack: Stack) -> None:
    alice, bob = new_user(), new_user()
    bob_a = stack.login(stack.a, bob)
    bob_b = stack.login(stack.b, bob)  # the reader's other device, on the other gateway
    bob_v1 = stack.login(stack.b, bob)  # version 1: told nothing
    alice_b = stack.login(stack.b, alice)
    for conn, features in ((bob_a, (Feature.CONVERSATIONS,)), (bob_b, (Feature.CONVERSATIONS,)),
                           (alice_b, tuple(Feature))):  # fmt: skip
        conn.call(Features(features), FeaturesOk)
    ack = alice_b.send_msg(bob, b"read me")
    ok = bob_a.call(ReadMark(ConvKind.USER, alice, ack.msg_id), ReadMarkOk)
    assert ok.msg_id == ack.msg_id
    mine = bob_b.wait_for(lambda f: isinstance(f, ReadUpdate), 5.0, "READ_UPDATE")
    assert mine == ReadUpdate(bob, ConvKind.USER, alice, ack.msg_id)
    receipt = alice_b.wait_for(lambda f: isinstance(f, ReadUpdate), 5.0, "READ_UPDATE")
    assert receipt == ReadUpdate(bob, ConvKind.USER, bob, ack.msg_id)  # as alice sees it
    bob_v1.drain(0.3)
    assert not [f for f in bob_v1.queue if isinstance(f, ReadUpdate)]


def test_routed_notify_carries_its_feature_and_pushes_read_as_before() -> None:
    targets = [(5, "phone", "gw/s1"), (6, "tablet", "gw/s2")]
    body = pack_routed(NOTIFY, Feature.READ_RECEIPTS, targets, b"frame")
    assert unpack_routed(body) == (NOTIFY, Feature.READ_RECEIPTS, targets, b"frame")
    push = pack_routed(PUSH, 77, targets[:1], b"push")
    assert push[:9] == bytes([1]) + (77).to_bytes(8, "big")  # kinds 1 and 2 unchanged
    assert unpack_routed(push) == (PUSH, 77, targets[:1], b"push")


def test_presence_of_a_killed_gateway_is_cleaned_up(stack: Stack, tmp_path: Path) -> None:
    """Runs last in this module: it kills gateway b."""
    bob = new_user()
    on_b = stack.login(stack.b, bob)
    on_a = stack.login(stack.a, bob)
    redis = SyncRedis()
    key = f"{stack.prefix}:presence:{{u{bob}}}"
    try:
        values = [v.decode() for v in redis("HVALS", key)]
        assert sorted(v.split("/")[0] for v in values)[-1] == stack.b_id
        stack.b.proc.send_signal(signal.SIGKILL)
        stack.b.proc.wait()
        on_b.close()

        def cleaned() -> None:
            gateways = {v.decode().split("/")[0] for v in redis("HVALS", key)}
            assert stack.b_id not in gateways and len(gateways) == 1, gateways

        eventually(cleaned, timeout=30)
        assert redis("ZSCORE", f"{stack.prefix}:gateways", stack.b_id) is None
        # Gateway a still delivers to bob's device on it.
        ack = stack.login(stack.a, new_user()).send_msg(bob, b"still here")
        assert on_a.push_for(ack.msg_id).body == b"still here"
    finally:
        redis.close()


@pytest.mark.services("redis")
@pytest_twisted.ensureDeferred
async def test_a_gateway_presumed_dead_is_cleaned_and_reannounces_when_it_returns():
    prefix = f"presence{uuid.uuid4().hex[:10]}"
    redis = connect(services.REDIS.host, services.REDIS.port)
    fast = {"heartbeat_s": 0.05, "dead_after_ms": 300}
    alive, paused = Presence(redis, prefix, **fast), Presence(redis, prefix, **fast)
    revived: list[bool] = []
    paused.on_revived = lambda: revived.append(True)
    try:
        await alive.start()
        await paused.start()
        assert alive.node != paused.node  # distinct message-id nodes
        session = paused.new_session()
        assert await paused.claim(5, "phone", session) is None
        assert await alive.lookup([5, 6]) == {5: {"phone": session}}
        assert paused._beat is not None
        paused._beat.stop()  # a long pause: no heartbeat
        await waiting.eventually(lambda: paused.gateway_id in alive.cleaned)
        assert await alive.lookup([5]) == {}
        paused._beat.start(0.05, now=True)  # back: it learns it was declared dead
        await waiting.eventually(lambda: bool(revived))
        # A newer session elsewhere is never removed by the old one's release.
        newer = alive.new_session()
        assert await alive.claim(5, "phone", newer) is None
        await paused.release(5, "phone", session)
        assert await alive.lookup([5]) == {5: {"phone": newer}}
    finally:
        await paused.close()
        await alive.close()
        await redis.disconnect()
        delete_redis_prefix(prefix)
