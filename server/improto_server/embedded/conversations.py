"""Conversation lists in the embedded database (the ConversationStore port).

`conv_rows` holds one row per (user, conversation as that user sees it): the newest message
(last_id, referring to the shared `messages` row, which stays while a row refers to it: see
delete_unreferenced), the read positions, the unread count and the ids it counts (unread_ids:
at most MAX_UNREAD_TRACKED, the newest, as ascending big-endian u64), the newest hide's msg_id
(hide_id) and the user's list version at the row's last visible change. `conv_users` keeps
each user's newest version and the unread sum over its rows that are not hidden, so a list
page reads neither every row nor a sum. A user's conv_users row is never removed: versions
keep increasing after retention removed every row (a client's stored version stays valid).

Writes come from the persister (call_background), one transaction per call: the rows a call
touches are read once, changed in memory in job order and written back once, each visibly
changed row with the user's next version. Rows go `retention_ms` after their last change
(changed_ms), by the backend's sweep (expire_conversations).
"""

from __future__ import annotations

import json
import sqlite3
import struct
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred

from improto.enums import ConvKind
from improto.frames import Message
from improto.limits import U64_MAX
from improto.records import CONV_OVERHEAD, fit_sizes
from improto_server.embedded.database import (
    BIAS,
    MSG_COLS,
    SQLITE_MAX_INT,
    RetainedStore,
    delete_unreferenced,
    id_list,
    record_of_row,
    record_size_sql,
    signed,
    store_messages,
    unsigned,
)
from improto_server.model import (
    MAX_UNREAD_TRACKED,
    ConvRows,
    ConvState,
    PersistJob,
    StateJob,
)

_Key = tuple[int, int, int]  # user, conv_kind, conv_id (unsigned)
_KEYS_PER_READ = 2000  # 3 bound parameters each, well below SQLite's limit of 32766
_NONE = signed(0)  # a stored position or last_id that is "none"


class SQLiteConversations(RetainedStore):
    """ConversationStore: rows expire `retention_ms` after their last change."""

    def record(self, jobs: Sequence[PersistJob]) -> Deferred[None]:
        return self._db.call_background(_record, list(jobs), self._now_ms())

    def apply(self, jobs: Sequence[StateJob]) -> Deferred[None]:
        return self._db.call_background(_apply, list(jobs), self._now_ms())

    def by_activity(
        self, user_id: int, before_id: int, limit: int, max_bytes: int
    ) -> Deferred[ConvRows]:
        return self._db.call(_by_activity, user_id, before_id, limit, max_bytes)

    def changes(
        self, user_id: int, since_version: int, limit: int, max_bytes: int
    ) -> Deferred[ConvRows]:
        return self._db.call(_changes, user_id, since_version, limit, max_bytes)

    def read_positions(
        self, user_id: int, convs: Sequence[tuple[int, int]]
    ) -> Deferred[dict[tuple[int, int], int]]:
        return self._db.call(_read_positions, user_id, list(convs))


# ------------------------------------------------------------------------ writes


@dataclass(slots=True)
class _Row:
    """A row in memory, ids unsigned."""

    hidden: bool = False
    hide_id: int = 0
    read_id: int = 0
    peer_read_id: int = 0
    unread: int = 0  # the tracked ids plus those dropped past MAX_UNREAD_TRACKED
    unread_ids: list[int] = field(default_factory=list)  # ascending, all > read_id
    last_id: int = 0
    version: int = 0

    def visible(self) -> tuple[bool, int, int, int, int]:
        return self.hidden, self.read_id, self.peer_read_id, self.unread, self.last_id

    def count_unread(self, msg_id: int) -> None:
        """A message from someone else, counted once."""
        ids = self.unread_ids
        if msg_id <= self.read_id:
            return
        i = bisect_left(ids, msg_id)
        if i < len(ids) and ids[i] == msg_id:
            return  # counted already (a redelivery)
        if i == 0 and len(ids) >= MAX_UNREAD_TRACKED:
            return  # older than every tracked id: it may be one counted and dropped already
        ids.insert(i, msg_id)
        self.unread += 1
        if len(ids) > MAX_UNREAD_TRACKED:
            del ids[0]  # still counted, no longer tracked

    def read_to(self, msg_id: int) -> None:
        if msg_id <= self.read_id:
            return
        self.read_id = msg_id
        n = bisect_right(self.unread_ids, msg_id)
        if n:  # the untracked ones are older than every tracked one: read as well
            del self.unread_ids[:n]
            self.unread = len(self.unread_ids)
        # else: the untracked ones (if any) may be above msg_id: the count stays (an upper bound)


def _counted(row: _Row | None) -> int:
    """The row's share of the user's total_unread."""
    return row.unread if row is not None and not row.hidden else 0


class _Rows:
    """The rows one transaction changes: read at once, changed in memory, written at once."""

    def __init__(self, db: sqlite3.Connection, keys: list[_Key]) -> None:
        self._db = db
        self._rows: dict[_Key, _Row] = {}
        self._before: dict[_Key, _Row | None] = {}  # as read (None: no row)
        self.messages: dict[int, Message] = {}  # the messages that may become a row's last
        wanted = list(dict.fromkeys(keys))
        found: list[tuple[Any, ...]] = []
        # The keys as a VALUES table, a chunk per statement (bound parameters are capped):
        # several times faster than unpacking a JSON array with json_extract per row.
        for i in range(0, len(wanted), _KEYS_PER_READ):
            chunk = wanted[i : i + _KEYS_PER_READ]
            values = ",".join(["(?,?,?)"] * len(chunk))
            bound = [v for user, kind, conv in chunk for v in (user - BIAS, kind, conv - BIAS)]
            found += db.execute(
                f"WITH k(u, t, c) AS (VALUES {values})"
                " SELECT c.user_id, c.conv_kind, c.conv_id, c.hidden, c.hide_id, c.read_id,"
                " c.peer_read_id, c.unread, c.unread_ids, c.last_id, c.version"
                " FROM k CROSS JOIN conv_rows c"
                " ON c.user_id = k.u AND c.conv_kind = k.t AND c.conv_id = k.c",
                bound,
            ).fetchall()
        for user, kind, conv, hidden, hide, read, peer, unread, blob, last, version in found:
            ids = list(struct.unpack(f">{len(blob) // 8}Q", blob))
            args = (bool(hidden), hide + BIAS, read + BIAS, peer + BIAS, unread)
            key = (user + BIAS, kind, conv + BIAS)
            self._rows[key] = _Row(*args, ids, last + BIAS, version)
            self._before[key] = _Row(*args, list(ids), last + BIAS, version)

    def get(self, key: _Key) -> _Row:
        """One of the keys given to the constructor (or a new row)."""
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = _Row()
            self._before[key] = None
        return row

    def write(self, now: int) -> None:
        changed: dict[int, list[tuple[_Key, _Row, _Row | None]]] = {}
        for key, row in self._rows.items():
            before = self._before[key]
            if before is None or row.visible() != before.visible() or row.hide_id != before.hide_id:
                changed.setdefault(key[0], []).append((key, row, before))
        if not changed:
            return  # a redelivery, or marks that do not move: no version, no write
        users = {
            user + BIAS: (version, total)
            for user, version, total in self._db.execute(
                "SELECT user_id, version, total_unread FROM conv_users"
                " WHERE user_id IN (SELECT value FROM json_each(?))",
                (json.dumps([u - BIAS for u in changed]),),
            )
        }
        counters: list[tuple[int, int, int]] = []
        stored: dict[int, Message] = {}
        replaced: set[int] = set()
        params: list[tuple[Any, ...]] = []
        for user, rows in changed.items():
            version, total = users.get(user, (0, 0))
            for key, row, before in rows:
                # hide_id alone is not part of the CONV record: no new version for it.
                if before is None or row.visible() != before.visible():
                    version += 1
                    row.version = version
                total += _counted(row) - _counted(before)
                old_last = before.last_id if before is not None else 0
                if row.last_id != old_last:
                    stored[row.last_id] = self.messages[row.last_id]
                    if old_last:
                        replaced.add(old_last - BIAS)
                ids = row.unread_ids
                params.append((
                    user - BIAS, key[1], key[2] - BIAS, row.version, int(row.hidden),
                    row.hide_id - BIAS, row.read_id - BIAS, row.peer_read_id - BIAS,
                    row.unread, struct.pack(f">{len(ids)}Q", *ids), row.last_id - BIAS, now,
                ))  # fmt: skip
            counters.append((user - BIAS, version, total))
        self._db.executemany(
            "INSERT INTO conv_users (user_id, version, total_unread) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id) DO UPDATE"
            " SET version = excluded.version, total_unread = excluded.total_unread",
            counters,
        )
        store_messages(self._db, stored.values())
        self._db.executemany(_WRITE_ROW, params)
        if replaced:  # a last message inbox and history no longer hold may go now
            delete_unreferenced(self._db, replaced)


_WRITE_ROW = (
    "INSERT INTO conv_rows (user_id, conv_kind, conv_id, version, hidden, hide_id, read_id,"
    " peer_read_id, unread, unread_ids, last_id, changed_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (user_id, conv_kind, conv_id) DO UPDATE SET version = excluded.version,"
    " hidden = excluded.hidden, hide_id = excluded.hide_id, read_id = excluded.read_id,"
    " peer_read_id = excluded.peer_read_id, unread = excluded.unread,"
    " unread_ids = excluded.unread_ids, last_id = excluded.last_id,"
    " changed_ms = excluded.changed_ms"
)


_USER, _GROUP = int(ConvKind.USER), int(ConvKind.GROUP)  # plain ints: compared per row


def _conv_keys(job: PersistJob) -> list[tuple[_Key, Message]]:
    """Each receiver's conversation of the job's message."""
    m = job.message
    if m.conv_kind == _GROUP:
        return [((user, _GROUP, m.conv_id), m) for user in job.inbox_users]
    sender, conv = m.sender_id, m.conv_id
    return [((user, _USER, conv if user == sender else sender), m) for user in job.inbox_users]


def _record(db: sqlite3.Connection, jobs: list[PersistJob], now: int) -> None:
    todo = [item for job in jobs for item in _conv_keys(job)]
    rows = _Rows(db, [key for key, _ in todo])
    rows.messages = {j.message.msg_id: j.message for j in jobs}
    for key, m in todo:  # a repeated user or job changes nothing the second time
        row = rows.get(key)
        if m.msg_id > row.last_id:
            row.last_id = m.msg_id
        if row.hidden and m.msg_id > row.hide_id:
            row.hidden = False
        if m.sender_id == key[0]:
            row.read_to(m.msg_id)  # one has read what one answers
        else:
            row.count_unread(m.msg_id)
            if key[1] == _USER:  # so the peer, who answers, has read up to its message
                row.peer_read_id = max(row.peer_read_id, m.msg_id)
    rows.write(now)


def _apply(db: sqlite3.Connection, jobs: list[StateJob], now: int) -> None:
    keys: list[_Key] = []
    for job in jobs:
        keys.append((job.user_id, job.conv_kind, job.conv_id))
        if job.kind == StateJob.MARK and job.conv_kind == ConvKind.USER:
            keys.append((job.conv_id, ConvKind.USER, job.user_id))
    rows = _Rows(db, keys)
    for job in jobs:
        row = rows.get((job.user_id, job.conv_kind, job.conv_id))
        if job.kind == StateJob.MARK:
            row.read_to(job.msg_id)
            if job.conv_kind == ConvKind.USER and job.conv_id != job.user_id:
                peer = rows.get((job.conv_id, ConvKind.USER, job.user_id))
                peer.peer_read_id = max(peer.peer_read_id, job.msg_id)
        else:  # HIDE: a message newer than the hide shows the row again
            row.hide_id = max(row.hide_id, job.msg_id)
            if row.last_id <= job.msg_id:
                row.hidden = True
    rows.write(now)


# ------------------------------------------------------------------------- reads

_ROW_COLS = (
    "c.conv_kind, c.conv_id, c.version, c.hidden, c.read_id, c.peer_read_id, c.unread,"
    " c.last_id, " + record_size_sql("m")
)


def _user_state(db: sqlite3.Connection, user: int) -> tuple[int, int]:
    row = db.execute(
        "SELECT version, total_unread FROM conv_users WHERE user_id = ?", (user,)
    ).fetchone()
    return (row[0], row[1]) if row else (0, 0)


def _page(db: sqlite3.Connection, rows: list[Any], limit: int, max_bytes: int) -> list[ConvState]:
    """The leading `rows` (_ROW_COLS, up to limit + 1 read) that fit the byte budget."""
    n = fit_sizes((CONV_OVERHEAD + (r[8] or 0) for r in rows[:limit]), max_bytes)
    rows = rows[:n]
    wanted = [r[7] for r in rows if r[7] != _NONE and r[8] is not None]
    records: dict[int, bytes] = {}
    if wanted:
        for r in db.execute(
            f"SELECT {MSG_COLS} FROM messages m WHERE m.msg_id IN (SELECT value FROM json_each(?))",
            (id_list(wanted),),
        ):
            records[r[0]] = record_of_row(r)
    return [_state(r, records.get(r[7])) for r in rows]


def _state(row: Sequence[Any], last: bytes | None) -> ConvState:
    kind, conv, version, hidden, read, peer, unread, last_id, _ = row
    return ConvState(
        kind, unsigned(conv), version, bool(hidden), unsigned(read), unsigned(peer), unread,
        unsigned(last_id), last,
    )  # fmt: skip


def _by_activity(
    db: sqlite3.Connection, user_id: int, before_id: int, limit: int, max_bytes: int
) -> ConvRows:
    user = signed(user_id)
    version, total = _user_state(db, user)
    limit = max(0, limit)
    hi = signed(before_id - 1 if before_id else U64_MAX)  # last_id < before_id
    # The conv_activity index yields this order (its key ends with the primary key's columns).
    rows = db.execute(
        f"SELECT {_ROW_COLS} FROM conv_rows c LEFT JOIN messages m ON m.msg_id = c.last_id"
        " WHERE c.user_id = ? AND c.hidden = 0 AND c.last_id <= ?"
        " ORDER BY c.last_id DESC, c.conv_kind DESC, c.conv_id DESC LIMIT ?",
        (user, hi, limit + 1),
    ).fetchall()
    convs = _page(db, rows, limit, max_bytes)
    return ConvRows(version, len(rows) > len(convs), total, tuple(convs))


def _changes(
    db: sqlite3.Connection, user_id: int, since_version: int, limit: int, max_bytes: int
) -> ConvRows:
    user = signed(user_id)
    version, total = _user_state(db, user)
    limit = max(0, limit)
    rows = db.execute(
        f"SELECT {_ROW_COLS} FROM conv_rows c LEFT JOIN messages m ON m.msg_id = c.last_id"
        " WHERE c.user_id = ? AND c.version > ? ORDER BY c.version LIMIT ?",
        (user, min(since_version, SQLITE_MAX_INT), limit + 1),
    ).fetchall()
    convs = _page(db, rows, limit, max_bytes)
    if convs:
        version = convs[-1].version
    return ConvRows(version, len(rows) > len(convs), total, tuple(convs))


def _read_positions(
    db: sqlite3.Connection, user_id: int, convs: list[tuple[int, int]]
) -> dict[tuple[int, int], int]:
    user = signed(user_id)
    found: dict[tuple[int, int], int] = {}
    for kind, conv in dict.fromkeys(convs):
        row = db.execute(
            "SELECT read_id FROM conv_rows WHERE user_id = ? AND conv_kind = ? AND conv_id = ?",
            (user, kind, signed(conv)),
        ).fetchone()
        if row is not None and row[0] != _NONE:
            found[(kind, conv)] = unsigned(row[0])
    return found


# --------------------------------------------------------------------- retention


def expire_conversations(db: sqlite3.Connection, cutoff: int) -> tuple[int, list[int]]:
    """Remove the rows not changed since `cutoff` (ms), taking their unread out of the users'
    totals; returns how many went and the (stored) last_ids they referred to."""
    removed = db.execute(
        "DELETE FROM conv_rows WHERE changed_ms < ? RETURNING user_id, hidden, unread, last_id",
        (cutoff,),
    ).fetchall()
    totals: dict[int, int] = {}
    for user, hidden, unread, _ in removed:
        totals[user] = totals.get(user, 0) + (0 if hidden else unread)
    db.executemany(
        "UPDATE conv_users SET total_unread = max(0, total_unread - ?) WHERE user_id = ?",
        [(unread, user) for user, unread in totals.items() if unread],
    )
    return len(removed), [last for *_, last in removed if last != _NONE]
