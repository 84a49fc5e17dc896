"""Hub: (user, device) -> connection, one device stored without a dict (server/hub.py)."""

from __future__ import annotations

import pytest_twisted

from improto.enums import CloseReason
from improto_server.hub import Hub, LocalRouter


class Conn:
    def __init__(self, user_id: int, device_id: str, hub: Hub | None = None) -> None:
        self.user_id, self.device_id = user_id, device_id
        self.got: list[int] = []
        self.closed: list[tuple[CloseReason, str]] = []
        self.hub = hub

    def push(self, msg_id: int, data: bytes) -> None:
        self.got.append(msg_id)

    def notify(self, data: bytes, feature: int) -> bool:
        return False

    def close(self, reason: CloseReason, text: str) -> None:
        self.closed.append((reason, text))
        if self.hub is not None:  # as a Session does: it leaves the hub
            self.hub.unregister(self)


def test_one_then_two_devices_then_one_again() -> None:
    hub = Hub()
    phone, tablet = Conn(7, "phone"), Conn(7, "tablet")
    assert hub.register(phone) is None
    assert hub.devices(7) == [phone] and hub.device(7, "phone") is phone
    assert hub.device(7, "tablet") is None
    assert hub.register(tablet) is None
    assert hub.devices(7) == [phone, tablet] and hub.connection_count == 2
    assert hub.device(7, "tablet") is tablet
    hub.unregister(phone)
    assert hub.devices(7) == [tablet] and hub.device(7, "phone") is None
    hub.unregister(tablet)
    assert hub.devices(7) == [] and hub.connection_count == 0 and hub.all() == []


def test_same_device_replaces_and_returns_the_old_connection() -> None:
    hub = Hub()
    old, new = Conn(7, "phone"), Conn(7, "phone")
    hub.register(old)
    assert hub.register(old) is None  # registering again is not a replacement
    assert hub.register(new) is old
    hub.unregister(old)  # the replaced one leaving must not remove its successor
    assert hub.devices(7) == [new]
    tablet, newer = Conn(7, "tablet"), Conn(7, "phone")
    hub.register(tablet)
    assert hub.register(newer) is new
    hub.unregister(new)
    assert set(hub.devices(7)) == {newer, tablet}


def test_push_reaches_every_device_but_the_excluded_one() -> None:
    hub = Hub()
    a, b1, b2, c = Conn(1, "x"), Conn(2, "x"), Conn(2, "y"), Conn(3, "x")
    for conn in (a, b1, b2, c):
        hub.register(conn)
    assert hub.push([1, 2, 3, 4], 9, b"", exclude=b1) == 3
    assert (a.got, b1.got, b2.got, c.got) == ([9], [], [9], [9])
    assert hub.push([1], 10, b"", exclude=a) == 0
    assert set(hub.all()) == {a, b1, b2, c} and hub.connection_count == 4


def test_kick_closes_one_device_or_all_of_them() -> None:
    hub = Hub()
    phone, tablet, other = Conn(7, "phone", hub), Conn(7, "tablet", hub), Conn(8, "phone", hub)
    for conn in (phone, tablet, other):
        hub.register(conn)
    assert hub.online_devices([7, 8, 9]) == {7: {"phone", "tablet"}, 8: {"phone"}}
    assert hub.kick(7, "laptop", CloseReason.KICKED) == 0
    assert hub.kick(7, "phone", CloseReason.KICKED) == 1
    assert phone.closed == [(CloseReason.KICKED, "an operator closed the session")]
    assert hub.devices(7) == [tablet] and not tablet.closed
    hub.register(phone)
    assert hub.kick(7, None, CloseReason.KICKED) == 2  # every device, each closed once
    assert len(phone.closed) == 2 and len(tablet.closed) == 1
    assert hub.devices(7) == [] and hub.devices(8) == [other] and not other.closed


@pytest_twisted.ensureDeferred
async def test_the_local_router_answers_from_its_hub() -> None:
    router, hub = LocalRouter(), Hub()
    assert await router.online_devices([7]) == {} and await router.kick(7, None, 5) == 0
    await router.start(hub)
    conn = Conn(7, "phone", hub)
    hub.register(conn)
    assert await router.online_devices([7, 8]) == {7: {"phone"}}
    assert await router.kick(7, None, CloseReason.KICKED) == 1
    assert conn.closed[0][0] == CloseReason.KICKED
    assert await router.online_devices([7]) == {}
