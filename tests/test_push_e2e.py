"""Push notifications end to end, in one reactor: an embedded server configured with a push
gateway (the twisted.web stand-in), devices registered over the protocol, a message to an
offline device, and what the gateway received: the whole path SEND -> queue -> persister ->
notify queue -> notifier -> HTTP. And a connected device that does not acknowledge its PUSH
(an app suspended with its socket kept): session -> notify queue -> notifier -> HTTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted

from twisted.internet import reactor

from improto.enums import ConvKind
from improto.tokens import mint
from improto_clients.client import IMClient
from improto_server.app import Server
from improto_server.config import Config
from tests.support.push_gateway import PushGatewayStandIn
from tests.support.waiting import eventually, sleep

SECRET = "push-e2e-secret-push-e2e-secret-0123"
ALICE, BOB, CAROL = 11, 12, 13
ACK_WAIT = 0.5  # push_ack_wait_s: a client that reads acknowledges far sooner


class Harness:
    def __init__(self, server: Server, gateway: PushGatewayStandIn) -> None:
        self.server = server
        self.gateway = gateway
        self.clients: list[IMClient] = []

    async def client(self, user: int, device: str) -> IMClient:
        port = self.server.bound_ports()[0]
        c = IMClient(f"tcp:host=127.0.0.1:port={port}", mint(SECRET, user, device), device,
                     reactor=reactor)  # fmt: skip
        self.clients.append(c)
        await c.connect()
        await c.drain()
        return c


@pytest_twisted.async_yield_fixture()
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    gateway = await PushGatewayStandIn.start()
    config = Config(
        listen=["tcp:0:interface=127.0.0.1"], data_dir=str(tmp_path), jwt_secret=SECRET,
        push_gateway=gateway.url, push_interval_s=0.2, push_ack_wait_s=ACK_WAIT,
    )  # fmt: skip
    server = Server(config, reactor)
    await server.start()
    harness = Harness(server, gateway)
    try:
        yield harness
    finally:
        for c in harness.clients:
            await c.close()
        await server.stop()
        await gateway.stop()


@pytest_twisted.ensureDeferred
async def test_an_offline_registered_device_is_notified_with_its_badge(h: Harness) -> None:
    bob = await h.client(BOB, "phone")
    await bob.register_push("apns", "bob-token", preview=True)
    await bob.close()
    alice = await h.client(ALICE, "laptop")
    await alice.send_text(ConvKind.USER, BOB, "lunch?")
    await alice.send_text(ConvKind.USER, BOB, "at noon")
    await eventually(lambda: len(h.gateway.notifications) >= 2, timeout=10)
    first, last = h.gateway.notifications[0], h.gateway.notifications[-1]
    for n in (first, last):
        assert n["user_id"] == str(BOB) and n["sender_id"] == str(ALICE)
        assert n["conv_kind"] == "user" and n["conv_id"] == str(ALICE)
        assert n["devices"] == [
            {"device_id": "phone", "platform": "apns", "pushkey": "bob-token", "preview": True}
        ]
    # the badge is the total when the request goes (both may be persisted by then)
    assert first["content"] == "lunch?" and first["counts"]["unread"] in (1, 2)
    # the second one waited for the user's interval: the newest message, the badge then
    assert last["content"] == "at noon" and last["counts"] == {"unread": 2}
    assert len(h.gateway.notifications) == 2


@pytest_twisted.ensureDeferred
async def test_online_devices_and_the_sender_are_not_notified(h: Harness) -> None:
    bob = await h.client(BOB, "phone")
    await bob.register_push("fcm", "bob-fcm")
    alice = await h.client(ALICE, "laptop")
    await alice.register_push("fcm", "alice-fcm")
    await alice.close()
    alice = await h.client(ALICE, "tablet")  # alice online on another device, phone offline
    await alice.send_text(ConvKind.USER, BOB, "you are online")
    notifier = h.server.notifier
    assert notifier is not None
    await eventually(lambda: notifier.handled >= 1, timeout=10)  # seen while bob is online
    await bob.close()
    await alice.send_text(ConvKind.USER, BOB, "now you are not")
    await eventually(lambda: len(h.gateway.notifications) >= 1, timeout=10)
    [n] = h.gateway.notifications
    assert n["user_id"] == str(BOB) and "content" not in n  # no preview for this device
    assert n["devices"][0]["pushkey"] == "bob-fcm"


@pytest_twisted.ensureDeferred
async def test_a_connected_device_that_does_not_acknowledge_is_notified(h: Harness) -> None:
    bob = await h.client(BOB, "phone")
    await bob.register_push("apns", "bob-token", preview=True)
    carol = await h.client(CAROL, "phone")  # the control: connected, reading, acknowledging
    await carol.register_push("apns", "carol-token", preview=True)
    # Bob's app is suspended: the OS keeps its connection, the app reads nothing (no PUSH_ACK)
    assert bob.protocol is not None and bob.protocol.transport is not None
    bob.protocol.transport.pauseProducing()  # type: ignore[attr-defined]
    alice = await h.client(ALICE, "laptop")
    sent = time.monotonic()
    ack = await alice.send_text(ConvKind.USER, BOB, "still there?")
    await alice.send_text(ConvKind.USER, CAROL, "and you?")
    await eventually(lambda: len(h.gateway.notifications) >= 1, timeout=ACK_WAIT + 3)
    took = time.monotonic() - sent
    await sleep(ACK_WAIT * 3)  # nothing more: Bob's stall is notified once, Carol acknowledged
    [n] = h.gateway.notifications
    assert took >= ACK_WAIT * 0.9
    assert (n["user_id"], n["msg_id"], n["sender_id"], n["content"]) == (
        str(BOB), str(ack.msg_id), str(ALICE), "still there?",
    )  # fmt: skip
    assert n["devices"] == [
        {"device_id": "phone", "platform": "apns", "pushkey": "bob-token", "preview": True}
    ]
    bob.protocol.transport.resumeProducing()  # type: ignore[attr-defined]  # the app wakes up
    await eventually(lambda: bob.state.has(ack.msg_id), timeout=5)
