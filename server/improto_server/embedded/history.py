"""Conversation history in the embedded database (the HistoryStore port): one (conv, msg_id)
row per message, referring to the shared `messages` row. Retention counts from server_time."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from twisted.internet.defer import Deferred

from improto.frames import Message
from improto.limits import U64_MAX
from improto.records import fit_sizes
from improto_server.embedded.database import (
    MSG_COLS,
    RetainedStore,
    record_of_row,
    record_size_sql,
    signed,
    store_message,
)
from improto_server.model import ConvKey, HistoryRecords, PersistJob


class SQLiteHistory(RetainedStore):
    """HistoryStore: messages expire `retention_ms` after their server_time."""

    def append(self, key: ConvKey, job: PersistJob) -> Deferred[None]:
        return self._db.call_background(_append, str(key), job.message)

    def append_many(self, items: Sequence[tuple[ConvKey, PersistJob]]) -> Deferred[None]:
        return self._db.call_background(_append_many, [(str(k), j.message) for k, j in items])

    def page(
        self, key: ConvKey, before_id: int, limit: int, min_id: int, max_bytes: int
    ) -> Deferred[HistoryRecords]:
        cutoff = max(0, self._cutoff())
        return self._db.call(_page, str(key), before_id, limit, min_id, max_bytes, cutoff)


def _append(db: sqlite3.Connection, conv: str, m: Message) -> None:
    store_message(db, m)
    db.execute(
        "INSERT OR IGNORE INTO history VALUES (?, ?, ?)",
        (conv, signed(m.msg_id), signed(m.server_time)),
    )


def _append_many(db: sqlite3.Connection, items: list[tuple[str, Message]]) -> None:
    for conv, m in items:
        _append(db, conv, m)


def _page(
    db: sqlite3.Connection,
    conv: str,
    before_id: int,
    limit: int,
    min_id: int,
    max_bytes: int,
    cutoff: int,
) -> HistoryRecords:
    limit = max(0, limit)
    hi = signed(before_id - 1 if before_id else U64_MAX)  # msg_id < before_id, inclusive form
    where = "h.conv = ? AND h.msg_id BETWEEN ? AND ? AND +h.server_time >= ?"
    # Record sizes first (no body is read: see record_size_sql), then the rows that fit.
    sizes = db.execute(
        f"SELECT h.msg_id, {record_size_sql('m')} FROM history h"
        f" JOIN messages m ON m.msg_id = h.msg_id WHERE {where}"
        " ORDER BY h.msg_id DESC LIMIT ?",
        (conv, signed(min_id), hi, signed(cutoff), limit + 1),
    ).fetchall()
    n = fit_sizes((s for _, s in sizes[:limit]), max_bytes)
    rows = []
    if n:
        rows = db.execute(
            f"SELECT {MSG_COLS} FROM history h JOIN messages m ON m.msg_id = h.msg_id"
            f" WHERE {where} ORDER BY h.msg_id DESC",
            (conv, sizes[n - 1][0], hi, signed(cutoff)),
        ).fetchall()
    return HistoryRecords(tuple(record_of_row(r) for r in rows), len(sizes) > n)


def expire_history(db: sqlite3.Connection, cutoff: int) -> list[int]:
    """Remove the history of messages sent before `cutoff` (ms); returns the (stored) msg_id
    of each row removed."""
    expired = db.execute(
        "DELETE FROM history WHERE server_time < ? RETURNING msg_id",
        (signed(max(0, cutoff)),),
    ).fetchall()
    return [msg_id for (msg_id,) in expired]
