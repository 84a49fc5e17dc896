"""Large groups' timelines in the embedded database (the TimelineStore port).

`timeline` holds one row per (group, seq) with the message's stored record (a copy of its
own, as the production timeline's HBase cell is); `timeline_heads` each group's done and the
msg_id of seq done. `append` numbers and writes a batch in one transaction on the persister's
lane (call_background): seqs continue from done, and done moves with the rows it covers, so
two appends of one group never share a seq and no seq at or below done is missing. Reads run
on the clients' lane (call).

Retention counts from server_time, as the history's: reads skip rows past it, the backend's
sweep removes them (expire_timeline). A head is never removed, so a group's seqs never start
again; rank counts the seqs the sweep removed as at or below any msg_id (unread must not
count what can no longer be read), as the production store counts the seqs below its index.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from twisted.internet.defer import Deferred

from improto.enums import ConvKind
from improto.records import fit_sizes, record_of_stored
from improto_server.embedded.database import RetainedStore, id_list, signed, unsigned
from improto_server.model import PersistJob, TimelineHead, TimelineRecords
from improto_server.ports import TIMELINE_JOIN_PROBE

# A timeline row as append writes it, less its seq: group_id, msg_id, server_time (stored
# signed), the MESSAGE record's size, the stored record.
_Row = tuple[int, int, int, int, bytes]


class SQLiteTimeline(RetainedStore):
    """TimelineStore: records expire `retention_ms` after their server_time."""

    def append(self, jobs: Sequence[PersistJob]) -> Deferred[list[int]]:
        return self._db.call_background(_append, list(jobs))

    def after(
        self, group_id: int, after_seq: int, limit: int, max_bytes: int
    ) -> Deferred[TimelineRecords]:
        cutoff = max(0, self._cutoff())
        return self._db.call(_after, group_id, after_seq, limit, max_bytes, cutoff)

    def heads(self, group_ids: Sequence[int]) -> Deferred[dict[int, TimelineHead]]:
        return self._db.call(_heads, list(group_ids), max(0, self._cutoff()))

    def rank(self, group_id: int, msg_id: int) -> Deferred[int]:
        return self._db.call(_rank, group_id, msg_id)

    def join_floor(self, group_id: int, since_id: int) -> Deferred[int | None]:
        return self._db.call(_join_floor, group_id, since_id, TIMELINE_JOIN_PROBE)


def _row_of(job: PersistJob) -> _Row:
    m = job.message
    if m.conv_kind != ConvKind.GROUP:
        raise ValueError(f"message {m.msg_id} is not a group message: it has no timeline")
    return (
        signed(m.conv_id), signed(m.msg_id), signed(m.server_time), len(job.record),
        job.stored_record,
    )  # fmt: skip


def _done(db: sqlite3.Connection, group: int) -> int:
    row = db.execute("SELECT done FROM timeline_heads WHERE group_id = ?", (group,)).fetchone()
    return int(row[0]) if row else 0


def _append(db: sqlite3.Connection, jobs: list[PersistJob]) -> list[int]:
    rows = [_row_of(job) for job in jobs]  # first: a job that has no timeline writes nothing
    by_group: dict[int, list[int]] = {}
    for group, msg_id, *_ in rows:
        by_group.setdefault(group, []).append(msg_id)
    done = {g: _done(db, g) for g in by_group}
    # Redeliveries keep their seq: (group, msg_id) -> seq of those already numbered.
    seqs: dict[tuple[int, int], int] = {}
    for group, msg_ids in by_group.items():
        for msg_id, seq in db.execute(
            "SELECT msg_id, seq FROM timeline"
            " WHERE group_id = ? AND msg_id IN (SELECT value FROM json_each(?))",
            (group, id_list(msg_ids)),
        ):
            seqs[(group, msg_id)] = seq
    out: list[int] = []
    new: list[tuple[int, int, int, int, int, bytes]] = []
    lasts: dict[int, int] = {}  # group -> msg_id of its new done
    for group, msg_id, server_time, size, stored in rows:
        seq = seqs.get((group, msg_id))
        if seq is None:  # new (a repeat later in this batch finds it in seqs)
            seq = seqs[(group, msg_id)] = done[group] = done[group] + 1
            lasts[group] = msg_id
            new.append((group, seq, msg_id, server_time, size, stored))
        out.append(seq)
    db.executemany("INSERT INTO timeline VALUES (?, ?, ?, ?, ?, ?)", new)
    db.executemany(
        "INSERT INTO timeline_heads VALUES (?, ?, ?) ON CONFLICT (group_id)"
        " DO UPDATE SET done = excluded.done, last_msg_id = excluded.last_msg_id",
        [(g, done[g], msg_id) for g, msg_id in lasts.items()],
    )
    return out


def _after(
    db: sqlite3.Connection, group_id: int, after_seq: int, limit: int, max_bytes: int, cutoff: int
) -> TimelineRecords:
    group = signed(group_id)
    done = _done(db, group)
    if after_seq >= done:  # also keeps a u64 after_seq out of SQLite's signed range
        return TimelineRecords(after_seq + 1, (), False, done)
    limit = max(0, limit)
    # Sizes first (no record is read), one more than the limit: has_more.
    sizes = db.execute(
        "SELECT seq, size FROM timeline WHERE group_id = ? AND seq > ? AND seq <= ?"
        " AND server_time >= ? ORDER BY seq LIMIT ?",
        (group, after_seq, done, signed(cutoff), limit + 1),
    ).fetchall()
    if not sizes:
        return TimelineRecords(after_seq + 1, (), False, done)
    first = sizes[0][0]
    # A page is contiguous: it ends before a seq retention removed (server_times need not
    # rise with seq); the next page starts after that hole.
    run = 0
    while run < min(len(sizes), limit) and sizes[run][0] == first + run:
        run += 1
    n = fit_sizes((size for _, size in sizes[:run]), max_bytes)
    stored = db.execute(
        "SELECT record FROM timeline WHERE group_id = ? AND seq BETWEEN ? AND ? ORDER BY seq",
        (group, first, first + n - 1),
    ).fetchall()
    records = tuple(record_of_stored(r) for (r,) in stored)
    return TimelineRecords(first, records, len(sizes) > n, done)


def _heads(db: sqlite3.Connection, group_ids: list[int], cutoff: int) -> dict[int, TimelineHead]:
    groups = id_list(signed(g) for g in group_ids)
    rows = db.execute(
        "SELECT h.group_id, h.done, h.last_msg_id, t.record FROM timeline_heads h"
        " LEFT JOIN timeline t"
        " ON t.group_id = h.group_id AND t.seq = h.done AND t.server_time >= ?"
        " WHERE h.group_id IN (SELECT value FROM json_each(?))",
        (signed(cutoff), groups),
    ).fetchall()
    return {
        unsigned(group): TimelineHead(
            done, unsigned(last_id), None if stored is None else record_of_stored(stored)
        )
        for group, done, last_id, stored in rows
    }


def _rank(db: sqlite3.Connection, group_id: int, msg_id: int) -> int:
    # done less the retained messages above msg_id: exact while nothing was swept (the rows
    # are seqs 1..done), and the swept seqs count as at or below. Counts the unread side of
    # the (group_id, msg_id) index: a read mark is usually near the newest message.
    group = signed(group_id)
    done = _done(db, group)
    if not done:
        return 0
    (above,) = db.execute(
        "SELECT count(*) FROM timeline WHERE group_id = ? AND msg_id > ?", (group, signed(msg_id))
    ).fetchone()
    return done - int(above)


def _join_floor(db: sqlite3.Connection, group_id: int, since_id: int, probe: int) -> int:
    # One transaction: the rank and the probe see the same rows. The probe walks the
    # (group_id, msg_id) index up from since_id: at most `probe` rows.
    if since_id <= 0:
        return 0
    floor = _rank(db, group_id, since_id - 1)
    (low,) = db.execute(
        "SELECT min(seq) FROM (SELECT seq FROM timeline WHERE group_id = ? AND msg_id >= ?"
        " ORDER BY msg_id LIMIT ?)",
        (signed(group_id), signed(since_id), probe),
    ).fetchone()
    return floor if low is None else min(floor, int(low) - 1)


def expire_timeline(db: sqlite3.Connection, cutoff: int) -> int:
    """Remove the timeline rows of messages sent before `cutoff` (ms); returns how many
    went. The heads stay."""
    return db.execute(
        "DELETE FROM timeline WHERE server_time < ?", (signed(max(0, cutoff)),)
    ).rowcount
