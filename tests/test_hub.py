"""Hub: (user, device) -> connection, one device stored without a dict (server/hub.py)."""

from __future__ import annotations

from improto_server.hub import Hub


class Conn:
    def __init__(self, user_id: int, device_id: str) -> None:
        self.user_id, self.device_id = user_id, device_id
        self.got: list[int] = []

    def push(self, msg_id: int, data: bytes) -> None:
        self.got.append(msg_id)


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
