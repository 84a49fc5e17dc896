"""Offline inboxes and device positions in the embedded database (the InboxStore port).

An inbox entry is a (user, cursor) row referring to the shared `messages` row, with the size
of its MESSAGE record; `inbox_head` keeps each user's last assigned cursor (head), the highest
cursor removed (floor) and the sum of the entries' sizes (bytes). Retention is per entry, from
its stored_ms.

Caps: an inbox holds at most `max_entries` entries (cursors above head - max_entries) and
`max_bytes` record bytes. The append transaction removes the oldest (lowest cursors) beyond
either, raising the floor like retention does, so a reader below them sees `gap` (the history
still has the messages). A page applies the caps too (they may have been lowered since the
last append). Device positions are kept for the `max_devices` most recently advanced devices.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred

from improto.records import fit_sizes
from improto_server.config import InboxCaps
from improto_server.embedded.database import (
    MSG_COLS,
    Database,
    RetainedStore,
    delete_unreferenced,
    record_of_row,
    signed,
    store_message,
    unsigned,
)
from improto_server.model import InboxIds, InboxRecords, PersistJob

MAX_DEVICE_POSITIONS = 64  # device positions kept per user (the least recently advanced go)
_TRIM_CHUNK = 256  # rows read at a time while trimming by bytes


class SQLiteInbox(RetainedStore):
    """InboxStore: entries expire `retention_ms` after they were stored, and the oldest go
    beyond the caps."""

    # persister rounds weigh rows by their bytes here (persister.ROW_UNIT_BYTES): every
    # round is a transaction on the one database thread that the accepts wait for
    ROUND_ROW_UNIT_BYTES = 4096

    def __init__(
        self,
        db: Database,
        now_ms: Callable[[], int],
        retention_ms: int,
        *,
        caps: InboxCaps | None = None,
        max_devices: int = MAX_DEVICE_POSITIONS,
    ) -> None:
        super().__init__(db, now_ms, retention_ms)
        self.caps = caps or InboxCaps()
        self.max_devices = max_devices

    def append(self, job: PersistJob) -> Deferred[None]:
        return self._db.call_background(_append_many, [job], self._now_ms(), self.caps)

    def append_many(self, jobs: Sequence[PersistJob]) -> Deferred[None]:
        return self._db.call_background(_append_many, list(jobs), self._now_ms(), self.caps)

    def page(self, user_id: int, start: int, limit: int, max_bytes: int) -> Deferred[InboxRecords]:
        return self._db.call(_page, user_id, start, limit, max_bytes, self._cutoff(), self.caps)

    def ids(self, user_id: int, start: int, limit: int) -> Deferred[InboxIds]:
        return self._db.call(_ids, user_id, start, limit, self._cutoff(), self.caps)

    def position(self, user_id: int, device_id: str) -> Deferred[int]:
        return self._db.call(_position, user_id, device_id)

    def advance(self, user_id: int, device_id: str, cursor: int) -> Deferred[int]:
        return self._db.call(_advance, user_id, device_id, cursor, self.max_devices)


def _head_floor(db: sqlite3.Connection, user: int) -> tuple[int, int]:
    row = db.execute("SELECT head, floor FROM inbox_head WHERE user_id = ?", (user,)).fetchone()
    return (row[0], row[1]) if row else (0, 0)


def _append(db: sqlite3.Connection, job: PersistJob, now: int, caps: InboxCaps) -> list[int]:
    """Write the job's entries; returns the (stored) msg_ids of the entries the caps removed."""
    users = sorted({signed(u) for u in job.inbox_users})
    if not users:
        return []
    mid = signed(job.message.msg_id)
    present = {u for (u,) in db.execute("SELECT user_id FROM inbox WHERE msg_id = ?", (mid,))}
    todo = [u for u in users if u not in present]
    if not todo:
        return []  # a redelivered job: everything is already there
    store_message(db, job.message)
    size = len(job.record)
    trimmed: list[int] = []
    for user in todo:
        cursor, floor, used = db.execute(
            "INSERT INTO inbox_head (user_id, head, bytes) VALUES (?, 1, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET head = head + 1, bytes = bytes + excluded.bytes"
            " RETURNING head, floor, bytes",
            (user, size),
        ).fetchone()
        db.execute(
            "INSERT INTO inbox (user_id, cursor, msg_id, stored_ms, size) VALUES (?, ?, ?, ?, ?)",
            (user, cursor, mid, now, size),
        )
        trimmed += _enforce_caps(db, user, cursor, floor, used, caps)
    return trimmed


def _append_many(db: sqlite3.Connection, jobs: list[PersistJob], now: int, caps: InboxCaps) -> None:
    trimmed: list[int] = []
    for job in jobs:  # one transaction (one fsync) for the whole batch
        trimmed += _append(db, job, now, caps)
    if trimmed:
        delete_unreferenced(db, trimmed)


def _enforce_caps(
    db: sqlite3.Connection, user: int, head: int, floor: int, used: int, caps: InboxCaps
) -> list[int]:
    """Remove the user's oldest entries beyond the caps (cheap when within them: one index
    seek at most); returns the removed entries' (stored) msg_ids."""
    removed: list[tuple[int, int, int]] = []  # cursor, msg_id, size
    if head > caps.max_entries:  # cursors are consecutive: keep those above head - max
        removed = db.execute(
            "DELETE FROM inbox WHERE user_id = ? AND cursor <= ? RETURNING cursor, msg_id, size",
            (user, head - caps.max_entries),
        ).fetchall()
        used -= sum(r[2] for r in removed)
    if used > caps.max_bytes:
        last = None
        rows = db.execute(
            "SELECT cursor, size FROM inbox WHERE user_id = ? ORDER BY cursor", (user,)
        )
        while used > caps.max_bytes and (chunk := rows.fetchmany(_TRIM_CHUNK)):
            for cursor, size in chunk:
                if used <= caps.max_bytes:
                    break
                used -= size
                last = cursor
        rows.close()
        if last is None:
            used = 0  # no rows left: nothing is held whatever the total said
        else:
            removed += db.execute(
                "DELETE FROM inbox WHERE user_id = ? AND cursor <= ?"
                " RETURNING cursor, msg_id, size",
                (user, last),
            ).fetchall()
    if removed:
        floor = max(floor, max(r[0] for r in removed))
        db.execute(
            "UPDATE inbox_head SET floor = ?, bytes = ? WHERE user_id = ?",
            (floor, max(0, used), user),
        )
    return [r[1] for r in removed]


def _page(
    db: sqlite3.Connection,
    user_id: int,
    start: int,
    limit: int,
    max_bytes: int,
    cutoff: int,
    caps: InboxCaps,
) -> InboxRecords:
    user = signed(user_id)
    row = db.execute(
        "SELECT head, floor, bytes FROM inbox_head WHERE user_id = ?", (user,)
    ).fetchone()
    head, floor, used = row if row else (0, 0, 0)
    if head > caps.max_entries or used > caps.max_bytes:
        trimmed = _enforce_caps(db, user, head, floor, used, caps)
        if trimmed:
            delete_unreferenced(db, trimmed)
            head, floor = _head_floor(db, user)
    start = min(start, head)  # also keeps a client's 2**64-1 out of the signed range
    limit = max(0, limit)
    # Entries that expired but were not swept yet count as removed.
    (expired,) = db.execute(
        "SELECT max(cursor) FROM inbox INDEXED BY inbox_age WHERE user_id = ? AND stored_ms < ?",
        (user, cutoff),
    ).fetchone()
    floor = max(floor, expired or 0)
    # Sizes first (inbox rows only), then the messages of the entries that fit the budget.
    # "+stored_ms": keep the planner on the (user_id, cursor) key, which yields cursor order.
    sizes = db.execute(
        "SELECT cursor, size FROM inbox WHERE user_id = ? AND cursor > ? AND +stored_ms >= ?"
        " ORDER BY cursor LIMIT ?",
        (user, start, cutoff, limit + 1),
    ).fetchall()
    n = fit_sizes((s for _, s in sizes[:limit]), max_bytes)
    page = []
    if n:
        page = db.execute(
            f"SELECT i.cursor, {MSG_COLS} FROM inbox i JOIN messages m ON m.msg_id = i.msg_id"
            " WHERE i.user_id = ? AND i.cursor > ? AND i.cursor <= ? AND +i.stored_ms >= ?"
            " ORDER BY i.cursor",
            (user, start, sizes[n - 1][0], cutoff),
        ).fetchall()
    return InboxRecords(
        tuple(r[0] for r in page),
        tuple(record_of_row(r[1:]) for r in page),
        start,
        len(sizes) > n,
        floor > start,
    )


def _ids(
    db: sqlite3.Connection, user_id: int, start: int, limit: int, cutoff: int, caps: InboxCaps
) -> InboxIds:
    """`_page`'s entries without their records, and without trimming: entries a lowered entry
    cap would remove count as removed; a lowered byte cap applies at the next page only."""
    user = signed(user_id)
    row = db.execute("SELECT head, floor FROM inbox_head WHERE user_id = ?", (user,)).fetchone()
    head, floor = row if row else (0, 0)
    start = min(start, head)
    capped = head - caps.max_entries  # cursors at or below it are the cap's to remove
    floor = max(floor, capped)
    (expired,) = db.execute(
        "SELECT max(cursor) FROM inbox INDEXED BY inbox_age WHERE user_id = ? AND stored_ms < ?",
        (user, cutoff),
    ).fetchone()
    floor = max(floor, expired or 0)
    limit = max(0, limit)
    rows = db.execute(
        "SELECT cursor, msg_id FROM inbox WHERE user_id = ? AND cursor > ?"
        " AND +stored_ms >= ? ORDER BY cursor LIMIT ?",
        (user, max(start, capped), cutoff, limit + 1),
    ).fetchall()
    return InboxIds(
        start,
        tuple(c for c, _ in rows[:limit]),
        tuple(unsigned(m) for _, m in rows[:limit]),
        len(rows) > limit,
        floor > start,
    )


def _position(db: sqlite3.Connection, user_id: int, device_id: str) -> int:
    row = db.execute(
        "SELECT position FROM positions WHERE user_id = ? AND device_id = ?",
        (signed(user_id), device_id),
    ).fetchone()
    return row[0] if row else 0


def _advance(
    db: sqlite3.Connection, user_id: int, device_id: str, cursor: int, max_devices: int
) -> int:
    user = signed(user_id)
    head, _ = _head_floor(db, user)
    # `used` orders the user's devices by their last advance (a counter: clocks step back).
    (position,) = db.execute(
        "INSERT INTO positions (user_id, device_id, position, used)"
        " SELECT ?, ?, ?, coalesce(max(used), 0) + 1 FROM positions WHERE user_id = ?"
        " ON CONFLICT (user_id, device_id) DO UPDATE"
        " SET position = max(position, excluded.position), used = excluded.used"
        " RETURNING position",
        (user, device_id, max(0, min(cursor, head)), user),
    ).fetchone()
    # At most max_devices + 1 rows of this user are read: the table never holds more.
    db.execute(
        "DELETE FROM positions WHERE user_id = ? AND device_id NOT IN (SELECT device_id"
        " FROM positions WHERE user_id = ? ORDER BY used DESC, device_id LIMIT ?)",
        (user, user, max_devices),
    )
    return int(position)


def expire_inbox(db: sqlite3.Connection, cutoff: int) -> list[int]:
    """Remove the entries stored before `cutoff` (ms), raising each inbox's floor to its
    highest removed cursor; returns the (stored) msg_id of each entry removed."""
    # Per user through the (user_id, stored_ms) index rather than a full scan of the inbox.
    removed = db.execute(
        "DELETE FROM inbox WHERE user_id IN (SELECT user_id FROM inbox_head)"
        " AND stored_ms < ? RETURNING user_id, cursor, msg_id, size",
        (cutoff,),
    ).fetchall()
    floors: dict[int, tuple[int, int]] = {}  # user -> highest cursor removed, bytes removed
    for user, cursor, _, size in removed:
        top, freed = floors.get(user, (0, 0))
        floors[user] = (max(cursor, top), freed + size)
    db.executemany(
        "UPDATE inbox_head SET floor = max(floor, ?), bytes = max(0, bytes - ?) WHERE user_id = ?",
        [(cursor, freed, user) for user, (cursor, freed) in floors.items()],
    )
    return [msg_id for _, _, msg_id, _ in removed]
