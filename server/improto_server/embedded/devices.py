"""Push registrations and session revocations in the embedded database (the DeviceStore port).

push_targets holds one row per registered (user, device): platform, token, preview flag and
when it was registered (the injected clock). A user keeps at most `max_targets` rows: a new
device beyond them drops the user's oldest registrations (by registered_ms, then device id as
UTF-8 bytes, SQLite's BINARY order), never the one being registered, even when the clock
stepped back. Re-registering a device replaces its row and renews its time.

revocations holds the user's revocation time in ms; a revocation only ever raises it.
Neither table expires: a registration lives until it is replaced, removed or dropped by the
cap, and a revocation that expired would make the tokens it refused valid again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred, fail

from improto_server.embedded.database import Database, id_list, signed, unsigned
from improto_server.model import MAX_TARGETS_PER_USER, PushTarget

MAX_REVOKED_MS = 2**53  # the Redis store keeps it exact as a Lua number: the same bound here


class SQLiteDevices:
    """DeviceStore on the embedded database; every call is one transaction."""

    def __init__(
        self, db: Database, now_ms: Callable[[], int], *, max_targets: int = MAX_TARGETS_PER_USER
    ) -> None:
        self._db = db
        self._now_ms = now_ms
        self.max_targets = max_targets

    def set_target(self, user_id: int, device_id: str, target: PushTarget) -> Deferred[None]:
        return self._db.call(
            _set_target, user_id, device_id, target, self._now_ms(), self.max_targets
        )

    def remove_target(
        self, user_id: int, device_id: str, token: str | None = None
    ) -> Deferred[bool]:
        return self._db.call(_remove_target, user_id, device_id, token)

    def targets(self, user_ids: Sequence[int]) -> Deferred[dict[int, dict[str, PushTarget]]]:
        return self._db.call(_targets, list(set(user_ids)))

    def revoke(self, user_id: int, at_ms: int) -> Deferred[None]:
        if not 0 <= at_ms <= MAX_REVOKED_MS:
            return fail(ValueError(f"revocation time {at_ms} outside 0..2**53"))
        return self._db.call(_revoke, user_id, at_ms)

    def revoked_before(self, user_id: int) -> Deferred[int]:
        return self._db.call(_revoked_before, user_id)


# The functions below run on the database thread (user ids as u64: signed() there, so a bad
# one fails the call's Deferred).


def _set_target(
    db: sqlite3.Connection, user_id: int, device: str, target: PushTarget, now: int, cap: int
) -> None:
    user = signed(user_id)
    (count, known) = db.execute(
        "SELECT count(*), count(*) FILTER (WHERE device_id = ?) FROM push_targets"
        " WHERE user_id = ?",
        (device, user),
    ).fetchone()
    if not known and count >= cap:
        # Make room for the new device: the oldest others go (more than one if the cap was
        # lowered since they registered).
        db.execute(
            "DELETE FROM push_targets WHERE user_id = ? AND device_id IN ("
            " SELECT device_id FROM push_targets WHERE user_id = ?"
            " ORDER BY registered_ms, device_id LIMIT ?)",
            (user, user, count - cap + 1),
        )
    db.execute(
        "INSERT OR REPLACE INTO push_targets VALUES (?, ?, ?, ?, ?, ?)",
        (user, device, target.platform, target.token, int(target.preview), now),
    )


def _remove_target(db: sqlite3.Connection, user_id: int, device: str, token: str | None) -> bool:
    sql = "DELETE FROM push_targets WHERE user_id = ? AND device_id = ?"
    if token is None:
        cur = db.execute(sql, (signed(user_id), device))
    else:
        cur = db.execute(sql + " AND token = ?", (signed(user_id), device, token))
    return cur.rowcount > 0


def _targets(db: sqlite3.Connection, user_ids: list[int]) -> dict[int, dict[str, PushTarget]]:
    users = [signed(u) for u in user_ids]
    out: dict[int, dict[str, PushTarget]] = {}
    # Users ascending (as u64: the stored values keep the order), devices by UTF-8 bytes.
    for user, device, platform, token, preview in db.execute(
        "SELECT user_id, device_id, platform, token, preview FROM push_targets"
        " WHERE user_id IN (SELECT value FROM json_each(?)) ORDER BY user_id, device_id",
        (id_list(users),),
    ):
        out.setdefault(unsigned(user), {})[device] = PushTarget(platform, token, bool(preview))
    return out


def _revoke(db: sqlite3.Connection, user_id: int, at_ms: int) -> None:
    db.execute(
        "INSERT INTO revocations VALUES (?, ?) ON CONFLICT (user_id)"
        " DO UPDATE SET before_ms = max(before_ms, excluded.before_ms)",
        (signed(user_id), at_ms),
    )


def _revoked_before(db: sqlite3.Connection, user_id: int) -> int:
    row = db.execute(
        "SELECT before_ms FROM revocations WHERE user_id = ?", (signed(user_id),)
    ).fetchone()
    return 0 if row is None else int(row[0])
