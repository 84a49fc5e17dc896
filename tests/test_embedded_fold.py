"""SQLiteConversations.fold on real SQLite files: the rows it makes equal record's, the folded
positions it stores (conv_users.folded_to), and the writes around it that must keep them.
The port's behaviour on every backend is in tests/contract/test_conversations_contract.py."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto_server.config import InboxCaps
from improto_server.embedded.backend import SQLiteBackend
from improto_server.model import FOLD_ENTRIES, PersistJob, StateJob
from tests.support.clock import DAY_MS, FakeClock

ALICE, BOB, CAROL, DAVE = 1, 2, 3, 4
GID = 9
BIAS = 2**63


class Sent:
    """PersistJobs with increasing msg_ids at the clock's time."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.next_id = 1000

    def job(self, sender: int, kind: int, conv: int, users: tuple[int, ...]) -> PersistJob:
        self.next_id += 1
        mid = self.next_id
        m = Message(
            mid, self.clock.now, sender, "phone", kind, conv, ContentType.TEXT,
            mid.to_bytes(16, "big"), b"hi",
        )  # fmt: skip
        return PersistJob(m, users)

    def direct(self, sender: int, peer: int) -> PersistJob:
        return self.job(sender, ConvKind.USER, peer, tuple(dict.fromkeys((sender, peer))))

    def group(self, sender: int, members: tuple[int, ...]) -> PersistJob:
        return self.job(sender, ConvKind.GROUP, GID, members)


async def _open(path: Path, clock: FakeClock, **kw: Any) -> SQLiteBackend:
    backend = SQLiteBackend(path, now_ms=clock, **kw)
    await backend.start()
    return backend


@pytest_twisted.async_yield_fixture()
async def store(tmp_path: Path) -> AsyncIterator[tuple[SQLiteBackend, FakeClock]]:
    clock = FakeClock()
    backend = await _open(tmp_path / "fold.sqlite3", clock)
    yield backend, clock
    await backend.close()


def _table(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


def _folded(backend: SQLiteBackend) -> dict[int, int]:
    rows = _table(Path(backend.db.path), "SELECT user_id, folded_to FROM conv_users")
    return {user + BIAS: folded for user, folded in rows}


# Every column but version and changed_ms: folds write a row once per call, record once per
# batch, so only the versions (and write times) may differ.
_ROWS = (
    "SELECT user_id, conv_kind, conv_id, hidden, hide_id, read_id, peer_read_id, unread,"
    " unread_ids, last_id FROM conv_rows ORDER BY 1, 2, 3"
)


@pytest_twisted.ensureDeferred
async def test_folds_make_the_rows_record_makes(tmp_path):
    """The same traffic, recorded per batch on one database and folded from the inboxes at
    random moments (random users, repeated ones) on another, gives the same rows and totals:
    1:1 both ways, notes to self, groups, redeliveries."""
    rnd = random.Random(13)
    clock = FakeClock()
    recorded = await _open(tmp_path / "recorded.sqlite3", clock)
    folded = await _open(tmp_path / "folded.sqlite3", clock)
    sent = Sent(clock)
    users = (ALICE, BOB, CAROL, DAVE)
    members = (ALICE, BOB, CAROL)
    history: list[PersistJob] = []
    try:
        for _ in range(40):
            batch = []
            for _ in range(rnd.randint(1, 12)):
                pick = rnd.random()
                if pick < 0.15 and history:
                    batch.append(rnd.choice(history))  # a redelivered job
                elif pick < 0.4:
                    batch.append(sent.group(rnd.choice(members), members))
                else:
                    batch.append(sent.direct(rnd.choice(users), rnd.choice(users)))
            history += batch
            await recorded.conversations.record(batch)
            await folded.inbox.append_many(batch)
            if rnd.random() < 0.5:
                chosen = rnd.choices(users, k=rnd.randint(1, 5))
                assert await folded.conversations.fold(chosen) == []
        last = [sent.group(ALICE, members), sent.direct(DAVE, ALICE)]  # for everyone
        await recorded.conversations.record(last)
        await folded.inbox.append_many(last)
        assert sorted(await folded.conversations.behind()) == list(users)
        assert await folded.conversations.fold(list(users)) == []
        assert await folded.conversations.behind() == []

        want = _table(Path(recorded.db.path), _ROWS)
        assert len(want) > 8  # every 1:1 pair, self notes and the group
        assert _table(Path(folded.db.path), _ROWS) == want
        totals = "SELECT user_id, total_unread FROM conv_users ORDER BY 1"
        assert _table(Path(folded.db.path), totals) == _table(Path(recorded.db.path), totals)
        # The versions count visible changes: a fold changes each row at most once per call.
        versions = "SELECT user_id, version FROM conv_users ORDER BY 1"
        for (user, fewer), (_, more) in zip(
            _table(Path(folded.db.path), versions),
            _table(Path(recorded.db.path), versions),
            strict=True,
        ):
            assert 0 < fewer <= more, user
    finally:
        await recorded.close()
        await folded.close()


@pytest_twisted.ensureDeferred
async def test_the_folded_position_is_the_last_entry_applied_then_the_head(store):
    backend, clock = store
    sent = Sent(clock)
    jobs = [sent.job(ALICE, ConvKind.USER, BOB, (BOB,)) for _ in range(FOLD_ENTRIES + 3)]
    await backend.inbox.append_many(jobs)
    convs = backend.conversations
    assert _folded(backend) == {}
    assert await convs.behind() == [BOB]
    assert await convs.fold([BOB, BOB]) == [BOB]  # a repeated user folds once
    assert _folded(backend) == {BOB: FOLD_ENTRIES}
    assert await convs.behind() == [BOB]
    assert await convs.fold([BOB]) == []
    assert _folded(backend) == {BOB: FOLD_ENTRIES + 3}
    (row,) = (await convs.changes(BOB, 0, 10, 1 << 20)).convs
    assert (row.unread, row.last_id) == (FOLD_ENTRIES + 3, jobs[-1].message.msg_id)
    assert row.version == 2  # one version per fold call, not per message


@pytest_twisted.ensureDeferred
async def test_writes_after_a_fold_keep_the_position(store):
    """record and apply upsert conv_users (version, total): the folded position stays."""
    backend, clock = store
    sent = Sent(clock)
    convs = backend.conversations
    first = sent.direct(ALICE, BOB)
    await backend.inbox.append_many([first])
    assert await convs.fold([ALICE, BOB]) == []
    assert _folded(backend) == {ALICE: 1, BOB: 1}
    await convs.record([sent.direct(CAROL, BOB)])  # recorded, not in the inbox
    await convs.apply([StateJob(StateJob.MARK, BOB, ConvKind.USER, ALICE, first.message.msg_id)])
    assert _folded(backend) == {ALICE: 1, BOB: 1, CAROL: 0}
    assert await convs.behind() == []
    assert await convs.fold([ALICE, BOB]) == []
    rows = (await convs.by_activity(BOB, 0, 10, 1 << 20)).convs
    assert [(r.conv_id, r.unread) for r in rows] == [(CAROL, 1), (ALICE, 0)]


@pytest_twisted.ensureDeferred
async def test_a_fold_that_changes_no_row_still_moves_the_position(store):
    """Entries recorded already (as a version-3 persister did) change nothing when folded:
    no new version, but the users are folded and no longer behind."""
    backend, clock = store
    sent = Sent(clock)
    convs = backend.conversations
    jobs = [sent.direct(ALICE, BOB), sent.group(CAROL, (ALICE, BOB, CAROL))]
    await convs.record(jobs)
    before = _table(Path(backend.db.path), "SELECT * FROM conv_rows ORDER BY 1, 2, 3")
    await backend.inbox.append_many(jobs)
    assert sorted(await convs.behind()) == [ALICE, BOB, CAROL]
    assert await convs.fold([ALICE, BOB, CAROL, DAVE]) == []
    assert _table(Path(backend.db.path), "SELECT * FROM conv_rows ORDER BY 1, 2, 3") == before
    assert _folded(backend) == {ALICE: 2, BOB: 2, CAROL: 1}  # DAVE: no inbox, no row
    assert await convs.behind() == []


@pytest_twisted.ensureDeferred
async def test_entries_the_caps_or_retention_removed_are_skipped(tmp_path):
    """The caps remove the oldest entries; retention, after the clock stepped back, one in
    the middle: the fold applies the rest and reaches the head."""
    clock = FakeClock()
    backend = await _open(tmp_path / "caps.sqlite3", clock, inbox_caps=InboxCaps(max_entries=3))
    sent = Sent(clock)
    convs = backend.conversations
    try:
        capped = [sent.job(ALICE, ConvKind.USER, BOB, (BOB,)) for _ in range(5)]
        await backend.inbox.append_many(capped)  # cursors 1, 2 go: the cap is 3
        assert await convs.fold([BOB]) == []
        (row,) = (await convs.changes(BOB, 0, 10, 1 << 20)).convs
        assert (row.unread, row.last_id) == (3, capped[-1].message.msg_id)
        assert _folded(backend) == {BOB: 5}

        kept = sent.job(CAROL, ConvKind.USER, DAVE, (DAVE,))
        await backend.inbox.append_many([kept])  # cursor 1
        clock.advance(-2 * DAY_MS)
        stale = sent.job(CAROL, ConvKind.USER, DAVE, (DAVE,))
        await backend.inbox.append_many([stale])  # cursor 2, stored two days "earlier"
        clock.advance(2 * DAY_MS)
        late = sent.job(ALICE, ConvKind.USER, DAVE, (DAVE,))
        await backend.inbox.append_many([late])  # cursor 3
        clock.advance(backend.inbox_retention_ms - DAY_MS)
        assert (await backend.sweep())["inbox"] == 1  # the stale entry, not the others
        assert await convs.fold([DAVE]) == []
        rows = {r.conv_id: r for r in (await convs.changes(DAVE, 0, 10, 1 << 20)).convs}
        assert {c: (r.unread, r.last_id) for c, r in rows.items()} == {
            CAROL: (1, kept.message.msg_id),
            ALICE: (1, late.message.msg_id),
        }
        assert _folded(backend)[DAVE] == 3
    finally:
        await backend.close()
