"""SQLiteTimeline on a real SQLite file, where it goes beyond the contract: what the sweep
removes and reports, how rank counts the seqs it removed, and that append refuses a message
without a timeline. The port's behaviour on every backend is in
tests/contract/test_timeline_contract.py."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto_server.embedded.backend import SQLiteBackend
from improto_server.model import PersistJob, TimelineRecords
from tests.support.clock import DAY_MS, HISTORY_RETENTION_MS, FakeClock

GID = 9


def group_job(msg_id: int, clock: FakeClock, kind: int = ConvKind.GROUP) -> PersistJob:
    m = Message(
        msg_id, clock.now, 1, "phone", kind, GID, ContentType.TEXT,
        msg_id.to_bytes(16, "big"), b"hi",
    )  # fmt: skip
    return PersistJob(m, ())


@pytest_twisted.async_yield_fixture()
async def store(tmp_path: Path) -> AsyncIterator[tuple[SQLiteBackend, FakeClock]]:
    clock = FakeClock()
    backend = SQLiteBackend(
        tmp_path / "timeline.sqlite3", now_ms=clock, history_retention_ms=HISTORY_RETENTION_MS
    )
    await backend.start()
    yield backend, clock
    await backend.close()


@pytest_twisted.ensureDeferred
async def test_the_sweep_removes_expired_rows_and_keeps_the_heads(store):
    backend, clock = store
    tl = backend.timeline
    await tl.append([group_job(m, clock) for m in (10, 20, 30)])
    clock.advance(DAY_MS)
    await tl.append([group_job(m, clock) for m in (40, 50)])
    clock.advance(HISTORY_RETENTION_MS - DAY_MS + 1)
    assert (await backend.sweep())["timeline"] == 3
    assert (await backend.sweep())["timeline"] == 0
    with sqlite3.connect(backend.db.path) as db:
        assert db.execute("SELECT seq FROM timeline ORDER BY seq").fetchall() == [(4,), (5,)]
        assert db.execute("SELECT done FROM timeline_heads").fetchall() == [(5,)]
    # The swept seqs count as read for any mark: unread counts only what can still be read.
    assert [await tl.rank(GID, m) for m in (0, 10, 39, 40, 50)] == [3, 3, 3, 4, 5]
    # The messages table is the history's and the inboxes': the timeline keeps no row there.
    with sqlite3.connect(backend.db.path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)


@pytest_twisted.ensureDeferred
async def test_a_message_without_a_timeline_is_refused_whole(store):
    backend, clock = store
    mixed = [group_job(10, clock), group_job(11, clock, kind=ConvKind.USER)]
    with pytest.raises(ValueError, match="not a group message"):
        await backend.timeline.append(mixed)
    assert await backend.timeline.after(GID, 0, 10, 1 << 20) == TimelineRecords(1, (), False, 0)
