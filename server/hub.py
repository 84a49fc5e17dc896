"""Who is online: (user, device) -> live connection, and fan-out of encoded pushes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from twisted.internet.defer import Deferred, succeed


class Pushable(Protocol):
    user_id: int
    device_id: str

    def push(self, msg_id: int, data: bytes) -> None:
        """Write an encoded PUSH frame (the same bytes go to every receiver)."""


class Hub:
    """In-process presence registry. One connection per (user, device)."""

    def __init__(self) -> None:
        self._online: dict[int, dict[str, Pushable]] = {}

    def register(self, conn: Pushable) -> Pushable | None:
        """Add `conn`; return the connection it replaces for the same device, if any."""
        devices = self._online.setdefault(conn.user_id, {})
        old = devices.get(conn.device_id)
        devices[conn.device_id] = conn
        return old if old is not conn else None

    def unregister(self, conn: Pushable) -> None:
        devices = self._online.get(conn.user_id)
        if devices is not None and devices.get(conn.device_id) is conn:
            del devices[conn.device_id]
            if not devices:
                del self._online[conn.user_id]

    def all(self) -> list[Pushable]:
        return [c for devices in self._online.values() for c in devices.values()]

    def devices(self, user_id: int) -> list[Pushable]:
        return list(self._online.get(user_id, {}).values())

    def device(self, user_id: int, device_id: str) -> Pushable | None:
        return self._online.get(user_id, {}).get(device_id)

    def push(self, users: Iterable[int], msg_id: int, data: bytes,
             exclude: Pushable | None = None) -> int:  # fmt: skip
        """Push to every online device of `users` except `exclude`; returns the count."""
        sent = 0
        for user in users:
            for conn in list(self._online.get(user, {}).values()):
                if conn is not exclude:
                    conn.push(msg_id, data)
                    sent += 1
        return sent

    @property
    def connection_count(self) -> int:
        return sum(len(d) for d in self._online.values())


class LocalRouter:
    """The PushRouter of a single gateway: every device is in the Hub, nothing to route."""

    node: int | None = None  # message-id node: the configured one

    def start(self, hub: Hub) -> Deferred[None]:
        return succeed(None)

    def online(self, conn: Pushable) -> Deferred[None]:
        return succeed(None)

    def offline(self, conn: Pushable) -> Deferred[None]:
        return succeed(None)

    def route(self, users: Iterable[int], msg_id: int, data: bytes) -> Deferred[None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)
