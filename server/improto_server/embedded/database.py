"""The embedded backend's one SQLite database: its connection and thread, its schema, and the
conventions every embedded store follows.

One connection is used from a one-thread pool, so all database work is serialized: each
operation is one transaction that sees no concurrent writer, and the reactor never blocks
on the disk. (A private in-RAM database runs its calls on the reactor thread: Database.inline.)
`Database.call(fn, *args)` runs a plain function `fn(db, *args)` as one transaction on that
thread (Synapse's runInteraction); `call_background` does the same for persister and
retention work, which waits while any `call` is due, so clients never queue behind it.
Functions in embedded/ that take `db` run there; everything else runs on the reactor.

SQLite integers are signed 64-bit. Every u64 that comes from the wire (user ids, msg_ids,
since_ids, server_time) is stored as `signed(v) = v - 2**63`, an order-preserving bijection
onto the signed range, so ORDER BY and range conditions compare like unsigned integers even
near 2**64-1. Values the backend makes itself (inbox cursors, group ids, join sequence
numbers, stored_ms, list versions, changed_ms) are small and stored as they are.

Storage format. The tables keep messages as columns (not as stored records), so the schema
version is the embedded store's storage format: `PRAGMA user_version` holds SCHEMA_VERSION.
0 is a new, empty database, which gets the schema; an older version is migrated in the same
transaction (MIGRATIONS); a database of any other version (one a newer improto wrote, or not
improto's) is refused with UnsupportedSchema before anything in it
is read or written. A change to how rows are stored bumps SCHEMA_VERSION and adds the
migration from the version before it. (The queued jobs are PersistJob bytes,
which carry a format of their own: see PersistJob.to_bytes; so do the timeline's records,
stored records as the production history keeps them.)
"""

from __future__ import annotations

import json
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from improto.frames import Message
from improto.limits import U64_MAX
from improto.records import pack_record
from improto_server.deferreds import as_deferred
from improto_server.reactor_types import IServerReactor

_R = TypeVar("_R")
_Call = tuple[Callable[..., Any], tuple[Any, ...], "Deferred[Any]"]

SCHEMA_VERSION = 7  # 2: inbox sizes and byte totals, positions' last use; 3: conversations;
# 4: conversations folded from the inboxes (conv_users.folded_to); 5: push registrations,
# revocations and the notifier's queue; 6: large groups' timelines; 7: the groups' large flag

_BIAS = BIAS = 1 << 63  # signed(v) = v - BIAS
SQLITE_MAX_INT = _BIAS - 1


def signed(v: int) -> int:
    """u64 -> stored signed value (order-preserving)."""
    if not 0 <= v <= U64_MAX:
        raise ValueError(f"{v} is not an unsigned 64-bit value")
    return v - _BIAS


def unsigned(v: int) -> int:
    """Stored signed value -> u64."""
    return v + _BIAS


def id_list(ids: Iterable[int]) -> str:
    """Stored ids as one JSON parameter, for `IN (SELECT value FROM json_each(?))`."""
    return json.dumps(list(ids))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dedup (
    sender_id INTEGER NOT NULL,
    client_msg_id BLOB NOT NULL,
    msg_id INTEGER NOT NULL,
    server_time INTEGER NOT NULL,
    stored_ms INTEGER NOT NULL,
    PRIMARY KEY (sender_id, client_msg_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_age ON dedup (stored_ms);

-- One row per message, shared by every inbox entry and the history row that refer to it.
CREATE TABLE IF NOT EXISTS messages (
    msg_id INTEGER PRIMARY KEY,
    server_time INTEGER NOT NULL,
    sender_id INTEGER NOT NULL,
    sender_device TEXT NOT NULL,
    conv_kind INTEGER NOT NULL,
    conv_id INTEGER NOT NULL,
    content_type INTEGER NOT NULL,
    client_msg_id BLOB NOT NULL,
    body BLOB NOT NULL
);

-- head: the largest cursor ever assigned; floor: the largest cursor removed by retention or
-- by the inbox caps; bytes: the sum of the sizes of the user's inbox rows.
CREATE TABLE IF NOT EXISTS inbox_head (
    user_id INTEGER PRIMARY KEY,
    head INTEGER NOT NULL,
    floor INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0
);
-- size: the entry's MESSAGE record length, so caps and page budgets need no message row.
CREATE TABLE IF NOT EXISTS inbox (
    user_id INTEGER NOT NULL,
    cursor INTEGER NOT NULL,
    msg_id INTEGER NOT NULL,
    stored_ms INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, cursor)
) WITHOUT ROWID;
-- (msg_id, user_id): idempotent appends, and "is this message still referenced" in sweeps.
CREATE UNIQUE INDEX IF NOT EXISTS inbox_msg ON inbox (msg_id, user_id);
CREATE INDEX IF NOT EXISTS inbox_age ON inbox (user_id, stored_ms);
-- used: the user's advance counter at the device's last advance (the least recent go first).
CREATE TABLE IF NOT EXISTS positions (
    user_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS history (
    conv TEXT NOT NULL,
    msg_id INTEGER NOT NULL,
    server_time INTEGER NOT NULL,
    PRIMARY KEY (conv, msg_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_age ON history (server_time);
CREATE INDEX IF NOT EXISTS history_msg ON history (msg_id);

-- AUTOINCREMENT: group ids and join sequence numbers are never reused. large: 1 while the
-- group is read-diffused (embedded/groups.py, large_after_join), set with the membership.
CREATE TABLE IF NOT EXISTS groups (
    group_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    owner_id INTEGER NOT NULL,
    large INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS members (
    join_seq INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    since_id INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS members_group ON members (group_id, user_id);
CREATE INDEX IF NOT EXISTS members_user ON members (user_id, group_id);
"""

# Conversation lists (embedded/conversations.py); the migration from version 2 creates them too.
_CONV_SCHEMA = """
-- version: the user's newest list version; total_unread: the sum of unread over the user's
-- rows not hidden; folded_to: the user's inbox cursor the rows are folded up to.
CREATE TABLE IF NOT EXISTS conv_users (
    user_id INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    total_unread INTEGER NOT NULL DEFAULT 0,
    folded_to INTEGER NOT NULL DEFAULT 0
);
-- version: the user's list version at the row's last visible change. Positions, hide_id and
-- last_id are stored msg_ids (signed(0): none); last_id refers to the messages row;
-- unread_ids: the tracked unread msg_ids, ascending, as big-endian u64.
CREATE TABLE IF NOT EXISTS conv_rows (
    user_id INTEGER NOT NULL,
    conv_kind INTEGER NOT NULL,
    conv_id INTEGER NOT NULL,
    version INTEGER NOT NULL,
    hidden INTEGER NOT NULL,
    hide_id INTEGER NOT NULL,
    read_id INTEGER NOT NULL,
    peer_read_id INTEGER NOT NULL,
    unread INTEGER NOT NULL,
    unread_ids BLOB NOT NULL,
    last_id INTEGER NOT NULL,
    changed_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, conv_kind, conv_id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS conv_version ON conv_rows (user_id, version);
CREATE INDEX IF NOT EXISTS conv_activity ON conv_rows (user_id, hidden, last_id);
CREATE INDEX IF NOT EXISTS conv_last ON conv_rows (last_id);  -- keeps messages rows alive
CREATE INDEX IF NOT EXISTS conv_age ON conv_rows (changed_ms);
"""
_SCHEMA += _CONV_SCHEMA

# Push registrations and revocations (embedded/devices.py), the notifier's queue
# (embedded/notify_queue.py); the migration from version 4 creates them.
_PUSH_SCHEMA = """
-- user_id stored signed; registered_ms: the injected clock at the (last) registration, the
-- order in which the per-user cap drops registrations (then device_id).
CREATE TABLE IF NOT EXISTS push_targets (
    user_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    platform TEXT NOT NULL,
    token TEXT NOT NULL,
    preview INTEGER NOT NULL,
    registered_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;
-- before_ms: tokens of the user issued before it are refused (only ever raised).
CREATE TABLE IF NOT EXISTS revocations (
    user_id INTEGER PRIMARY KEY,
    before_ms INTEGER NOT NULL
);
-- PersistJob bytes, as in jobs: the messages whose receivers may need a notification.
CREATE TABLE IF NOT EXISTS notify_jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    data BLOB NOT NULL
);
"""
_SCHEMA += _PUSH_SCHEMA

# Large groups' timelines (embedded/timeline.py); the migration from version 5 creates them.
_TIMELINE_SCHEMA = """
-- group_id, msg_id and server_time stored signed; seq: 1, 2, 3, ... per group. record: the
-- stored record (a storage format byte first: records.record_of_stored reads any), size: its
-- MESSAGE record's length, so a page's budget reads no record. A rowid table: records can be
-- large, and the (group_id, seq) index keeps the range scans off them.
CREATE TABLE IF NOT EXISTS timeline (
    group_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    msg_id INTEGER NOT NULL,
    server_time INTEGER NOT NULL,
    size INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (group_id, seq),
    UNIQUE (group_id, msg_id)
);
CREATE INDEX IF NOT EXISTS timeline_age ON timeline (server_time);
-- done: the group's highest seq (every one below it written in the same transaction);
-- last_msg_id: seq done's msg_id, stored signed. Never removed: seqs never restart.
CREATE TABLE IF NOT EXISTS timeline_heads (
    group_id INTEGER PRIMARY KEY,
    done INTEGER NOT NULL,
    last_msg_id INTEGER NOT NULL
);
"""
_SCHEMA += _TIMELINE_SCHEMA


# The bytes of a MESSAGE record besides its sender_device and body (improto.records).
RECORD_FIXED = len(pack_record(0, 0, 0, "", 0, 0, 0, bytes(16), b""))


def record_size_sql(alias: str) -> str:
    """SQL for the MESSAGE record length of messages row `alias`. length() of a BLOB reads
    only the row header (SQLite does not load the content), so no body is read."""
    return f"({RECORD_FIXED} + length(CAST({alias}.sender_device AS BLOB)) + length({alias}.body))"


_CONV_BACKFILL = f"""
INSERT INTO conv_rows
SELECT user_id, conv_kind, conv_id,
       row_number() OVER (PARTITION BY user_id ORDER BY last_id, conv_kind, conv_id),
       0, {-_BIAS}, {-_BIAS}, {-_BIAS}, 0, x'', last_id,
       (SELECT server_time FROM messages WHERE msg_id = last_id) + {_BIAS - 1} + 1
FROM (SELECT user_id, conv_kind, conv_id, max(msg_id) AS last_id FROM (
          SELECT sender_id AS user_id, 1 AS conv_kind, conv_id, msg_id FROM messages
          WHERE conv_kind = 1
          UNION ALL SELECT conv_id, 1, sender_id, msg_id FROM messages
          WHERE conv_kind = 1 AND conv_id != sender_id
          UNION ALL SELECT mb.user_id, 2, m.conv_id, m.msg_id FROM messages m
          JOIN members mb ON mb.group_id = m.conv_id + {_BIAS - 1} + 1 AND mb.since_id <= m.msg_id
          WHERE m.conv_kind = 2)
      GROUP BY user_id, conv_kind, conv_id);
INSERT INTO conv_users SELECT user_id, count(*), 0 FROM conv_rows GROUP BY user_id;
"""

# conv_users as version 3 had it. A migration step works on the tables as the step before it
# left them (the current schema, _SCHEMA, runs after the last step): the step from version 2
# creates this one first, so _CONV_SCHEMA's CREATE IF NOT EXISTS keeps it, and the step from
# version 3 adds the column.
_CONV_USERS_V3 = """
CREATE TABLE conv_users (
    user_id INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    total_unread INTEGER NOT NULL DEFAULT 0
);
"""

# version -> the statements that bring a database of that version to the next one.
MIGRATIONS: dict[int, str] = {
    1: f"""
ALTER TABLE inbox ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
UPDATE inbox SET size = coalesce((SELECT {record_size_sql("m")} FROM messages m
                                  WHERE m.msg_id = inbox.msg_id), 0);
ALTER TABLE inbox_head ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
UPDATE inbox_head SET bytes = (SELECT total(size) FROM inbox i
                               WHERE i.user_id = inbox_head.user_id);
ALTER TABLE positions ADD COLUMN used INTEGER NOT NULL DEFAULT 0;
""",
    # Conversation lists are new: one row per conversation of the retained messages (groups:
    # their current members), read state unknown (read_id 0, nothing counted unread),
    # changed when its last message was sent; versions 1, 2, ... per user by last message.
    2: _CONV_USERS_V3 + _CONV_SCHEMA + _CONV_BACKFILL,
    # The rows follow the inboxes now (ConversationStore.fold). Version 3's persister recorded
    # every entry it appended, so each user is folded up to its inbox's head already.
    3: """
ALTER TABLE conv_users ADD COLUMN folded_to INTEGER NOT NULL DEFAULT 0;
UPDATE conv_users SET folded_to = coalesce((SELECT head FROM inbox_head h
                                            WHERE h.user_id = conv_users.user_id), 0);
INSERT INTO conv_users (user_id, version, total_unread, folded_to)
SELECT user_id, 0, 0, head FROM inbox_head
WHERE user_id NOT IN (SELECT user_id FROM conv_users);
""",
    # New tables only: nobody is registered or revoked yet, no notification is queued.
    4: _PUSH_SCHEMA,
    # New tables only: no group has a timeline yet.
    5: _TIMELINE_SCHEMA,
    # Every group small (version 6 wrote no timeline; the threshold is configuration, not
    # stored): one above the threshold becomes large at its next join.
    6: "ALTER TABLE groups ADD COLUMN large INTEGER NOT NULL DEFAULT 0;",
}


class UnsupportedSchema(RuntimeError):
    """The database file has a schema version (storage format) this server cannot read."""


class Database:
    """The connection and the one thread it is used from.

    `inline` (a private in-RAM database only): every call runs on the reactor thread
    instead, one reactor turn after it was made (still urgent first, still never inside
    the caller's stack). RAM-only transactions do no I/O worth a thread, and the hop there
    and back cost more than most of them; the price is that a long transaction (a large
    persister round) holds the reactor for its length instead of sharing the GIL with it.
    """

    def __init__(self, path: str | Path, reactor: IServerReactor, *, inline: bool = False) -> None:
        self.path = str(path)
        if inline and self.path != ":memory:":
            raise ValueError("only a private in-RAM database (':memory:') runs inline")
        self.inline = inline
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="improto-sqlite")
        self._db: sqlite3.Connection | None = None
        self._running = False  # accepting calls: between open() and close()
        # Calls waiting for the thread (appended on the reactor, popped on the thread: deque
        # appends and pops are atomic). Every call has a pool task queued for it.
        self._urgent: deque[_Call] = deque()
        self._background: deque[_Call] = deque()

    def open(self) -> Deferred[None]:
        """Start the thread; open the file and create or check its schema there."""
        self._running = True
        if self.inline:
            try:
                self._open()
            except BaseException:
                self._running = False
                return fail()
            return succeed(None)
        self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, self._open)

    @as_deferred
    async def close(self) -> None:
        """Close the database once the calls already queued have run; stop the thread."""
        self._running = False
        if self.inline:
            while self._urgent or self._background:  # their turns have not come yet
                self._run_inline()
            self._close_db()
            return
        try:
            await deferToThreadPool(self._reactor, self._pool, self._close_db)
        finally:
            self._pool.stop()  # the one worker is idle now, so this join is immediate

    def call(self, fn: Callable[..., _R], *args: Any) -> Deferred[_R]:
        """Run `fn(db, *args)` as one transaction on the database thread, ahead of every
        background call that is still waiting."""
        return self._submit(self._urgent, fn, args)

    def call_background(self, fn: Callable[..., _R], *args: Any) -> Deferred[_R]:
        """`call` for work nobody waits on interactively (persister writes, the queue's
        consumer, retention): it runs when no `call` is waiting, so a client's accept or
        page waits for at most the one transaction already running, never for a backlog of
        persister rounds."""
        return self._submit(self._background, fn, args)

    def _submit(
        self, lane: deque[_Call], fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> Deferred[Any]:
        if not self._running:
            return fail(RuntimeError("the SQLite database is not open"))
        d: Deferred[Any] = Deferred()
        lane.append((fn, args, d))
        if self.inline:
            self._reactor.callLater(0, self._run_inline)
            return d
        # One pool task per call; each task runs whichever call is due first when the
        # thread gets to it, so priority costs no extra thread hop.
        self._pool.callInThread(self._run_next)
        return d

    def _run_inline(self) -> None:
        if not (self._urgent or self._background):
            return  # close() ran it already
        fn, args, d = self._urgent.popleft() if self._urgent else self._background.popleft()
        try:
            result = self._tx(fn, *args)
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(result)

    def _run_next(self) -> None:
        fn, args, d = self._urgent.popleft() if self._urgent else self._background.popleft()
        try:
            result = self._tx(fn, *args)
        except BaseException:
            self._reactor.callFromThread(d.errback, Failure())
        else:
            self._reactor.callFromThread(d.callback, result)

    def _tx(self, fn: Callable[..., _R], *args: Any) -> _R:
        db = self._db
        assert db is not None, "database not open"
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db, *args)
        except BaseException:
            if db.in_transaction:  # some errors have already rolled SQLite back
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def _open(self) -> None:
        # Autocommit mode: transactions are explicit (see _tx). check_same_thread is off
        # because exclusivity comes from the one-worker pool, not from a thread's identity.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a COMMIT is on disk when it returns
            db.execute("PRAGMA busy_timeout=5000")  # e.g. someone inspecting the file
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if not 0 <= version <= SCHEMA_VERSION:
                newer = " (a newer improto wrote it)" if version > SCHEMA_VERSION else ""
                raise UnsupportedSchema(
                    f"{self.path}: schema version {version} is not supported{newer}: this"
                    f" server reads versions 1 to {SCHEMA_VERSION}"
                )
            steps = [MIGRATIONS[v] for v in range(version, SCHEMA_VERSION)] if version else []
            db.executescript(
                f"BEGIN; {''.join(steps)} {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )
        except BaseException:
            db.close()
            raise
        self._db = db

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class RetainedStore:
    """A store on the database whose entries are kept `retention_ms` by the clock `now_ms`."""

    def __init__(self, db: Database, now_ms: Callable[[], int], retention_ms: int) -> None:
        self._db = db
        self._now_ms = now_ms
        self._retention_ms = retention_ms

    def _cutoff(self) -> int:
        """Entries older than this (ms, may be negative) are past retention."""
        return self._now_ms() - self._retention_ms


# --------------------------------------------------------------- the messages table

MSG_COLS = (
    "m.msg_id, m.server_time, m.sender_id, m.sender_device, m.conv_kind, m.conv_id,"
    " m.content_type, m.client_msg_id, m.body"
)


def store_message(db: sqlite3.Connection, m: Message) -> None:
    """The message's row, unless it is there already (inbox entries and history share it)."""
    store_messages(db, (m,))


def store_messages(db: sqlite3.Connection, ms: Iterable[Message]) -> None:
    """`store_message` of each."""
    db.executemany(
        "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", map(_message_row, ms)
    )


def _message_row(m: Message) -> tuple[Any, ...]:
    return (
        signed(m.msg_id), signed(m.server_time), signed(m.sender_id), m.sender_device,
        m.conv_kind, signed(m.conv_id), m.content_type, m.client_msg_id, m.body,
    )  # fmt: skip


def record_of_row(row: Sequence[Any]) -> bytes:
    """The MESSAGE record (wire bytes) of the MSG_COLS columns of a row."""
    mid, st, sender, device, kind, conv, ctype, cmid, body = row
    return pack_record(
        unsigned(mid), unsigned(st), unsigned(sender), device, kind, unsigned(conv), ctype,
        cmid, body,
    )  # fmt: skip


def delete_unreferenced(db: sqlite3.Connection, msg_ids: Iterable[int]) -> int:
    """Remove those of these (stored) messages that no inbox entry, history row or
    conversation row (its last message) refers to any more; returns how many went."""
    return db.execute(
        "DELETE FROM messages WHERE msg_id IN (SELECT value FROM json_each(?))"
        " AND NOT EXISTS (SELECT 1 FROM inbox i WHERE i.msg_id = messages.msg_id)"
        " AND NOT EXISTS (SELECT 1 FROM history h WHERE h.msg_id = messages.msg_id)"
        " AND NOT EXISTS (SELECT 1 FROM conv_rows c WHERE c.last_id = messages.msg_id)",
        (id_list(msg_ids),),
    ).rowcount


# ------------------------------------------------------------------------ events


class Event:
    """Fires any number of waiters once something has finished (it never fails)."""

    def __init__(self) -> None:
        self.done = False
        self._waiters: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        if self.done:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def set(self) -> None:
        self.done = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)
