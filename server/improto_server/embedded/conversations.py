"""Conversation lists in the embedded database (the ConversationStore port).

`conv_rows` holds one row per (user, conversation as that user sees it): the newest message
(last_id, referring to the shared `messages` row, which stays while a row refers to it: see
delete_unreferenced), the read positions, the unread count and the ids it counts (unread_ids:
at most MAX_UNREAD_TRACKED, the newest, as ascending big-endian u64), the newest hide's msg_id
(hide_id) and the user's list version at the row's last visible change. `conv_users` keeps
each user's newest version and the unread sum over its rows that are not hidden, so a list
page reads neither every row nor a sum. A user's conv_users row is never removed: versions
keep increasing after retention removed every row (a client's stored version stays valid).

Writes come from record, apply and fold (call_background), one transaction per call: the rows
a call touches are read once, changed in memory in order and written back once, each visibly
changed row with the user's next version. Rows go `retention_ms` after their last change
(changed_ms), by the backend's sweep (expire_conversations).

The rows follow the inboxes: every message has an entry in each of its users' inboxes (the
sender's too), so `fold` applies a user's entries above conv_users.folded_to (the inbox cursor
folded so far) as record applies their messages, then moves folded_to. A fold of many entries
writes each row once, not once per message as recording each batch did; folded_to moves in the
same transaction as the rows, so no entry is applied twice.
"""

from __future__ import annotations

import json
import sqlite3
import struct
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
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
    FOLD_ENTRIES,
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

    def fold(self, user_ids: Sequence[int], *, reader: bool = False) -> Deferred[list[int]]:
        call = self._db.call if reader else self._db.call_background
        return call(_fold, list(user_ids), self._now_ms())

    def behind(self) -> Deferred[list[int]]:
        return self._db.call(_behind)

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

    def rows(
        self, user_id: int, convs: Sequence[tuple[int, int]]
    ) -> Deferred[dict[tuple[int, int], ConvState]]:
        return self._db.call(_rows, user_id, list(convs))


# ------------------------------------------------------------------------ writes

# Rows are handled as stored (signed) values, which order as the unsigned ones do: no
# conversion per row. unread_ids stays the stored bytes; the common changes (an id above every
# tracked one, a read past all or none of them) need no unpacking.
_ID = struct.Struct(">Q")


class _Row:
    """A row in memory, ids stored (signed) values, unread_ids as stored."""

    __slots__ = (
        "before",
        "before_hide",
        "hidden",
        "hide_id",
        "ids",
        "last_id",
        "peer_read_id",
        "read_id",
        "unread",
        "version",
    )  # fmt: skip

    def __init__(
        self, hidden: int, hide_id: int, read_id: int, peer_read_id: int, unread: int,
        ids: bytes, last_id: int, version: int, before: tuple[int, ...] | None,
    ) -> None:  # fmt: skip
        self.hidden = hidden
        self.hide_id = hide_id
        self.read_id = read_id
        self.peer_read_id = peer_read_id
        self.unread = unread  # the tracked ids plus those dropped past MAX_UNREAD_TRACKED
        self.ids = ids  # ascending unsigned big-endian u64, all > read_id
        self.last_id = last_id
        self.version = version
        self.before = before  # (hidden, read_id, peer_read_id, unread, last_id) as read
        self.before_hide = hide_id

    def count_unread(self, msg_id: int) -> None:
        """A message from someone else (stored msg_id), counted once."""
        if msg_id <= self.read_id:
            return
        ids = self.ids
        if not ids or msg_id + BIAS > _ID.unpack_from(ids, len(ids) - 8)[0]:  # the newest
            if len(ids) >= _MAX_TRACKED_BYTES:
                ids = ids[8:]  # still counted, no longer tracked
            self.ids = ids + _ID.pack(msg_id + BIAS)
            self.unread += 1
            return
        tracked = list(struct.unpack(f">{len(ids) // 8}Q", ids))
        u = msg_id + BIAS
        i = bisect_left(tracked, u)
        if tracked[i] == u:
            return  # counted already (a redelivery)
        if i == 0 and len(tracked) >= MAX_UNREAD_TRACKED:
            return  # older than every tracked id: it may be one counted and dropped already
        tracked.insert(i, u)
        self.unread += 1
        if len(tracked) > MAX_UNREAD_TRACKED:
            del tracked[0]
        self.ids = struct.pack(f">{len(tracked)}Q", *tracked)

    def read_to(self, msg_id: int) -> None:
        if msg_id <= self.read_id:
            return
        self.read_id = msg_id
        ids = self.ids
        if not ids:
            return  # the untracked ones (if any) may be above msg_id: the count stays
        u = msg_id + BIAS
        if u >= _ID.unpack_from(ids, len(ids) - 8)[0]:
            self.ids = b""  # all read, the untracked ones (older than every tracked) too
            self.unread = 0
        elif u >= _ID.unpack_from(ids)[0]:
            tracked = struct.unpack(f">{len(ids) // 8}Q", ids)
            n = bisect_right(tracked, u)
            self.ids = ids[8 * n :]
            self.unread = len(tracked) - n
        # else: none of the tracked ones read; the untracked ones may be above: the count stays


_MAX_TRACKED_BYTES = 8 * MAX_UNREAD_TRACKED


def _new_row() -> _Row:
    return _Row(0, _NONE, _NONE, _NONE, 0, b"", _NONE, 0, None)


class _Rows:
    """The rows one transaction changes: read at once, changed in memory, written at once.
    Keys are stored (signed) values: (user, conv_kind, conv_id)."""

    def __init__(self, db: sqlite3.Connection, keys: list[_Key]) -> None:
        self._db = db
        rows: dict[_Key, _Row] = {}
        self._rows = rows
        # stored msg_id: a message that may become a last and may not be stored yet (None:
        # every such message has its row, as an inbox entry's has)
        self.messages: dict[int, Message] | None = None
        wanted = list(dict.fromkeys(keys))
        # The keys as a VALUES table, a chunk per statement (bound parameters are capped):
        # several times faster than unpacking a JSON array with json_extract per row.
        for i in range(0, len(wanted), _KEYS_PER_READ):
            chunk = wanted[i : i + _KEYS_PER_READ]
            values = ",".join(["(?,?,?)"] * len(chunk))
            for (
                user,
                kind,
                conv,
                hidden,
                hide,
                read,
                peer,
                unread,
                blob,
                last,
                version,
            ) in db.execute(
                f"WITH k(u, t, c) AS (VALUES {values})"
                " SELECT c.user_id, c.conv_kind, c.conv_id, c.hidden, c.hide_id, c.read_id,"
                " c.peer_read_id, c.unread, c.unread_ids, c.last_id, c.version"
                " FROM k CROSS JOIN conv_rows c"
                " ON c.user_id = k.u AND c.conv_kind = k.t AND c.conv_id = k.c",
                [v for key in chunk for v in key],
            ):
                rows[(user, kind, conv)] = _Row(
                    hidden, hide, read, peer, unread, blob, last, version,
                    (hidden, read, peer, unread, last),
                )  # fmt: skip

    def get(self, key: _Key) -> _Row:
        """One of the keys given to the constructor (or a new row)."""
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = _new_row()
        return row

    def write(self, now: int) -> None:
        changed: dict[int, list[tuple[_Key, _Row]]] = {}
        for key, row in self._rows.items():
            before = row.before
            if (
                before is None
                or (row.hidden, row.read_id, row.peer_read_id, row.unread, row.last_id) != before
                or row.hide_id != row.before_hide
            ):
                if key[0] in changed:
                    changed[key[0]].append((key, row))
                else:
                    changed[key[0]] = [(key, row)]
        if not changed:
            return  # a redelivery, or marks that do not move: no version, no write
        users = {
            user: (version, total)
            for user, version, total in self._db.execute(
                "SELECT user_id, version, total_unread FROM conv_users"
                " WHERE user_id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(changed)),),
            )
        }
        counters: list[tuple[int, int, int]] = []
        lasts: set[int] = set()  # the new last messages
        replaced: set[int] = set()
        inserts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        for user, rows in changed.items():
            version, total = users.get(user, (0, 0))
            for key, row in rows:
                before = row.before
                if before is None:
                    version += 1
                    row.version = version
                    if not row.hidden:
                        total += row.unread
                    if row.last_id != _NONE:
                        lasts.add(row.last_id)
                    inserts.append((
                        *key, version, row.hidden, row.hide_id, row.read_id, row.peer_read_id,
                        row.unread, row.ids, row.last_id, now,
                    ))  # fmt: skip
                    continue
                hidden, _, _, unread, old_last = before
                # hide_id alone is not part of the CONV record: no new version for it.
                if (row.hidden, row.read_id, row.peer_read_id, row.unread, row.last_id) != before:
                    version += 1
                    row.version = version
                total += (0 if row.hidden else row.unread) - (0 if hidden else unread)
                if row.last_id != old_last:
                    lasts.add(row.last_id)
                    if old_last != _NONE:
                        replaced.add(old_last)
                updates.append((
                    row.version, row.hidden, row.hide_id, row.read_id, row.peer_read_id,
                    row.unread, row.ids, row.last_id, now, *key,
                ))  # fmt: skip
            counters.append((user, version, total))
        self._db.executemany(
            "INSERT INTO conv_users (user_id, version, total_unread) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id) DO UPDATE"
            " SET version = excluded.version, total_unread = excluded.total_unread",
            counters,
        )
        if self.messages is not None:
            store_messages(self._db, [self.messages[mid] for mid in lasts])
        if updates:
            self._db.executemany(_UPDATE_ROW, updates)
        if inserts:
            self._db.executemany(_INSERT_ROW, inserts)
        if replaced:  # a last message inbox and history no longer hold may go now
            delete_unreferenced(self._db, replaced)


# The rows read exist, the others do not (one transaction): no upsert needed.
_UPDATE_ROW = (
    "UPDATE conv_rows SET version = ?, hidden = ?, hide_id = ?, read_id = ?, peer_read_id = ?,"
    " unread = ?, unread_ids = ?, last_id = ?, changed_ms = ?"
    " WHERE user_id = ? AND conv_kind = ? AND conv_id = ?"
)
_INSERT_ROW = (
    "INSERT INTO conv_rows (user_id, conv_kind, conv_id, version, hidden, hide_id, read_id,"
    " peer_read_id, unread, unread_ids, last_id, changed_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


_USER, _GROUP = int(ConvKind.USER), int(ConvKind.GROUP)  # plain ints: compared per row


# What a message does to one user's row: (key, stored msg_id, from the user itself, 1:1).
_Entry = tuple[_Key, int, bool, bool]


def _record(db: sqlite3.Connection, jobs: list[PersistJob], now: int) -> None:
    todo: list[_Entry] = []  # per job and receiver, in order
    messages: dict[int, Message] = {}
    for job in jobs:
        m = job.message
        mid = m.msg_id - BIAS
        messages[mid] = m
        sender = m.sender_id
        if m.conv_kind == _GROUP:
            conv = m.conv_id - BIAS
            todo += [
                ((user - BIAS, _GROUP, conv), mid, user == sender, False)
                for user in job.inbox_users
            ]
        else:
            conv, peer = m.conv_id - BIAS, sender - BIAS
            todo += [
                ((user - BIAS, _USER, conv if user == sender else peer), mid, user == sender, True)
                for user in job.inbox_users
            ]
    _write_entries(db, todo, messages, now)


def _write_entries(
    db: sqlite3.Connection, todo: list[_Entry], messages: dict[int, Message] | None, now: int
) -> None:
    """Apply the entries in order; `messages`: as _Rows.messages."""
    rows = _Rows(db, [item[0] for item in todo])
    rows.messages = messages
    get = rows.get
    for key, mid, own, one_to_one in todo:  # a repeated user or job changes nothing twice
        row = get(key)
        if mid > row.last_id:
            row.last_id = mid
        if row.hidden and mid > row.hide_id:
            row.hidden = 0
        if own:
            row.read_to(mid)  # one has read what one answers
        else:
            row.count_unread(mid)
            if one_to_one and mid > row.peer_read_id:  # so the peer, who answers, has read
                row.peer_read_id = mid  # up to its message
    rows.write(now)


# A user's entries above its folded position in cursor order (the inbox key's), with the
# columns of their messages the rows need, as stored (the todo's values).
_ENTRIES = (
    "SELECT i.cursor, m.msg_id, m.sender_id, m.conv_kind, m.conv_id"
    " FROM inbox i JOIN messages m ON m.msg_id = i.msg_id"
    " WHERE i.user_id = ? AND i.cursor > ? ORDER BY i.cursor LIMIT ?"
)


def _fold(db: sqlite3.Connection, user_ids: list[int], now: int) -> list[int]:
    users = id_list(dict.fromkeys(signed(u) for u in user_ids))
    # Only the users with entries above their position: no inbox or folded to its head, none.
    due = db.execute(
        "SELECT h.user_id, coalesce(c.folded_to, 0), h.head FROM inbox_head h"
        " LEFT JOIN conv_users c ON c.user_id = h.user_id"
        " WHERE h.user_id IN (SELECT value FROM json_each(?))"
        " AND h.head > coalesce(c.folded_to, 0)",
        (users,),
    ).fetchall()
    todo: list[_Entry] = []
    folded: list[tuple[int, int]] = []  # user, new folded_to
    behind: list[int] = []
    for user, start, head in due:
        entries = db.execute(_ENTRIES, (user, start, FOLD_ENTRIES + 1)).fetchall()
        if len(entries) > FOLD_ENTRIES:
            del entries[FOLD_ENTRIES:]
            folded.append((user, entries[-1][0]))
            behind.append(unsigned(user))
        else:  # none left: to the head, past the entries the inbox no longer holds
            folded.append((user, head))
        for _, mid, sender, kind, conv in entries:
            own = sender == user
            if kind == _GROUP:
                todo.append(((user, _GROUP, conv), mid, own, False))
            else:  # a 1:1 entry is the sender's or the receiver's (conv_id)
                todo.append(((user, _USER, conv if own else sender), mid, own, True))
    if todo:
        _write_entries(db, todo, None, now)
    # After the rows' write: its conv_users upsert leaves folded_to as it is.
    db.executemany(
        "INSERT INTO conv_users (user_id, version, folded_to) VALUES (?, 0, ?)"
        " ON CONFLICT (user_id) DO UPDATE SET folded_to = excluded.folded_to",
        folded,
    )
    return behind


def _behind(db: sqlite3.Connection) -> list[int]:
    return [
        unsigned(user)
        for (user,) in db.execute(
            "SELECT h.user_id FROM inbox_head h LEFT JOIN conv_users c ON c.user_id = h.user_id"
            " WHERE h.head > coalesce(c.folded_to, 0)"
        )
    ]


def _apply(db: sqlite3.Connection, jobs: list[StateJob], now: int) -> None:
    todo: list[tuple[StateJob, _Key, _Key | None, int]] = []
    for job in jobs:
        user, conv = job.user_id - BIAS, job.conv_id - BIAS
        peer = None
        if job.kind == StateJob.MARK and job.conv_kind == _USER and job.conv_id != job.user_id:
            peer = (conv, _USER, user)
        todo.append((job, (user, int(job.conv_kind), conv), peer, job.msg_id - BIAS))
    keys = [k for _, own, peer_k, _ in todo for k in (own, peer_k) if k is not None]
    rows = _Rows(db, keys)
    for job, key, peer_key, mid in todo:
        row = rows.get(key)
        if job.kind == StateJob.MARK:
            row.read_to(mid)
            if peer_key is not None:
                peer_row = rows.get(peer_key)
                peer_row.peer_read_id = max(peer_row.peer_read_id, mid)
        else:  # HIDE: a message newer than the hide shows the row again
            row.hide_id = max(row.hide_id, mid)
            if row.last_id <= mid:
                row.hidden = 1
    rows.write(now)


# ------------------------------------------------------------------------- reads

_ROW_COLS = (
    "c.conv_kind, c.conv_id, c.version, c.hidden, c.read_id, c.peer_read_id, c.unread,"
    " c.last_id, " + record_size_sql("m") + ", c.hide_id"
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
    kind, conv, version, hidden, read, peer, unread, last_id, _, hide = row
    return ConvState(
        kind, unsigned(conv), version, bool(hidden), unsigned(read), unsigned(peer), unread,
        unsigned(last_id), last, unsigned(hide),
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


def _rows(
    db: sqlite3.Connection, user_id: int, convs: list[tuple[int, int]]
) -> dict[tuple[int, int], ConvState]:
    user = signed(user_id)
    found = []
    for kind, conv in dict.fromkeys(convs):
        found += db.execute(
            f"SELECT {_ROW_COLS} FROM conv_rows c LEFT JOIN messages m ON m.msg_id = c.last_id"
            " WHERE c.user_id = ? AND c.conv_kind = ? AND c.conv_id = ?",
            (user, kind, signed(conv)),
        ).fetchall()
    states = _page(db, found, len(found), 2**62)  # every one, with its last record
    return {(c.conv_kind, c.conv_id): c for c in states}


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
