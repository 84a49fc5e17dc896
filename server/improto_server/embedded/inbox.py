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

from improto.frames import Message
from improto.records import fit_sizes
from improto_server.config import InboxCaps
from improto_server.embedded.database import (
    MSG_COLS,
    Database,
    RetainedStore,
    delete_unreferenced,
    record_of_row,
    signed,
    store_messages,
    unsigned,
)
from improto_server.model import InboxIds, InboxRecords, PersistJob

MAX_DEVICE_POSITIONS = 64  # device positions kept per user (the least recently advanced go)
_TRIM_CHUNK = 256  # rows read at a time while trimming by bytes
_IN_CHUNK = 500  # ids in one `IN (...)` (well below SQLite's limit on bound parameters)


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


def _append_many(db: sqlite3.Connection, jobs: list[PersistJob], now: int, caps: InboxCaps) -> None:
    """Write the jobs' entries in one transaction (one fsync for the batch), in job order,
    skipping the (user, message) pairs already there (a redelivered job, or one twice in the
    batch). Set-wise: one read of the entries present and of the heads, one executemany
    each for the messages, the entries and the heads, then the caps of each user that got
    entries (trimming once after the batch removes what trimming after each entry would:
    the oldest, until within the caps)."""
    mids = list(dict.fromkeys(signed(j.message.msg_id) for j in jobs if j.inbox_users))
    present: set[tuple[int, int]] = set()
    for i in range(0, len(mids), _IN_CHUNK):
        part = mids[i : i + _IN_CHUNK]
        present.update(db.execute(
            f"SELECT user_id, msg_id FROM inbox WHERE msg_id IN ({_marks(len(part))})", part
        ))  # fmt: skip
    entries: list[tuple[int, int, int]] = []  # user, msg_id, size
    messages: dict[int, Message] = {}
    for job in jobs:
        mid = signed(job.message.msg_id)
        size = len(job.record)
        for user in sorted({signed(u) for u in job.inbox_users}):
            if (user, mid) not in present:
                present.add((user, mid))
                entries.append((user, mid, size))
                messages[mid] = job.message
    if not entries:
        return
    store_messages(db, messages.values())
    users = list(dict.fromkeys(user for user, _, _ in entries))
    heads: dict[int, list[int]] = {u: [0, 0, 0] for u in users}  # head, floor, bytes
    for i in range(0, len(users), _IN_CHUNK):
        part = users[i : i + _IN_CHUNK]
        for user, head, floor, used in db.execute(
            "SELECT user_id, head, floor, bytes FROM inbox_head"
            f" WHERE user_id IN ({_marks(len(part))})", part,
        ):  # fmt: skip
            heads[user] = [head, floor, used]
    rows = []
    for user, mid, size in entries:
        h = heads[user]
        h[0] += 1
        h[2] += size
        rows.append((user, h[0], mid, now, size))
    db.executemany(
        "INSERT INTO inbox (user_id, cursor, msg_id, stored_ms, size) VALUES (?, ?, ?, ?, ?)", rows
    )
    db.executemany(
        "INSERT INTO inbox_head (user_id, head, bytes) VALUES (?, ?, ?) ON CONFLICT (user_id)"
        " DO UPDATE SET head = excluded.head, bytes = excluded.bytes",
        [(user, h[0], h[2]) for user, h in heads.items()],
    )
    trimmed: list[int] = []
    for user, (head, floor, used) in heads.items():
        trimmed += _enforce_caps(db, user, head, floor, used, caps)
    if trimmed:
        delete_unreferenced(db, trimmed)


def _marks(n: int) -> str:
    return ",".join("?" * n)


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
