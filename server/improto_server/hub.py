"""Who is online: (user, device) -> live connection, and fan-out of encoded pushes and
notifications (READ_UPDATE)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from twisted.internet.defer import Deferred, succeed

from improto.enums import CloseReason


def kick_text(reason: CloseReason) -> str:
    """The CLOSE text of a connection closed by PushRouter.kick (logs only, spec CLOSE)."""
    if reason == CloseReason.KICKED:
        return "an operator closed the session"
    return f"closed by the server ({reason.name})"


class Pushable(Protocol):
    user_id: int
    device_id: str

    def push(self, msg_id: int, data: bytes) -> None:
        """Write an encoded PUSH frame (the same bytes go to every receiver)."""

    def notify(self, data: bytes, feature: int) -> bool:
        """Write the encoded frame `data` outside the push window (READ_UPDATE) if this
        connection enabled `feature` (improto.enums.Feature); True if it was written."""

    def close(self, reason: CloseReason, text: str) -> None:
        """Send CLOSE and close the connection; it leaves the hub (and presence) itself."""


class Hub:
    """In-process presence registry. One connection per (user, device).

    A user with one device (the usual case) maps to the connection itself: no dict per
    connection (memory per idle connection: docs/BENCHMARKS.md). A user with more
    maps to a dict device -> connection, back to the connection when one is left.
    """

    def __init__(self) -> None:
        self._online: dict[int, Pushable | dict[str, Pushable]] = {}

    def register(self, conn: Pushable) -> Pushable | None:
        """Add `conn`; return the connection it replaces for the same device, if any."""
        user, device = conn.user_id, conn.device_id
        entry = self._online.get(user)
        if entry is None:
            self._online[user] = conn
            return None
        if type(entry) is dict:
            old = entry.get(device)
            entry[device] = conn
            return old if old is not conn else None
        assert not isinstance(entry, dict)
        if entry.device_id == device:
            self._online[user] = conn
            return entry if entry is not conn else None
        self._online[user] = {entry.device_id: entry, device: conn}
        return None

    def unregister(self, conn: Pushable) -> None:
        user = conn.user_id
        entry = self._online.get(user)
        if entry is conn:
            del self._online[user]
        elif type(entry) is dict and entry.get(conn.device_id) is conn:
            del entry[conn.device_id]
            if len(entry) == 1:
                (self._online[user],) = entry.values()

    def all(self) -> list[Pushable]:
        out: list[Pushable] = []
        for entry in self._online.values():
            if type(entry) is dict:
                out.extend(entry.values())
            else:
                out.append(entry)  # type: ignore[arg-type]
        return out

    def devices(self, user_id: int) -> list[Pushable]:
        entry = self._online.get(user_id)
        if entry is None:
            return []
        return list(entry.values()) if type(entry) is dict else [entry]  # type: ignore[list-item]

    def device_count(self, user_id: int) -> int:
        """How many devices of `user_id` are online here."""
        entry = self._online.get(user_id)
        if entry is None:
            return 0
        return len(entry) if type(entry) is dict else 1

    def device(self, user_id: int, device_id: str) -> Pushable | None:
        entry = self._online.get(user_id)
        if type(entry) is dict:
            return entry.get(device_id)
        if entry is not None and entry.device_id == device_id:  # type: ignore[union-attr]
            return entry  # type: ignore[return-value]
        return None

    def push(self, users: Iterable[int], msg_id: int, data: bytes,
             exclude: Pushable | None = None) -> int:  # fmt: skip
        """Push to every online device of `users` except `exclude`; returns the count."""
        sent = 0
        online = self._online
        for user in users:
            entry = online.get(user)
            if entry is None:
                continue
            if type(entry) is dict:
                for conn in list(entry.values()):  # a push may close and unregister one
                    if conn is not exclude:
                        conn.push(msg_id, data)
                        sent += 1
            elif entry is not exclude:
                entry.push(msg_id, data)  # type: ignore[union-attr]
                sent += 1
        return sent

    def notify(self, users: Iterable[int], data: bytes, feature: int,
               exclude: Pushable | None = None) -> int:  # fmt: skip
        """`data` to every online device of `users` but `exclude` whose connection enabled
        `feature`; returns how many were written."""
        sent = 0
        for user in users:
            for conn in self.devices(user):  # a copy: a write may close and unregister one
                if conn is not exclude and conn.notify(data, feature):
                    sent += 1
        return sent

    def online_devices(self, user_ids: Iterable[int]) -> dict[int, set[str]]:
        """The devices of each user online here; users with none are absent."""
        out: dict[int, set[str]] = {}
        for user in user_ids:
            devices = {conn.device_id for conn in self.devices(user)}
            if devices:
                out[user] = devices
        return out

    def kick(self, user_id: int, device_id: str | None, reason: CloseReason) -> int:
        """Close the user's connection of `device_id` here (None: every one of its devices)
        with CLOSE `reason`; returns how many were closed."""
        if device_id is None:
            conns = self.devices(user_id)  # a copy: each close unregisters its connection
        else:
            conn = self.device(user_id, device_id)
            conns = [] if conn is None else [conn]
        text = kick_text(reason)
        for conn in conns:
            conn.close(reason, text)
        return len(conns)

    @property
    def connection_count(self) -> int:
        return sum(len(e) if type(e) is dict else 1 for e in self._online.values())


class LocalRouter:
    """The PushRouter of a single gateway: every device is in the Hub, nothing to route."""

    node: int | None = None  # message-id node: the configured one

    def __init__(self) -> None:
        self._hub: Hub | None = None  # the hub of start(); none before (nobody online)

    def start(self, hub: Hub) -> Deferred[None]:
        self._hub = hub
        return succeed(None)

    def online(self, conn: Pushable) -> Deferred[None]:
        return succeed(None)

    def offline(self, conn: Pushable) -> Deferred[None]:
        return succeed(None)

    def route(self, users: Iterable[int], msg_id: int, data: bytes) -> Deferred[None]:
        return succeed(None)

    def notify(self, users: Iterable[int], data: bytes, feature: int) -> Deferred[None]:
        return succeed(None)

    def online_devices(self, user_ids: Sequence[int]) -> Deferred[dict[int, set[str]]]:
        return succeed({} if self._hub is None else self._hub.online_devices(user_ids))

    def kick(self, user_id: int, device_id: str | None, reason: int) -> Deferred[int]:
        hub = self._hub
        return succeed(0 if hub is None else hub.kick(user_id, device_id, CloseReason(reason)))

    def close(self) -> Deferred[None]:
        return succeed(None)
