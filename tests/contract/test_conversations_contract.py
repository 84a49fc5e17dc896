"""ConversationStore contract: rows per (user, conversation), read positions, unread counts,
hiding, versions, the two list orders and their budgets, retention, restarts, u64 ids."""

from __future__ import annotations

import pytest_twisted

from twisted.internet.defer import gatherResults

from improto.enums import ConvKind
from improto.limits import U64_MAX
from improto.records import conv_size
from improto_server.model import (
    FOLD_ENTRIES,
    MAX_UNREAD_TRACKED,
    ConvRows,
    ConvState,
    PersistJob,
    StateJob,
)
from tests.contract.pages import ANY_SIZE

PORT = "conversations"

ALICE, BOB, CAROL, DAVE = 1, 2, 3, 4
GROUP = 77
USER, GRP = ConvKind.USER, ConvKind.GROUP
HIGH = 2**63  # ids at and above 2**63 must order and compare like any other
DAY_MS = 86_400_000


def store(backend):
    return backend.current.conversations


async def rows_of(convs, user: int) -> dict[tuple[int, int], ConvState]:
    """Every row of the user (hidden too), by (conv_kind, conv_id), through `changes`."""
    found: dict[tuple[int, int], ConvState] = {}
    since = 0
    while True:
        page = await convs.changes(user, since, 100, ANY_SIZE)
        found.update({(c.conv_kind, c.conv_id): c for c in page.convs})
        if not page.has_more:
            return found
        since = page.version


async def row(convs, user: int, kind: int, conv: int) -> ConvState:
    return (await rows_of(convs, user))[(kind, conv)]


async def newest(convs, user: int) -> int:
    return (await convs.by_activity(user, 0, 100, ANY_SIZE)).version


async def listing(convs, user: int, limit: int = 100) -> list[ConvState]:
    """The whole list by activity, paged as a client pages it (before_id = the last row's
    last_id)."""
    out: list[ConvState] = []
    before = 0
    while True:
        page = await convs.by_activity(user, before, limit, ANY_SIZE)
        out += page.convs
        if not page.has_more:
            return out
        before = page.convs[-1].last_id


def mark(user: int, kind: int, conv: int, msg_id: int) -> StateJob:
    return StateJob(StateJob.MARK, user, kind, conv, msg_id)


def hide(user: int, kind: int, conv: int, msg_id: int) -> StateJob:
    return StateJob(StateJob.HIDE, user, kind, conv, msg_id)


def direct(jobs, sender: int, peer: int, **kw) -> PersistJob:
    """A 1:1 message from `sender` to `peer`, for both inboxes (one if they are the same)."""
    return jobs.job(*dict.fromkeys((sender, peer)), sender=sender, conv_id=peer, **kw)


def group(jobs, sender: int, members: tuple[int, ...], gid: int = GROUP, **kw) -> PersistJob:
    return jobs.job(*members, sender=sender, conv_kind=GRP, conv_id=gid, **kw)


@pytest_twisted.ensureDeferred
async def test_a_user_without_rows(backend):
    convs = store(backend)
    empty = ConvRows(0, False, 0, ())
    assert await convs.by_activity(ALICE, 0, 50, ANY_SIZE) == empty
    assert await convs.changes(ALICE, 0, 50, ANY_SIZE) == empty
    assert await convs.changes(ALICE, 12345, 50, ANY_SIZE) == empty
    assert await convs.read_positions(ALICE, [(USER, BOB), (GRP, GROUP)]) == {}
    await convs.record([])  # empty batches are no-ops
    await convs.apply([])
    assert await convs.changes(ALICE, 0, 50, ANY_SIZE) == empty


@pytest_twisted.ensureDeferred
async def test_a_direct_message_makes_a_row_on_both_sides(backend, jobs):
    convs = store(backend)
    first = direct(jobs, ALICE, BOB)
    await convs.record([first])
    m1 = first.message.msg_id
    # The sender has read what it sent; the receiver has it unread. Each sees the other,
    # and the receiver knows the sender has read up to its own message.
    assert await row(convs, ALICE, USER, BOB) == ConvState(
        USER, BOB, 1, False, m1, 0, 0, m1, first.record
    )
    assert await row(convs, BOB, USER, ALICE) == ConvState(
        USER, ALICE, 1, False, 0, m1, 1, m1, first.record
    )
    assert (await convs.by_activity(BOB, 0, 50, ANY_SIZE)).total_unread == 1
    assert (await convs.by_activity(ALICE, 0, 50, ANY_SIZE)).total_unread == 0

    # Bob answers: that reads alice's message (his unread is recounted), alice has one.
    reply = direct(jobs, BOB, ALICE)
    await convs.record([reply])
    m2 = reply.message.msg_id
    bob = await row(convs, BOB, USER, ALICE)
    assert (bob.read_id, bob.peer_read_id, bob.unread, bob.last_id, bob.last, bob.version) == (
        m2, m1, 0, m2, reply.record, 2,
    )  # fmt: skip
    alice = await row(convs, ALICE, USER, BOB)
    assert (
        alice.read_id, alice.peer_read_id, alice.unread, alice.last_id, alice.last,
        alice.version,
    ) == (m1, m2, 1, m2, reply.record, 2)  # fmt: skip
    assert await convs.read_positions(ALICE, [(USER, BOB)]) == {(USER, BOB): m1}
    assert await convs.read_positions(BOB, [(USER, ALICE)]) == {(USER, ALICE): m2}


@pytest_twisted.ensureDeferred
async def test_group_rows_for_every_member(backend, jobs):
    convs = store(backend)
    members = (ALICE, BOB, CAROL)
    first = group(jobs, ALICE, members)
    await convs.record([first])
    for user, read, unread in [(ALICE, first.message.msg_id, 0), (BOB, 0, 1), (CAROL, 0, 1)]:
        state = await row(convs, user, GRP, GROUP)
        assert (state.read_id, state.unread, state.peer_read_id) == (read, unread, 0), user
        assert state.last == first.record and state.last_id == first.message.msg_id
    second = group(jobs, CAROL, members)
    await convs.record([second])
    unread = {u: (await row(convs, u, GRP, GROUP)).unread for u in members}
    assert unread == {ALICE: 1, BOB: 2, CAROL: 0}
    assert (await row(convs, CAROL, GRP, GROUP)).read_id == second.message.msg_id
    assert set(await rows_of(convs, BOB)) == {(GRP, GROUP)}  # no 1:1 rows from a group


@pytest_twisted.ensureDeferred
async def test_notes_to_self(backend, jobs):
    convs = store(backend)
    note = direct(jobs, ALICE, ALICE)
    await convs.record([note, note])
    m = note.message.msg_id
    assert await rows_of(convs, ALICE) == {
        (USER, ALICE): ConvState(USER, ALICE, 1, False, m, 0, 0, m, note.record)
    }
    # Marking one's own notes moves the read position only (no peer to tell).
    later = m + 10
    await convs.apply([mark(ALICE, USER, ALICE, later)])
    state = await row(convs, ALICE, USER, ALICE)
    assert (state.read_id, state.peer_read_id, state.unread) == (later, 0, 0)


@pytest_twisted.ensureDeferred
async def test_last_is_the_highest_msg_id_whatever_the_order(backend, jobs):
    convs = store(backend)
    newer = direct(jobs, ALICE, BOB, msg_id=5000, body=b"newer")
    older = direct(jobs, ALICE, BOB, msg_id=4000, body=b"older")
    await convs.record([newer])
    await convs.record([older])  # recorded late (another queue, a retry)
    for user in (ALICE, BOB):
        peer = BOB if user == ALICE else ALICE
        state = await row(convs, user, USER, peer)
        assert (state.last_id, state.last) == (5000, newer.record), user
    assert (await row(convs, BOB, USER, ALICE)).unread == 2  # both counted
    assert (await row(convs, ALICE, USER, BOB)).read_id == 5000  # max, never back
    assert (await row(convs, BOB, USER, ALICE)).peer_read_id == 5000  # max, never back


@pytest_twisted.ensureDeferred
async def test_recording_is_idempotent(backend, jobs):
    convs = store(backend)
    j, other = direct(jobs, ALICE, BOB), direct(jobs, ALICE, BOB)
    await convs.record([j, j, other, j])  # duplicates in one batch
    before = {u: await rows_of(convs, u) for u in (ALICE, BOB)}
    assert before[BOB][(USER, ALICE)].unread == 2
    await convs.record([j])  # redelivered alone
    await convs.record([other, j, other])  # and as a whole batch again
    assert {u: await rows_of(convs, u) for u in (ALICE, BOB)} == before  # no new version
    # A redelivery reaching more users adds only the missing rows.
    wider = PersistJob(j.message, (ALICE, BOB, CAROL))
    await convs.record([wider])
    assert {u: await rows_of(convs, u) for u in (ALICE, BOB)} == before
    assert (await row(convs, CAROL, USER, ALICE)).unread == 1


@pytest_twisted.ensureDeferred
async def test_unread_is_exact_under_partial_marks(backend, jobs):
    convs = store(backend)
    sent = [direct(jobs, ALICE, BOB, msg_id=1000 + 10 * i) for i in range(5)]
    await convs.record(sent)
    ids = [j.message.msg_id for j in sent]
    assert (await row(convs, BOB, USER, ALICE)).unread == 5

    await convs.apply([mark(BOB, USER, ALICE, ids[2])])
    state = await row(convs, BOB, USER, ALICE)
    assert (state.read_id, state.unread) == (ids[2], 2)
    assert (await convs.by_activity(BOB, 0, 50, ANY_SIZE)).total_unread == 2

    version = await newest(convs, BOB)
    await convs.apply([mark(BOB, USER, ALICE, ids[1])])  # below: positions never go back
    await convs.apply([mark(BOB, USER, ALICE, ids[2])])  # the same again
    assert await row(convs, BOB, USER, ALICE) == state
    assert await newest(convs, BOB) == version  # nothing changed: no version

    # Between two messages, then above the newest message (a position, not a message).
    await convs.apply([mark(BOB, USER, ALICE, ids[3] + 1)])
    assert (await row(convs, BOB, USER, ALICE)).unread == 1
    await convs.apply([mark(BOB, USER, ALICE, ids[4] + 100)])
    state = await row(convs, BOB, USER, ALICE)
    assert (state.read_id, state.unread) == (ids[4] + 100, 0)
    # A message below the read position (recorded late) is not unread.
    late = direct(jobs, ALICE, BOB, msg_id=ids[4] + 50)
    await convs.record([late])
    state = await row(convs, BOB, USER, ALICE)
    assert (state.unread, state.last_id) == (0, late.message.msg_id)
    assert await convs.read_positions(BOB, [(USER, ALICE)]) == {(USER, ALICE): ids[4] + 100}


@pytest_twisted.ensureDeferred
async def test_unread_tracks_the_newest_thousand(backend, jobs):
    convs = store(backend)
    sent = [direct(jobs, ALICE, BOB, body=b"") for _ in range(MAX_UNREAD_TRACKED + 1)]
    await convs.record(sent[:MAX_UNREAD_TRACKED])
    assert (await row(convs, BOB, USER, ALICE)).unread == MAX_UNREAD_TRACKED  # exact
    await convs.record(sent[MAX_UNREAD_TRACKED:])
    assert (await row(convs, BOB, USER, ALICE)).unread >= MAX_UNREAD_TRACKED
    # Marking at the 501st: 500 are left unread, which the store counts exactly again.
    await convs.apply([mark(BOB, USER, ALICE, sent[500].message.msg_id)])
    assert (await row(convs, BOB, USER, ALICE)).unread == 500


@pytest_twisted.ensureDeferred
async def test_a_mark_creates_rows(backend, jobs):
    convs = store(backend)
    talk = direct(jobs, CAROL, BOB)
    await convs.record([talk])
    await convs.apply([mark(CAROL, USER, DAVE, 900), mark(CAROL, GRP, GROUP, 950)])
    rows = await rows_of(convs, CAROL)
    assert rows[(USER, DAVE)] == ConvState(USER, DAVE, rows[(USER, DAVE)].version,
                                           False, 900, 0, 0, 0, None)  # fmt: skip
    assert (rows[(GRP, GROUP)].read_id, rows[(GRP, GROUP)].last) == (950, None)
    # Dave's row of carol exists now and knows carol's position.
    assert await rows_of(convs, DAVE) == {
        (USER, CAROL): ConvState(USER, CAROL, 1, False, 0, 900, 0, 0, None)
    }
    # Rows without a message come after every row with one.
    order = [(c.conv_kind, c.conv_id) for c in await listing(convs, CAROL)]
    assert order[0] == (USER, BOB) and set(order[1:]) == {(USER, DAVE), (GRP, GROUP)}
    assert await convs.read_positions(CAROL, [(USER, DAVE), (GRP, GROUP), (USER, BOB)]) == {
        (USER, DAVE): 900, (GRP, GROUP): 950,
        (USER, BOB): talk.message.msg_id,
    }  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_a_direct_mark_tells_the_peers_row(backend, jobs):
    convs = store(backend)
    sent = [direct(jobs, ALICE, BOB) for _ in range(2)]
    await convs.record(sent)
    m1, m2 = (j.message.msg_id for j in sent)
    assert (await row(convs, ALICE, USER, BOB)).peer_read_id == 0  # bob has sent nothing
    assert (await row(convs, BOB, USER, ALICE)).peer_read_id == m2  # alice read her own
    before = await newest(convs, ALICE)
    await convs.apply([mark(BOB, USER, ALICE, m1)])
    alice = await row(convs, ALICE, USER, BOB)
    assert (alice.peer_read_id, alice.version) == (m1, before + 1)  # a change of alice's row
    assert (alice.read_id, alice.unread) == (m2, 0)  # her own state is untouched
    assert (await row(convs, BOB, USER, ALICE)).unread == 1
    await convs.apply([mark(BOB, USER, ALICE, m2), mark(BOB, USER, ALICE, m1)])
    assert (await row(convs, ALICE, USER, BOB)).peer_read_id == m2  # the max
    assert (await row(convs, BOB, USER, ALICE)).peer_read_id == m2  # bob's marks: not his

    # Group marks move only the reader's row.
    members = (ALICE, BOB, CAROL)
    g = group(jobs, ALICE, members)
    await convs.record([g])
    others = {u: await rows_of(convs, u) for u in (ALICE, CAROL)}
    await convs.apply([mark(BOB, GRP, GROUP, g.message.msg_id)])
    assert {u: await rows_of(convs, u) for u in (ALICE, CAROL)} == others
    assert (await row(convs, BOB, GRP, GROUP)).unread == 0


@pytest_twisted.ensureDeferred
async def test_a_message_from_the_peer_moves_its_read_position(backend, jobs):
    convs = store(backend)

    async def peer_read(user: int, peer: int) -> int:
        return (await row(convs, user, USER, peer)).peer_read_id

    async def snapshot() -> dict[int, tuple[dict[tuple[int, int], ConvState], int]]:
        """Every row of alice and bob, and their newest versions."""
        return {u: (await rows_of(convs, u), await newest(convs, u)) for u in (ALICE, BOB)}

    # Out of order: the max stays. Only the receiver's row moves (the sender's own row
    # tells what the receiver has read).
    newer = direct(jobs, BOB, ALICE, msg_id=5000)
    older = direct(jobs, BOB, ALICE, msg_id=4000)
    await convs.record([newer])
    assert await peer_read(ALICE, BOB) == 5000
    await convs.record([older])
    alice = await row(convs, ALICE, USER, BOB)
    assert (alice.peer_read_id, alice.unread, alice.last_id) == (5000, 2, 5000)
    assert await peer_read(BOB, ALICE) == 0

    # Redelivered, alone and in a batch: nothing changes, no new version.
    before = await snapshot()
    await convs.record([older])
    await convs.record([newer, older, newer])
    assert await snapshot() == before

    # A group message, even a newer one from the same peer, touches no peer_read_id.
    g = group(jobs, BOB, (ALICE, BOB, CAROL), msg_id=6000)
    await convs.record([g])
    for user in (ALICE, BOB, CAROL):
        assert (await row(convs, user, GRP, GROUP)).peer_read_id == 0, user
    assert await row(convs, ALICE, USER, BOB) == before[ALICE][0][(USER, BOB)]
    assert await row(convs, BOB, USER, ALICE) == before[BOB][0][(USER, ALICE)]

    # A mark by the peer and a message from the peer move the same position: max wins.
    await convs.apply([mark(BOB, USER, ALICE, 7000)])
    assert await peer_read(ALICE, BOB) == 7000
    await convs.record([direct(jobs, BOB, ALICE, msg_id=6500)])  # below the mark: stays
    alice = await row(convs, ALICE, USER, BOB)
    assert (alice.peer_read_id, alice.unread, alice.last_id) == (7000, 3, 6500)
    await convs.record([direct(jobs, BOB, ALICE, msg_id=8000)])  # above it: moves
    assert await peer_read(ALICE, BOB) == 8000
    before = await snapshot()
    await convs.apply([mark(BOB, USER, ALICE, 7500), mark(BOB, USER, ALICE, 8000)])
    assert await snapshot() == before  # below or at the message's: nothing, no version

    # A late message that changes nothing else of the row still moves it: a new version.
    await convs.record([direct(jobs, ALICE, BOB, msg_id=9000)])  # alice answers, reads all
    assert await peer_read(BOB, ALICE) == 9000
    version = await newest(convs, ALICE)
    await convs.record([direct(jobs, BOB, ALICE, msg_id=8500)])
    alice = await row(convs, ALICE, USER, BOB)
    assert (alice.read_id, alice.unread, alice.last_id) == (9000, 0, 9000)
    assert (alice.peer_read_id, alice.version) == (8500, version + 1)
    assert await newest(convs, ALICE) == version + 1


@pytest_twisted.ensureDeferred
async def test_hide_until_a_newer_message(backend, jobs):
    convs = store(backend)
    first = direct(jobs, ALICE, BOB, msg_id=1000)
    other = direct(jobs, CAROL, BOB, msg_id=1100)
    await convs.record([first, other])
    assert (await convs.by_activity(BOB, 0, 50, ANY_SIZE)).total_unread == 2

    await convs.apply([hide(BOB, USER, ALICE, 2000)])
    page = await convs.by_activity(BOB, 0, 50, ANY_SIZE)
    assert [(c.conv_kind, c.conv_id) for c in page.convs] == [(USER, CAROL)]
    assert page.total_unread == 1  # hidden rows do not count
    hidden = await row(convs, BOB, USER, ALICE)
    assert hidden.hidden and hidden.unread == 1  # changes show it, hidden: the client drops it
    assert (await row(convs, ALICE, USER, BOB)).hidden is False  # one user's list only

    # A message older than the hide (recorded late) keeps it hidden; it still counts.
    late = direct(jobs, ALICE, BOB, msg_id=1500)
    await convs.record([late])
    state = await row(convs, BOB, USER, ALICE)
    assert state.hidden and state.unread == 2 and state.last_id == 1500
    assert (await convs.by_activity(BOB, 0, 50, ANY_SIZE)).total_unread == 1

    # A newer one shows the row again, with everything unread.
    new = direct(jobs, ALICE, BOB, msg_id=2500)
    await convs.record([new])
    page = await convs.by_activity(BOB, 0, 50, ANY_SIZE)
    assert [(c.conv_kind, c.conv_id) for c in page.convs] == [(USER, ALICE), (USER, CAROL)]
    assert page.convs[0].unread == 3 and page.total_unread == 4 and not page.convs[0].hidden

    # A hide older than the last message changes nothing.
    version = await newest(convs, BOB)
    await convs.apply([hide(BOB, USER, ALICE, 2400)])
    assert not (await row(convs, BOB, USER, ALICE)).hidden
    assert await newest(convs, BOB) == version
    # Hiding twice is hiding once.
    await convs.apply([hide(BOB, USER, CAROL, 3000)])
    after = await rows_of(convs, BOB)
    await convs.apply([hide(BOB, USER, CAROL, 3000)])
    assert await rows_of(convs, BOB) == after and after[(USER, CAROL)].hidden


@pytest_twisted.ensureDeferred
async def test_versions_increase_per_user_on_every_change_only(backend, jobs):
    convs = store(backend)
    seen = {ALICE: 0, BOB: 0}

    async def expect(alice: int, bob: int) -> None:
        """alice's and bob's newest versions moved by this many."""
        seen[ALICE] += alice
        seen[BOB] += bob
        assert (await newest(convs, ALICE), await newest(convs, BOB)) == (seen[ALICE], seen[BOB])

    j = direct(jobs, ALICE, BOB)
    await convs.record([j])
    await expect(1, 1)
    await convs.record([j])
    await expect(0, 0)
    await convs.apply([mark(BOB, USER, ALICE, j.message.msg_id)])  # bob's row, alice's peer
    await expect(1, 1)
    await convs.apply([mark(BOB, USER, ALICE, j.message.msg_id)])
    await expect(0, 0)
    await convs.record([direct(jobs, ALICE, CAROL)])  # alice only (carol has her own)
    await expect(1, 0)
    await convs.apply([hide(BOB, USER, ALICE, j.message.msg_id + 1)])
    await expect(0, 1)
    assert await newest(convs, CAROL) == 1
    # Each row carries the version of its last change, all distinct per user.
    versions = sorted(c.version for c in (await rows_of(convs, ALICE)).values())
    assert versions == sorted(set(versions)) and versions[-1] == seen[ALICE]


@pytest_twisted.ensureDeferred
async def test_by_activity_order_paging_and_before_id(backend, jobs):
    convs = store(backend)
    peers = [BOB, CAROL, DAVE, 5, 6]
    sent = {p: direct(jobs, p, ALICE) for p in peers}  # bob's is the oldest
    await convs.record(list(sent.values()))
    g = group(jobs, BOB, (ALICE, BOB))
    await convs.record([g])
    await convs.record([direct(jobs, ALICE, CAROL)])  # carol's conversation is the newest now
    await convs.apply([hide(ALICE, USER, DAVE, g.message.msg_id)])  # hidden: not listed
    await convs.apply([mark(ALICE, USER, 7, 1)])  # a row without a message: last
    order = [(USER, CAROL), (GRP, GROUP), (USER, 6), (USER, 5), (USER, BOB), (USER, 7)]

    full = await convs.by_activity(ALICE, 0, 50, ANY_SIZE)
    assert [(c.conv_kind, c.conv_id) for c in full.convs] == order and not full.has_more
    lasts = [c.last_id for c in full.convs]
    assert lasts[:-1] == sorted(lasts[:-1], reverse=True) and lasts[-1] == 0
    assert full.version == await newest(convs, ALICE)
    assert full.total_unread == 4  # bob, 5, 6 and the group; carol's answered, dave's hidden

    for limit in (1, 2, 4):
        assert await listing(convs, ALICE, limit) == list(full.convs), limit
    first = await convs.by_activity(ALICE, 0, 2, ANY_SIZE)
    assert first.convs == full.convs[:2] and first.has_more
    page = await convs.by_activity(ALICE, lasts[1], 3, ANY_SIZE)  # last_id < before_id
    assert page.convs == full.convs[2:5] and page.has_more
    tail = await convs.by_activity(ALICE, lasts[4], 3, ANY_SIZE)
    assert tail.convs == full.convs[5:] and not tail.has_more
    assert (await convs.by_activity(ALICE, lasts[1] + 1, 50, ANY_SIZE)).convs == full.convs[1:]
    assert (await convs.by_activity(ALICE, U64_MAX, 50, ANY_SIZE)).convs == full.convs


@pytest_twisted.ensureDeferred
async def test_the_byte_budget_of_both_orders(backend, jobs):
    convs = store(backend)
    sent = [direct(jobs, p, ALICE, body=bytes([p]) * (20_000 + 1000 * p)) for p in (2, 3, 4)]
    await convs.record(sent)
    newest_first = sent[::-1]
    sizes = [conv_size(j.record) for j in newest_first]
    for budget, n in [(sizes[0] + sizes[1], 2), (sizes[0] + sizes[1] - 1, 1), (1, 1)]:
        page = await convs.by_activity(ALICE, 0, 50, budget)
        assert [c.last for c in page.convs] == [j.record for j in newest_first[:n]], budget
        assert page.has_more == (n < 3)
    by_version = [conv_size(j.record) for j in sent]  # recorded in this order
    changes = await convs.changes(ALICE, 0, 50, by_version[0] + by_version[1])
    assert [c.last for c in changes.convs] == [j.record for j in sent[:2]] and changes.has_more
    assert changes.version == changes.convs[-1].version
    # A budget below one record still makes progress, one row a page.
    seen, since = [], 0
    while True:
        page = await convs.changes(ALICE, since, 50, 1)
        assert len(page.convs) == 1
        seen += page.convs
        since = page.version
        if not page.has_more:
            break
    assert [c.last for c in seen] == [j.record for j in sent]
    # Rows without a message are CONV_OVERHEAD bytes.
    await convs.apply([mark(50, USER, p, 1) for p in (10, 11, 12)])
    assert len((await convs.changes(50, 0, 50, 2 * conv_size(None))).convs) == 2


@pytest_twisted.ensureDeferred
async def test_changes_since_a_version(backend, jobs):
    convs = store(backend)
    for peer in (BOB, CAROL, DAVE):
        await convs.record([direct(jobs, peer, ALICE)])
    everything = await convs.changes(ALICE, 0, 50, ANY_SIZE)
    assert [c.conv_id for c in everything.convs] == [BOB, CAROL, DAVE]
    assert [c.version for c in everything.convs] == [1, 2, 3] and everything.version == 3
    assert not everything.has_more and everything.total_unread == 3

    await convs.apply([hide(ALICE, USER, BOB, 10**9)])  # bob's row: version 4, hidden
    since = await convs.changes(ALICE, 3, 50, ANY_SIZE)
    assert [(c.conv_id, c.hidden, c.version) for c in since.convs] == [(BOB, True, 4)]
    assert since.version == 4 and since.total_unread == 2

    paged = await convs.changes(ALICE, 0, 2, ANY_SIZE)  # carol (2), dave (3); bob moved to 4
    assert [c.conv_id for c in paged.convs] == [CAROL, DAVE] and paged.has_more
    assert paged.version == 3
    rest = await convs.changes(ALICE, paged.version, 2, ANY_SIZE)
    assert [c.conv_id for c in rest.convs] == [BOB] and not rest.has_more

    # An empty page gives the newest version, also to a client that claims a higher one.
    for claimed in (4, 5, 10**6, HIGH, U64_MAX):
        assert await convs.changes(ALICE, claimed, 50, ANY_SIZE) == ConvRows(4, False, 2, ())


@pytest_twisted.ensureDeferred
async def test_read_positions(backend, jobs):
    convs = store(backend)
    await convs.record([direct(jobs, BOB, ALICE), group(jobs, BOB, (ALICE, BOB))])
    assert await convs.read_positions(ALICE, [(USER, BOB), (GRP, GROUP)]) == {}  # read_id 0
    await convs.apply([mark(ALICE, GRP, GROUP, 4242)])
    asked = [(GRP, GROUP), (USER, BOB), (USER, CAROL), (GRP, GROUP), (GRP, 99)]
    assert await convs.read_positions(ALICE, asked) == {(GRP, GROUP): 4242}
    assert await convs.read_positions(ALICE, []) == {}
    assert await convs.read_positions(CAROL, asked) == {}


@pytest_twisted.ensureDeferred
async def test_rows_of_given_conversations(backend, jobs):
    """`rows`: the rows asked for, hidden ones too, equal to what `changes` returns for them
    (last record included); absent ones left out; rows past retention (swept) too."""
    convs = store(backend)
    first = direct(jobs, BOB, ALICE)
    await convs.record([first, group(jobs, BOB, (ALICE, BOB))])
    await convs.apply([hide(ALICE, GRP, GROUP, U64_MAX - 1), mark(ALICE, USER, BOB, 1)])
    every = {
        (c.conv_kind, c.conv_id): c for c in (await convs.changes(ALICE, 0, 100, ANY_SIZE)).convs
    }
    asked = [(GRP, GROUP), (USER, BOB), (USER, CAROL), (GRP, GROUP), (GRP, 99)]
    got = await convs.rows(ALICE, asked)
    assert got == {k: every[k] for k in ((GRP, GROUP), (USER, BOB))}
    assert got[(GRP, GROUP)].hidden and got[(USER, BOB)].last == first.record
    assert got[(GRP, GROUP)].hide_id == U64_MAX - 1
    assert await convs.rows(ALICE, []) == {}
    assert await convs.rows(CAROL, asked) == {}
    backend.advance(backend.history_retention_ms + 1)
    await backend.sweep()
    assert await convs.rows(ALICE, asked) == {}


@pytest_twisted.ensureDeferred
async def test_rows_go_a_retention_after_their_last_change(backend, jobs):
    convs = store(backend)
    retention = backend.history_retention_ms
    old = direct(jobs, BOB, ALICE, body=b"old")
    kept = direct(jobs, CAROL, ALICE, body=b"kept by a mark")
    await convs.record([old, kept])
    backend.advance(retention // 2)
    await convs.apply([mark(DAVE, USER, ALICE, 5)])  # alice's (USER, DAVE) row: changed now
    await convs.apply([mark(ALICE, USER, CAROL, 1)])  # carol's row: her peer_read_id moves
    await convs.apply([hide(ALICE, USER, CAROL, 1)])  # a change that changes nothing visible
    assert (await row(convs, CAROL, USER, ALICE)).peer_read_id == 1
    # Alice's row of carol changed too (its read position), so it stays with its last message.
    backend.advance(retention - retention // 2)
    await backend.sweep()
    assert set(await rows_of(convs, ALICE)) == {(USER, BOB), (USER, CAROL), (USER, DAVE)}

    backend.advance(1)  # the first rows' last change is now past the retention
    for phase in ("after sweep", "after restart"):
        if phase == "after sweep":
            await backend.sweep()
        else:
            await backend.restart()
            convs = store(backend)
        rows = await rows_of(convs, ALICE)
        assert set(rows) == {(USER, CAROL), (USER, DAVE)}, phase
        # The kept row still has its last message, though its history is older than that.
        assert rows[(USER, CAROL)].last == kept.record, phase
        page = await convs.by_activity(ALICE, 0, 50, ANY_SIZE)
        assert [c.conv_id for c in page.convs] == [CAROL, DAVE], phase
        assert page.total_unread == 1, phase  # carol's; bob's went with its row
        assert await convs.read_positions(BOB, [(USER, ALICE)]) == {}, phase
        assert await rows_of(convs, BOB) == {}, phase
    # Versions go on above every version given before the rows went.
    before = await newest(convs, BOB)
    assert before >= 1
    await convs.record([direct(jobs, BOB, ALICE)])
    assert (await row(convs, BOB, USER, ALICE)).version == before + 1


@pytest_twisted.ensureDeferred
async def test_a_restart_keeps_every_row(backend, jobs):
    convs = store(backend)
    await convs.record([direct(jobs, ALICE, BOB), group(jobs, CAROL, (ALICE, BOB, CAROL))])
    await convs.apply([mark(BOB, USER, ALICE, 10**7), hide(ALICE, GRP, GROUP, 10**8)])
    state = {u: await rows_of(convs, u) for u in (ALICE, BOB, CAROL)}
    lists = {u: await convs.by_activity(u, 0, 50, ANY_SIZE) for u in (ALICE, BOB, CAROL)}
    await backend.restart()
    convs = store(backend)
    assert {u: await rows_of(convs, u) for u in (ALICE, BOB, CAROL)} == state
    assert {u: await convs.by_activity(u, 0, 50, ANY_SIZE) for u in (ALICE, BOB, CAROL)} == lists
    await convs.record([direct(jobs, BOB, ALICE)])
    assert await newest(convs, BOB) == lists[BOB].version + 1


@pytest_twisted.ensureDeferred
async def test_ids_at_and_above_2_63(backend, jobs):
    convs = store(backend)
    top, high, below = U64_MAX, HIGH, HIGH - 1  # users on both sides of 2**63
    big_group = U64_MAX - 1
    first = direct(jobs, top, high)
    second = direct(jobs, below, high)
    third = group(jobs, top, (top, high, below), gid=big_group)
    await convs.record([first, second, third])
    rows = await rows_of(convs, high)
    assert set(rows) == {(USER, top), (USER, below), (GRP, big_group)}
    assert all(r.unread == 1 for r in rows.values())
    order = [(c.conv_kind, c.conv_id) for c in await listing(convs, high, 1)]
    assert order == [(GRP, big_group), (USER, below), (USER, top)]
    await convs.apply([mark(high, USER, top, first.message.msg_id)])
    assert (await row(convs, top, USER, high)).peer_read_id == first.message.msg_id
    assert await convs.read_positions(high, list(rows)) == {(USER, top): first.message.msg_id}
    assert set(await rows_of(convs, top)) == {(USER, high), (GRP, big_group)}
    assert set(await rows_of(convs, below)) == {(USER, high), (GRP, big_group)}
    assert await newest(convs, top) == 3  # its own counter: no sharing across 2**63
    assert await newest(convs, high) == 4


# ------------------------------------------------------------------- folds (the inbox)


async def behind(convs) -> set[int]:
    return set(await convs.behind())


@pytest_twisted.ensureDeferred
async def test_fold_applies_the_inbox_as_record_does(backend, jobs):
    """The inbox entries above a user's folded position become its rows, as `record` of
    their messages would make them; then the user is no longer behind."""
    convs = store(backend)
    members = (ALICE, BOB, CAROL)
    m1, m2 = direct(jobs, ALICE, BOB), direct(jobs, BOB, ALICE)
    g = group(jobs, CAROL, members)
    await backend.inbox.append_many([m1, m2, g])
    assert await behind(convs) >= set(members)
    assert await rows_of(convs, ALICE) == {}  # nothing folded yet

    assert await convs.fold(list(members)) == []
    mid1, mid2, gid = m1.message.msg_id, m2.message.msg_id, g.message.msg_id
    alice = await rows_of(convs, ALICE)
    a = alice[(USER, BOB)]
    assert (a.read_id, a.peer_read_id, a.unread, a.last_id, a.last) == (
        mid1, mid2, 1, mid2, m2.record,
    )  # fmt: skip
    b = await row(convs, BOB, USER, ALICE)
    assert (b.read_id, b.peer_read_id, b.unread, b.last_id) == (mid2, mid1, 0, mid2)
    for user, read, unread in [(ALICE, 0, 1), (BOB, 0, 1), (CAROL, gid, 0)]:
        state = await row(convs, user, GRP, GROUP)
        assert (state.read_id, state.unread, state.last_id, state.last) == (
            read, unread, gid, g.record,
        ), user  # fmt: skip
    assert (await convs.by_activity(ALICE, 0, 50, ANY_SIZE)).total_unread == 2
    assert [(c.conv_kind, c.conv_id) for c in await listing(convs, ALICE)] == [
        (GRP, GROUP), (USER, BOB),
    ]  # fmt: skip
    assert not await behind(convs) & set(members)
    assert await convs.fold([DAVE]) == []  # a user without an inbox: nothing to do
    assert await rows_of(convs, DAVE) == {}


@pytest_twisted.ensureDeferred
async def test_folds_apply_each_entry_once(backend, jobs):
    """Folding again, or twice at once, changes nothing; a later entry counts once."""
    convs = store(backend)
    sent = [direct(jobs, ALICE, BOB) for _ in range(3)]
    await backend.inbox.append_many(sent)
    first = await gatherResults([convs.fold([BOB]), convs.fold([BOB, ALICE])])
    assert first == [[], []]
    before = await rows_of(convs, BOB)
    assert before[(USER, ALICE)].unread == 3
    assert await convs.fold([BOB, ALICE]) == []
    assert await rows_of(convs, BOB) == before  # no version, no change

    late = direct(jobs, ALICE, BOB)
    await backend.inbox.append_many([late])
    assert BOB in await behind(convs)
    await gatherResults([convs.fold([BOB]) for _ in range(3)])
    bob = await row(convs, BOB, USER, ALICE)
    assert (bob.unread, bob.last_id) == (4, late.message.msg_id)
    assert bob.version == before[(USER, ALICE)].version + 1


@pytest_twisted.ensureDeferred
async def test_fold_and_marks_in_either_order(backend, jobs):
    """A read mark applied before the fold of older entries still reads them: the rows do
    not depend on the order of apply and fold; record and fold of one message agree."""
    convs = store(backend)
    sent = [direct(jobs, ALICE, BOB) for _ in range(3)]
    await backend.inbox.append_many(sent)
    await convs.apply([mark(BOB, USER, ALICE, sent[1].message.msg_id)])
    await convs.record(sent[2:])  # recorded and folded: counted once
    await convs.fold([BOB, ALICE])
    bob = await row(convs, BOB, USER, ALICE)
    assert (bob.read_id, bob.unread, bob.last_id) == (
        sent[1].message.msg_id, 1, sent[2].message.msg_id,
    )  # fmt: skip
    alice = await row(convs, ALICE, USER, BOB)
    assert (alice.peer_read_id, alice.read_id, alice.unread) == (
        sent[1].message.msg_id, sent[2].message.msg_id, 0,
    )  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_a_fold_is_bounded_per_user(backend, jobs):
    """At most FOLD_ENTRIES entries per user per call: the user comes back as still behind
    and the next call finishes."""
    convs = store(backend)
    sent = [jobs.job(BOB, sender=ALICE, conv_id=BOB) for _ in range(FOLD_ENTRIES + 5)]
    await backend.inbox.append_many(sent)
    assert await convs.fold([BOB]) == [BOB]
    part = await row(convs, BOB, USER, ALICE)
    assert (part.unread, part.last_id) == (FOLD_ENTRIES, sent[FOLD_ENTRIES - 1].message.msg_id)
    assert BOB in await behind(convs)
    assert await convs.fold([BOB]) == []
    done = await row(convs, BOB, USER, ALICE)
    assert (done.unread, done.last_id) == (FOLD_ENTRIES + 5, sent[-1].message.msg_id)
    assert BOB not in await behind(convs)


@pytest_twisted.ensureDeferred
async def test_entries_gone_from_the_inbox_are_not_folded(backend, jobs):
    """Entries the inbox no longer holds are skipped; the position still reaches the end."""
    convs = store(backend)
    old = direct(jobs, ALICE, BOB)
    await backend.inbox.append_many([old])
    backend.advance(backend.inbox_retention_ms + DAY_MS)
    await backend.sweep()
    new = direct(jobs, ALICE, BOB)
    await backend.inbox.append_many([new])
    assert await convs.fold([BOB]) == []
    bob = await row(convs, BOB, USER, ALICE)
    assert (bob.unread, bob.last_id) == (1, new.message.msg_id)
    assert BOB not in await behind(convs)


@pytest_twisted.ensureDeferred
async def test_behind_survives_a_restart(backend, jobs):
    """What a crashed persister had not folded yet is named by behind() after a restart."""
    convs = store(backend)
    folded, waiting = direct(jobs, ALICE, BOB), direct(jobs, CAROL, DAVE)
    await backend.inbox.append_many([folded])
    await convs.fold([ALICE, BOB])
    await backend.inbox.append_many([waiting])
    await backend.restart()
    convs = store(backend)
    left = await behind(convs)
    assert {CAROL, DAVE} <= left and not {ALICE, BOB} & left
    assert await convs.fold(sorted(left)) == []
    assert (await row(convs, DAVE, USER, CAROL)).unread == 1
    assert (await row(convs, BOB, USER, ALICE)).unread == 1
    assert not await behind(convs)
