"""The embedded backend: persist queue, inboxes, history and groups in one SQLite database.

One connection is used from a one-thread pool, so all database work is serialized: each
operation is one transaction that sees no concurrent writer, and the reactor never blocks.
Functions below that take `db` run on that thread; everything else runs on the reactor.

SQLite integers are signed 64-bit. Every u64 that comes from the wire (user ids, msg_ids,
since_ids, server_time) is stored as `v - 2**63`, an order-preserving bijection onto the
signed range, so ORDER BY and range conditions compare like unsigned integers even near
2**64-1. Values this backend makes itself (inbox cursors, group ids, join sequence numbers,
stored_ms) are small and stored as they are.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from improto.frames import Message
from improto.limits import MAX_GROUP_MEMBERS, MAX_GROUPS_PER_USER, U64_MAX
from improto_server.ids import wall_ms
from improto_server.model import (
    Accepted,
    ConvKey,
    GroupInfo,
    HistorySlice,
    InboxPage,
    LimitExceeded,
    PersistJob,
)
from improto_server.ports import BatchHandler
from improto_server.records import HistoryRecords, InboxRecords, pack_record
from improto_server.turn_batcher import TurnBatcher

_log = Logger()

_R = TypeVar("_R")

DAY_MS = 86_400_000
SCHEMA_VERSION = 1
RETRY_DELAY_S = 0.5  # pause before redelivering a job whose handler failed
FETCH_BATCH = 256  # jobs read per query by the consumer
# Before reading a batch that would be small, the consumer waits this long for more jobs:
# every read, handler call and delete costs about the same for 1 job as for 50, so at low
# rates this cuts the CPU per job several times. Only the stores lag (by <= this); the
# sender's ack and the pushes do not wait for the consumer.
LINGER_S = 0.005
# The accepts of this long share one transaction (not just those of one reactor turn): ~1 ms
# more per SEND, 15-20% less CPU per message at 1-4k msg/s (bench/relay.py).
ACCEPT_WINDOW_S = 0.001
ACCEPT_BATCH = 256  # accepts one transaction commits at most

_BIAS = 1 << 63
_MAX_SIGNED = _BIAS - 1


def _s(v: int) -> int:
    """u64 -> stored signed value (order-preserving)."""
    if not 0 <= v <= U64_MAX:
        raise ValueError(f"{v} is not an unsigned 64-bit value")
    return v - _BIAS


def _u(v: int) -> int:
    """Stored signed value -> u64."""
    return v + _BIAS


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

-- head: the largest cursor ever assigned; floor: the largest cursor removed by retention.
CREATE TABLE IF NOT EXISTS inbox_head (
    user_id INTEGER PRIMARY KEY,
    head INTEGER NOT NULL,
    floor INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS inbox (
    user_id INTEGER NOT NULL,
    cursor INTEGER NOT NULL,
    msg_id INTEGER NOT NULL,
    stored_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, cursor)
) WITHOUT ROWID;
-- (msg_id, user_id): idempotent appends, and "is this message still referenced" in sweeps.
CREATE UNIQUE INDEX IF NOT EXISTS inbox_msg ON inbox (msg_id, user_id);
CREATE INDEX IF NOT EXISTS inbox_age ON inbox (user_id, stored_ms);
CREATE TABLE IF NOT EXISTS positions (
    user_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    position INTEGER NOT NULL,
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

-- AUTOINCREMENT: group ids and join sequence numbers are never reused.
CREATE TABLE IF NOT EXISTS groups (
    group_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    owner_id INTEGER NOT NULL
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


class _Event:
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


class SQLiteBackend:
    """Owns the connection and its thread; exposes the four ports as attributes."""

    def __init__(
        self,
        path: str | Path,
        *,
        reactor: Any = None,
        now_ms: Callable[[], int] | None = None,
        inbox_retention_ms: int = 7 * DAY_MS,
        history_retention_ms: int = 180 * DAY_MS,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._path = str(path)
        self._reactor = reactor
        self.now_ms = now_ms or wall_ms
        self.inbox_retention_ms = inbox_retention_ms
        self.history_retention_ms = history_retention_ms
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="improto-sqlite")
        self._db: sqlite3.Connection | None = None
        self._running = False  # accepting calls: between start() and close()
        self._started = False
        self._closed: _Event | None = None
        self._shutdown_trigger: Any = None
        self.queue = SQLiteQueue(self)
        self.inbox = SQLiteInbox(self)
        self.history = SQLiteHistory(self)
        self.groups = SQLiteGroups(self)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Deferred[None]:
        if self._started or self._closed is not None:
            raise RuntimeError("SQLiteBackend can be started once, before close()")
        self._started = True
        self._running = True
        self._pool.start()
        # Pool threads are not daemons: make sure reactor shutdown releases them.
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "before", "shutdown", self.close
        )
        d = deferToThreadPool(self._reactor, self._pool, self._open)
        d.addErrback(self._start_failed)
        return d

    def _start_failed(self, failure: Failure) -> Deferred[Failure]:
        # Release the thread, then report the original error.
        return self.close().addCallback(lambda _: failure)

    def close(self) -> Deferred[None]:
        """Stop the consumer (after its in-flight job), close the database, stop the thread."""
        if self._closed is None:
            self._closed = _Event()
            Deferred.fromCoroutine(self._close())
        return self._closed.wait()

    async def _close(self) -> None:
        closed = self._closed
        assert closed is not None
        try:
            if self._started:
                await self.queue.close()
                # Calls already queued on the thread still run before the close below.
                self._running = False
                await deferToThreadPool(self._reactor, self._pool, self._close_db)
        except Exception:
            _log.failure("closing the SQLite database failed")
        finally:
            if self._started:
                self._pool.stop()  # the one worker is idle now, so this join is immediate
                self._remove_trigger()
            closed.set()

    def _remove_trigger(self) -> None:
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None

    def _open(self) -> None:
        # Autocommit mode: transactions are explicit (see _tx). check_same_thread is off
        # because exclusivity comes from the one-worker pool, not from a thread's identity.
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a COMMIT is on disk when it returns
            db.execute("PRAGMA busy_timeout=5000")  # e.g. someone inspecting the file
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version not in (0, SCHEMA_VERSION):
                raise RuntimeError(f"{self._path}: schema version {version} is not supported")
            db.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        except BaseException:
            db.close()
            raise
        self._db = db

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # ------------------------------------------------------------------ plumbing

    def _call(self, fn: Callable[..., _R], *args: Any) -> Deferred[_R]:
        """Run `fn(db, *args)` as one transaction on the database thread."""
        if not self._running:
            return fail(RuntimeError("SQLiteBackend is not running"))
        return deferToThreadPool(self._reactor, self._pool, self._tx, fn, *args)

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

    def _later(self, delay: float, d: Deferred[None]) -> IDelayedCall:
        return self._reactor.callLater(delay, d.callback, None)

    # ------------------------------------------------------------------ retention

    def sweep(self) -> Deferred[dict[str, int]]:
        """Delete what retention expired; returns how many rows of each kind went."""
        now = self.now_ms()
        return self._call(_sweep, now - self.inbox_retention_ms, now - self.history_retention_ms)


# ------------------------------------------------------------------------- queue


class SQLiteQueue:
    """PersistQueue on a jobs table, consumed in order by one in-process loop."""

    def __init__(self, backend: SQLiteBackend) -> None:
        self._b = backend
        self._handler: BatchHandler | None = None
        self._max_batch = 1
        # Group commit: the accepts of one reactor turn share one transaction (one fsync).
        self._accepts: TurnBatcher[tuple[PersistJob, bytes], Any] = TurnBatcher(
            backend._reactor, self._accept_batch, ACCEPT_BATCH, ACCEPT_WINDOW_S
        )
        self._stopping = False
        self._stopped = _Event()
        self._signalled = False  # a job was accepted since the consumer last looked
        self._idle: Deferred[None] | None = None
        self._sleep: tuple[Deferred[None], IDelayedCall] | None = None

    def accept(self, job: PersistJob, client_msg_id: bytes) -> Deferred[Accepted]:
        d = self._accepts.submit((job, client_msg_id))
        d.addCallback(self._accepted)
        return d

    def _accept_batch(self, items: list[tuple[PersistJob, bytes]]) -> Deferred[list[Any]]:
        return self._b._call(_accept_many, items, self._b.now_ms())

    def _accepted(self, outcome: Accepted | Exception) -> Accepted:
        if isinstance(outcome, Exception):
            raise outcome
        if not outcome.duplicate:
            self._signalled = True
            idle, self._idle = self._idle, None
            if idle is not None:
                idle.callback(None)
        return outcome

    def consume(self, handler: BatchHandler, max_batch: int = 1) -> None:
        if self._handler is not None:
            raise RuntimeError("consume() may be called once")
        if self._stopping:
            raise RuntimeError("queue is closed")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._handler = handler
        self._max_batch = max_batch
        Deferred.fromCoroutine(self._run())

    def close(self) -> Deferred[None]:
        """Stop consuming; fires once an in-flight handler call has finished."""
        self._stopping = True
        if self._handler is None:
            self._stopped.set()
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.callback(None)
        if self._sleep is not None:
            d, call = self._sleep
            self._sleep = None
            call.cancel()
            d.callback(None)
        return self._stopped.wait()

    async def _run(self) -> None:
        try:
            while not self._stopping:
                self._signalled = False
                try:
                    batch = await self._b._call(_fetch_jobs, FETCH_BATCH)
                except Exception:
                    _log.failure("reading the persist queue failed; retrying")
                    await self._pause()
                    continue
                if not batch and not self._signalled and not self._stopping:
                    self._idle = Deferred()
                    await self._idle  # woken by accept() or close()
                    await self._pause(LINGER_S)  # more jobs join the first one
                    continue
                for i in range(0, len(batch), self._max_batch):
                    rows = batch[i : i + self._max_batch]
                    while not await self._deliver(rows):
                        if self._stopping:
                            return
                        await self._pause()
                    if self._stopping:
                        return
                if 0 < len(batch) < FETCH_BATCH:  # no backlog: let the next batch fill a bit
                    await self._pause(LINGER_S)
        finally:
            self._stopped.set()

    async def _deliver(self, rows: list[tuple[int, bytes]]) -> bool:
        """Hand consecutive jobs to the handler as one batch; True once it succeeded (the
        jobs are then deleted)."""
        assert self._handler is not None
        first, last = rows[0][0], rows[-1][0]
        try:
            await self._handler([PersistJob.from_bytes(data) for _, data in rows])
        except Exception:
            _log.failure("persisting queued jobs {first}..{last} failed; will retry",
                         first=first, last=last)  # fmt: skip
            return False
        try:
            await self._b._call(_delete_jobs, first, last)
        except Exception:
            # The jobs stay queued and are delivered again: handlers are idempotent.
            _log.failure("removing persisted jobs {first}..{last} failed", first=first, last=last)
        return True

    async def _pause(self, seconds: float = RETRY_DELAY_S) -> None:
        if self._stopping:
            return
        d: Deferred[None] = Deferred()
        self._sleep = (d, self._b._later(seconds, d))
        try:
            await d
        finally:
            self._sleep = None


def _accept_many(
    db: sqlite3.Connection, items: list[tuple[PersistJob, bytes]], now: int
) -> list[Accepted | Exception]:
    """Every accept in one transaction, in order; a job that does not encode gets its error
    back and the others go on (a later duplicate of an earlier one in the batch is seen)."""
    out: list[Accepted | Exception] = []
    for job, client_msg_id in items:
        try:
            out.append(_accept(db, job, client_msg_id, now))
        except sqlite3.Error:
            raise  # the database itself failed: the whole batch fails
        except Exception as e:  # this job (validated before any write) is refused alone
            out.append(e)
    return out


def _accept(db: sqlite3.Connection, job: PersistJob, client_msg_id: bytes, now: int) -> Accepted:
    m = job.message
    row = db.execute(
        "SELECT msg_id, server_time FROM dedup WHERE sender_id = ? AND client_msg_id = ?",
        (_s(m.sender_id), client_msg_id),
    ).fetchone()
    if row is not None:
        return Accepted(_u(row[0]), _u(row[1]), duplicate=True)
    data = job.to_bytes()  # also validates the message before anything is written
    db.execute(
        "INSERT INTO dedup VALUES (?, ?, ?, ?, ?)",
        (_s(m.sender_id), client_msg_id, _s(m.msg_id), _s(m.server_time), now),
    )
    db.execute("INSERT INTO jobs (data) VALUES (?)", (data,))
    return Accepted(m.msg_id, m.server_time, duplicate=False)


def _fetch_jobs(db: sqlite3.Connection, limit: int) -> list[tuple[int, bytes]]:
    return db.execute("SELECT seq, data FROM jobs ORDER BY seq LIMIT ?", (limit,)).fetchall()


def _delete_jobs(db: sqlite3.Connection, first: int, last: int) -> None:
    db.execute("DELETE FROM jobs WHERE seq BETWEEN ? AND ?", (first, last))


# ------------------------------------------------------------------------ messages

_MSG_COLS = (
    "m.msg_id, m.server_time, m.sender_id, m.sender_device, m.conv_kind, m.conv_id,"
    " m.content_type, m.client_msg_id, m.body"
)


def _store_message(db: sqlite3.Connection, m: Message) -> None:
    db.execute(
        "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            _s(m.msg_id),
            _s(m.server_time),
            _s(m.sender_id),
            m.sender_device,
            m.conv_kind,
            _s(m.conv_id),
            m.content_type,
            m.client_msg_id,
            m.body,
        ),
    )


def _message(row: tuple[Any, ...]) -> Message:
    """A Message from the _MSG_COLS columns of a row."""
    mid, st, sender, device, kind, conv, ctype, cmid, body = row
    return Message(_u(mid), _u(st), _u(sender), device, kind, _u(conv), ctype, cmid, body)


def _record(row: tuple[Any, ...]) -> bytes:
    """The MESSAGE record (wire bytes) of the _MSG_COLS columns of a row."""
    mid, st, sender, device, kind, conv, ctype, cmid, body = row
    return pack_record(_u(mid), _u(st), _u(sender), device, kind, _u(conv), ctype, cmid, body)


# --------------------------------------------------------------------------- inbox


class SQLiteInbox:
    def __init__(self, backend: SQLiteBackend) -> None:
        self._b = backend

    def append(self, job: PersistJob) -> Deferred[None]:
        return self._b._call(_inbox_append, job, self._b.now_ms())

    def append_many(self, jobs: Sequence[PersistJob]) -> Deferred[None]:
        return self._b._call(_inbox_append_many, list(jobs), self._b.now_ms())

    def page(self, user_id: int, start: int, limit: int) -> Deferred[InboxPage]:
        cutoff = self._b.now_ms() - self._b.inbox_retention_ms
        return self._b._call(_inbox_page, user_id, start, limit, cutoff)

    def page_records(self, user_id: int, start: int, limit: int) -> Deferred[InboxRecords]:
        """`page` with MESSAGE records (server/records.py): what the pull handler sends."""
        cutoff = self._b.now_ms() - self._b.inbox_retention_ms
        return self._b._call(_inbox_records, user_id, start, limit, cutoff)

    def position(self, user_id: int, device_id: str) -> Deferred[int]:
        return self._b._call(_position, user_id, device_id)

    def advance(self, user_id: int, device_id: str, cursor: int) -> Deferred[int]:
        return self._b._call(_advance, user_id, device_id, cursor)


def _head_floor(db: sqlite3.Connection, user: int) -> tuple[int, int]:
    row = db.execute("SELECT head, floor FROM inbox_head WHERE user_id = ?", (user,)).fetchone()
    return (row[0], row[1]) if row else (0, 0)


def _inbox_append(db: sqlite3.Connection, job: PersistJob, now: int) -> None:
    users = sorted({_s(u) for u in job.inbox_users})
    if not users:
        return
    mid = _s(job.message.msg_id)
    present = {u for (u,) in db.execute("SELECT user_id FROM inbox WHERE msg_id = ?", (mid,))}
    todo = [u for u in users if u not in present]
    if not todo:
        return  # a redelivered job: everything is already there
    _store_message(db, job.message)
    for user in todo:
        (cursor,) = db.execute(
            "INSERT INTO inbox_head (user_id, head) VALUES (?, 1)"
            " ON CONFLICT (user_id) DO UPDATE SET head = head + 1 RETURNING head",
            (user,),
        ).fetchone()
        db.execute("INSERT INTO inbox VALUES (?, ?, ?, ?)", (user, cursor, mid, now))


def _inbox_append_many(db: sqlite3.Connection, jobs: list[PersistJob], now: int) -> None:
    for job in jobs:  # one transaction (one fsync) for the whole batch
        _inbox_append(db, job, now)


def _inbox_rows(
    db: sqlite3.Connection, user_id: int, start: int, limit: int, cutoff: int
) -> tuple[list[tuple[Any, ...]], int, bool, bool]:
    """(cursor, *_MSG_COLS) rows of a page, the start used, has_more, gap."""
    user = _s(user_id)
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
        f"SELECT i.cursor, {_MSG_COLS} FROM inbox i JOIN messages m ON m.msg_id = i.msg_id"
        " WHERE i.user_id = ? AND i.cursor > ? AND +i.stored_ms >= ?"
        " ORDER BY i.cursor LIMIT ?",
        (user, start, cutoff, limit + 1),
    ).fetchall()
    return rows[:limit], start, len(rows) > limit, floor > start


def _inbox_page(
    db: sqlite3.Connection, user_id: int, start: int, limit: int, cutoff: int
) -> InboxPage:
    rows, start, has_more, gap = _inbox_rows(db, user_id, start, limit, cutoff)
    entries = tuple((r[0], _message(r[1:])) for r in rows)
    return InboxPage(entries, start=start, has_more=has_more, gap=gap)


def _inbox_records(
    db: sqlite3.Connection, user_id: int, start: int, limit: int, cutoff: int
) -> InboxRecords:
    rows, start, has_more, gap = _inbox_rows(db, user_id, start, limit, cutoff)
    return InboxRecords(
        tuple(r[0] for r in rows), tuple(_record(r[1:]) for r in rows), start, has_more, gap
    )


def _position(db: sqlite3.Connection, user_id: int, device_id: str) -> int:
    row = db.execute(
        "SELECT position FROM positions WHERE user_id = ? AND device_id = ?",
        (_s(user_id), device_id),
    ).fetchone()
    return row[0] if row else 0


def _advance(db: sqlite3.Connection, user_id: int, device_id: str, cursor: int) -> int:
    user = _s(user_id)
    head, _ = _head_floor(db, user)
    (position,) = db.execute(
        "INSERT INTO positions VALUES (?, ?, ?) ON CONFLICT (user_id, device_id)"
        " DO UPDATE SET position = max(position, excluded.position) RETURNING position",
        (user, device_id, max(0, min(cursor, head))),
    ).fetchone()
    return int(position)


# ------------------------------------------------------------------------- history


class SQLiteHistory:
    def __init__(self, backend: SQLiteBackend) -> None:
        self._b = backend

    def append(self, key: ConvKey, job: PersistJob) -> Deferred[None]:
        return self._b._call(_history_append, str(key), job.message)

    def append_many(self, items: Sequence[tuple[ConvKey, PersistJob]]) -> Deferred[None]:
        return self._b._call(_history_append_many, [(str(k), j.message) for k, j in items])

    def page(self, key: ConvKey, before_id: int, limit: int, min_id: int) -> Deferred[HistorySlice]:
        cutoff = max(0, self._b.now_ms() - self._b.history_retention_ms)
        return self._b._call(_history_page, str(key), before_id, limit, min_id, cutoff)

    def page_records(
        self, key: ConvKey, before_id: int, limit: int, min_id: int
    ) -> Deferred[HistoryRecords]:
        """`page` with MESSAGE records (server/records.py): what the pull handler sends."""
        cutoff = max(0, self._b.now_ms() - self._b.history_retention_ms)
        return self._b._call(_history_records, str(key), before_id, limit, min_id, cutoff)


def _history_append(db: sqlite3.Connection, conv: str, m: Message) -> None:
    _store_message(db, m)
    db.execute(
        "INSERT OR IGNORE INTO history VALUES (?, ?, ?)", (conv, _s(m.msg_id), _s(m.server_time))
    )


def _history_append_many(db: sqlite3.Connection, items: list[tuple[str, Message]]) -> None:
    for conv, m in items:
        _history_append(db, conv, m)


def _history_rows(
    db: sqlite3.Connection, conv: str, before_id: int, limit: int, min_id: int, cutoff: int
) -> tuple[list[tuple[Any, ...]], bool]:
    """_MSG_COLS rows of a page, newest first, and has_more."""
    limit = max(0, limit)
    hi = _s(before_id - 1 if before_id else U64_MAX)  # msg_id < before_id, inclusive form
    rows = db.execute(
        f"SELECT {_MSG_COLS} FROM history h JOIN messages m ON m.msg_id = h.msg_id"
        " WHERE h.conv = ? AND h.msg_id BETWEEN ? AND ? AND +h.server_time >= ?"
        " ORDER BY h.msg_id DESC LIMIT ?",
        (conv, _s(min_id), hi, _s(cutoff), limit + 1),
    ).fetchall()
    return rows[:limit], len(rows) > limit


def _history_page(
    db: sqlite3.Connection, conv: str, before_id: int, limit: int, min_id: int, cutoff: int
) -> HistorySlice:
    rows, has_more = _history_rows(db, conv, before_id, limit, min_id, cutoff)
    return HistorySlice(tuple(_message(r) for r in rows), has_more=has_more)


def _history_records(
    db: sqlite3.Connection, conv: str, before_id: int, limit: int, min_id: int, cutoff: int
) -> HistoryRecords:
    rows, has_more = _history_rows(db, conv, before_id, limit, min_id, cutoff)
    return HistoryRecords(tuple(_record(r) for r in rows), has_more)


# -------------------------------------------------------------------------- groups


def _group_key(group_id: int) -> int | None:
    """The stored group id, or None for a value no group can have."""
    return group_id if 1 <= group_id <= _MAX_SIGNED else None


def _id_list(users: Iterable[int]) -> str:
    """Stored ids as one JSON parameter, for `IN (SELECT value FROM json_each(?))`."""
    return json.dumps(list(users))


class SQLiteGroups:
    """GroupStore. add/remove raise KeyError for a group id that was never created."""

    def __init__(self, backend: SQLiteBackend) -> None:
        self._b = backend

    def create(
        self, owner_id: int, name: str, members: tuple[int, ...], since_id: int
    ) -> Deferred[int]:
        return self._b._call(_group_create, owner_id, name, members, since_id)

    def add(
        self, group_id: int, users: tuple[int, ...], since_id: int
    ) -> Deferred[tuple[int, ...]]:
        return self._b._call(_group_add, group_id, users, since_id)

    def remove(self, group_id: int, users: tuple[int, ...]) -> Deferred[tuple[int, ...]]:
        return self._b._call(_group_remove, group_id, users)

    def info(self, group_id: int) -> Deferred[GroupInfo | None]:
        return self._b._call(_group_info, group_id)

    def since(self, group_id: int, user_id: int) -> Deferred[int | None]:
        return self._b._call(_group_since, group_id, user_id)

    def groups_of(self, user_id: int) -> Deferred[tuple[tuple[int, str], ...]]:
        return self._b._call(_groups_of, user_id)


def _check_user_limits(db: sqlite3.Connection, users: list[int]) -> None:
    row = db.execute(
        "SELECT user_id FROM members WHERE user_id IN (SELECT value FROM json_each(?))"
        " GROUP BY user_id HAVING count(*) >= ? LIMIT 1",
        (_id_list(users), MAX_GROUPS_PER_USER),
    ).fetchone()
    if row is not None:
        raise LimitExceeded(f"user {_u(row[0])} is in {MAX_GROUPS_PER_USER} groups")


def _join(db: sqlite3.Connection, gid: int, users: list[int], since: int) -> None:
    # Inserted in the given order: join_seq then ranks earlier joiners (and, within one
    # request, lower user ids) first, which is the ownership-transfer order.
    db.executemany(
        "INSERT INTO members (group_id, user_id, since_id) VALUES (?, ?, ?)",
        [(gid, u, since) for u in users],
    )


def _group_create(
    db: sqlite3.Connection, owner_id: int, name: str, members: tuple[int, ...], since_id: int
) -> int:
    owner = _s(owner_id)
    users = [owner, *sorted({_s(u) for u in members} - {owner})]
    if len(users) > MAX_GROUP_MEMBERS:
        raise LimitExceeded(f"a group has at most {MAX_GROUP_MEMBERS} members")
    _check_user_limits(db, users)
    gid = db.execute("INSERT INTO groups (name, owner_id) VALUES (?, ?)", (name, owner)).lastrowid
    assert gid is not None
    _join(db, gid, users, _s(since_id))
    return gid


def _require_group(db: sqlite3.Connection, group_id: int) -> tuple[int, int]:
    """(stored group id, stored owner id); KeyError if the group does not exist."""
    gid = _group_key(group_id)
    if gid is not None:
        row = db.execute("SELECT owner_id FROM groups WHERE group_id = ?", (gid,)).fetchone()
        if row is not None:
            return gid, row[0]
    raise KeyError(group_id)


def _current(db: sqlite3.Connection, gid: int, users: list[int]) -> list[int]:
    """Which of `users` are members of the group, ascending."""
    return [
        u
        for (u,) in db.execute(
            "SELECT user_id FROM members WHERE group_id = ?"
            " AND user_id IN (SELECT value FROM json_each(?)) ORDER BY user_id",
            (gid, _id_list(users)),
        )
    ]


def _group_add(
    db: sqlite3.Connection, group_id: int, users: tuple[int, ...], since_id: int
) -> tuple[int, ...]:
    gid, _ = _require_group(db, group_id)
    wanted = sorted({_s(u) for u in users})
    present = set(_current(db, gid, wanted))
    new = [u for u in wanted if u not in present]
    if not new:
        return ()
    (count,) = db.execute("SELECT count(*) FROM members WHERE group_id = ?", (gid,)).fetchone()
    if count + len(new) > MAX_GROUP_MEMBERS:
        raise LimitExceeded(f"a group has at most {MAX_GROUP_MEMBERS} members")
    _check_user_limits(db, new)
    _join(db, gid, new, _s(since_id))
    return tuple(_u(u) for u in new)


def _group_remove(db: sqlite3.Connection, group_id: int, users: tuple[int, ...]) -> tuple[int, ...]:
    gid, owner = _require_group(db, group_id)
    gone = _current(db, gid, sorted({_s(u) for u in users}))
    if not gone:
        return ()
    db.execute(
        "DELETE FROM members WHERE group_id = ? AND user_id IN (SELECT value FROM json_each(?))",
        (gid, _id_list(gone)),
    )
    if owner in gone:
        row = db.execute(
            "SELECT user_id FROM members WHERE group_id = ? ORDER BY join_seq LIMIT 1", (gid,)
        ).fetchone()
        new_owner = row[0] if row else _s(0)
        db.execute("UPDATE groups SET owner_id = ? WHERE group_id = ?", (new_owner, gid))
    return tuple(_u(u) for u in gone)


def _group_info(db: sqlite3.Connection, group_id: int) -> GroupInfo | None:
    gid = _group_key(group_id)
    if gid is None:
        return None
    row = db.execute("SELECT name, owner_id FROM groups WHERE group_id = ?", (gid,)).fetchone()
    if row is None:
        return None
    members = db.execute(
        "SELECT user_id FROM members WHERE group_id = ? ORDER BY user_id", (gid,)
    ).fetchall()
    return GroupInfo(gid, row[0], _u(row[1]), tuple(_u(u) for (u,) in members))


def _group_since(db: sqlite3.Connection, group_id: int, user_id: int) -> int | None:
    gid = _group_key(group_id)
    if gid is None:
        return None
    row = db.execute(
        "SELECT since_id FROM members WHERE group_id = ? AND user_id = ?", (gid, _s(user_id))
    ).fetchone()
    return _u(row[0]) if row else None


def _groups_of(db: sqlite3.Connection, user_id: int) -> tuple[tuple[int, str], ...]:
    rows = db.execute(
        "SELECT g.group_id, g.name FROM members m JOIN groups g ON g.group_id = m.group_id"
        " WHERE m.user_id = ? ORDER BY g.group_id",
        (_s(user_id),),
    ).fetchall()
    return tuple((gid, name) for gid, name in rows)


# ------------------------------------------------------------------------ retention


def _sweep(db: sqlite3.Connection, inbox_cutoff: int, history_cutoff: int) -> dict[str, int]:
    """Entries stored before `inbox_cutoff`, and history before `history_cutoff` (ms)."""
    # Per user through the (user_id, stored_ms) index rather than a full scan of the inbox.
    removed = db.execute(
        "DELETE FROM inbox WHERE user_id IN (SELECT user_id FROM inbox_head)"
        " AND stored_ms < ? RETURNING user_id, cursor, msg_id",
        (inbox_cutoff,),
    ).fetchall()
    floors: dict[int, int] = {}
    for user, cursor, _ in removed:
        floors[user] = max(cursor, floors.get(user, 0))
    db.executemany(
        "UPDATE inbox_head SET floor = max(floor, ?) WHERE user_id = ?",
        [(cursor, user) for user, cursor in floors.items()],
    )
    expired = db.execute(
        "DELETE FROM history WHERE server_time < ? RETURNING msg_id",
        (_s(max(0, history_cutoff)),),
    ).fetchall()
    dedup = db.execute("DELETE FROM dedup WHERE stored_ms < ?", (inbox_cutoff,)).rowcount
    # A message row goes once nothing refers to it any more.
    candidates = {r[2] for r in removed} | {r[0] for r in expired}
    messages = db.execute(
        "DELETE FROM messages WHERE msg_id IN (SELECT value FROM json_each(?))"
        " AND NOT EXISTS (SELECT 1 FROM inbox i WHERE i.msg_id = messages.msg_id)"
        " AND NOT EXISTS (SELECT 1 FROM history h WHERE h.msg_id = messages.msg_id)",
        (_id_list(candidates),),
    ).rowcount
    return {"inbox": len(removed), "history": len(expired), "dedup": dedup, "messages": messages}
