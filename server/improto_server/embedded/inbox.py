"""Offline inboxes and device positions in the embedded database (the InboxStore port).

An inbox entry is a (user, cursor) row referring to the shared `messages` row; `inbox_head`
keeps each user's last assigned cursor (head) and the highest cursor removed by retention
(floor). Retention is per entry, from its stored_ms.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from twisted.internet.defer import Deferred

from improto_server.embedded.database import (
    MSG_COLS,
    RetainedStore,
    record_of_row,
    signed,
    store_message,
)
from improto_server.model import InboxRecords, PersistJob


class SQLiteInbox(RetainedStore):
    """InboxStore: entries expire `retention_ms` after they were stored."""

    def append(self, job: PersistJob) -> Deferred[None]:
        return self._db.call(_append, job, self._now_ms())

    def append_many(self, jobs: Sequence[PersistJob]) -> Deferred[None]:
        return self._db.call(_append_many, list(jobs), self._now_ms())

    def page(self, user_id: int, start: int, limit: int) -> Deferred[InboxRecords]:
        return self._db.call(_page, user_id, start, limit, self._cutoff())

    def position(self, user_id: int, device_id: str) -> Deferred[int]:
        return self._db.call(_position, user_id, device_id)

    def advance(self, user_id: int, device_id: str, cursor: int) -> Deferred[int]:
        return self._db.call(_advance, user_id, device_id, cursor)


def _head_floor(db: sqlite3.Connection, user: int) -> tuple[int, int]:
    row = db.execute("SELECT head, floor FROM inbox_head WHERE user_id = ?", (user,)).fetchone()
    return (row[0], row[1]) if row else (0, 0)


def _append(db: sqlite3.Connection, job: PersistJob, now: int) -> None:
    users = sorted({signed(u) for u in job.inbox_users})
    if not users:
        return
    mid = signed(job.message.msg_id)
    present = {u for (u,) in db.execute("SELECT user_id FROM inbox WHERE msg_id = ?", (mid,))}
    todo = [u for u in users if u not in present]
    if not todo:
        return  # a redelivered job: everything is already there
    store_message(db, job.message)
    for user in todo:
        (cursor,) = db.execute(
            "INSERT INTO inbox_head (user_id, head) VALUES (?, 1)"
            " ON CONFLICT (user_id) DO UPDATE SET head = head + 1 RETURNING head",
            (user,),
        ).fetchone()
        db.execute("INSERT INTO inbox VALUES (?, ?, ?, ?)", (user, cursor, mid, now))


def _append_many(db: sqlite3.Connection, jobs: list[PersistJob], now: int) -> None:
    for job in jobs:  # one transaction (one fsync) for the whole batch
        _append(db, job, now)


def _page(
    db: sqlite3.Connection, user_id: int, start: int, limit: int, cutoff: int
) -> InboxRecords:
    user = signed(user_id)
    head, floor = _head_floor(db, user)
    start = min(start, head)  # also keeps a client's 2**64-1 out of the signed range
    limit = max(0, limit)
    # Entries that expired but were not swept yet count as removed.
    (expired,) = db.execute(
        "SELECT max(cursor) FROM inbox INDEXED BY inbox_age WHERE user_id = ? AND stored_ms < ?",
        (user, cutoff),
    ).fetchone()
    floor = max(floor, expired or 0)
    # "+stored_ms": keep the planner on the (user_id, cursor) key, which yields cursor order.
    rows = db.execute(
        f"SELECT i.cursor, {MSG_COLS} FROM inbox i JOIN messages m ON m.msg_id = i.msg_id"
        " WHERE i.user_id = ? AND i.cursor > ? AND +i.stored_ms >= ?"
        " ORDER BY i.cursor LIMIT ?",
        (user, start, cutoff, limit + 1),
    ).fetchall()
    page = rows[:limit]
    return InboxRecords(
        tuple(r[0] for r in page),
        tuple(record_of_row(r[1:]) for r in page),
        start,
        len(rows) > limit,
        floor > start,
    )


def _position(db: sqlite3.Connection, user_id: int, device_id: str) -> int:
    row = db.execute(
        "SELECT position FROM positions WHERE user_id = ? AND device_id = ?",
        (signed(user_id), device_id),
    ).fetchone()
    return row[0] if row else 0


def _advance(db: sqlite3.Connection, user_id: int, device_id: str, cursor: int) -> int:
    user = signed(user_id)
    head, _ = _head_floor(db, user)
    (position,) = db.execute(
        "INSERT INTO positions VALUES (?, ?, ?) ON CONFLICT (user_id, device_id)"
        " DO UPDATE SET position = max(position, excluded.position) RETURNING position",
        (user, device_id, max(0, min(cursor, head))),
    ).fetchone()
    return int(position)


def expire_inbox(db: sqlite3.Connection, cutoff: int) -> list[int]:
    """Remove the entries stored before `cutoff` (ms), raising each inbox's floor to its
    highest removed cursor; returns the (stored) msg_id of each entry removed."""
    # Per user through the (user_id, stored_ms) index rather than a full scan of the inbox.
    removed = db.execute(
        "DELETE FROM inbox WHERE user_id IN (SELECT user_id FROM inbox_head)"
        " AND stored_ms < ? RETURNING user_id, cursor, msg_id",
        (cutoff,),
    ).fetchall()
    floors: dict[int, int] = {}
    for user, cursor, _ in removed:
        floors[user] = max(cursor, floors.get(user, 0))
    db.executemany(
        "UPDATE inbox_head SET floor = max(floor, ?) WHERE user_id = ?",
        [(cursor, user) for user, cursor in floors.items()],
    )
    return [msg_id for _, _, msg_id in removed]
