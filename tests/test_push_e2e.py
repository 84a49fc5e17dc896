"""Push notifications end to end, in one reactor: an embedded server configured with a push
gateway (the twisted.web stand-in), devices registered over the protocol, a message to an
offline device, and what the gateway received: the whole path SEND -> queue -> persister ->
notify queue -> notifier -> HTTP."""

from __future__ import annotations

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
from tests.support.waiting import eventually

SECRET = "push-e2e-secret-push-e2e-secret-0123"
ALICE, BOB = 11, 12


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
        push_gateway=gateway.url, push_interval_s=0.2,
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
