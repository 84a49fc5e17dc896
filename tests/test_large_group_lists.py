"""Large groups in the conversation lists (issue 14 step 5, docs/design/large-groups.md
decision 8): CONV_LIST and CONV_CHANGES merge each large group's timeline head into the
member's stored row at read time (ConversationService with `timelines`), on the real
embedded backend, its persister and its timeline store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from improto.codec import decode_payload
from improto.enums import ConvKind, FrameType
from improto.frames import (
    ConvChanges,
    ConvChangesPage,
    ConvHide,
    ConvList,
    ConvPage,
    ReadMark,
    Send,
)
from improto_server.config import Config
from improto_server.conversation_service import _page
from improto_server.embedded.backend import SQLiteBackend
from improto_server.hub import Hub
from improto_server.ids import IdGenerator
from improto_server.model import ConvRows, StateJob
from improto_server.persister import Persister
from improto_server.rate_limits import RateLimits
from improto_server.service import Caller, ChatService
from tests.contract.backends import FACTORIES
from tests.support.clock import FakeClock
from tests.support.waiting import sleep

ALICE, BOB, CAROL, DAVE, EVE, FRANK = 21, 22, 23, 24, 25, 26
USER, GROUP = int(ConvKind.USER), int(ConvKind.GROUP)
THRESHOLD = 2  # a group of 3 members is large


class FewRows:
    """The backend's conversation store, except that a CONV_LIST read returns at most two
    rows (a store may return fewer than asked: has_more says so): the merge reads on."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.reads = 0

    def by_activity(
        self, user_id: int, before_id: int, limit: int, max_bytes: int
    ) -> Deferred[ConvRows]:
        self.reads += 1
        return self._store.by_activity(user_id, before_id, min(limit, 2), max_bytes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@dataclass
class Harness:
    backend: SQLiteBackend
    service: ChatService
    persister: Persister

    def caller(self, user: int) -> Caller:
        return Caller(user, "phone", None)

    async def until(self, check: Callable[[], bool]) -> None:
        for _ in range(2000):
            if check():
                return
            await sleep(0.005)
        raise AssertionError("the persister did not get there")

    async def send(self, sender: int, to: int, kind: int = USER) -> int:
        n = self.persister.persisted
        cmid = (b"%d-%d" % (sender, n)).ljust(16, b".")
        ack = await self.service.send(self.caller(sender), Send(cmid, kind, to, 1, b"hi"))
        await self.until(lambda: self.persister.persisted > n)
        return ack.msg_id

    async def mark(self, user: int, kind: int, conv: int, msg_id: int) -> None:
        assert self.service.convs is not None
        n = self.persister.applied
        await self.service.convs.read_mark(self.caller(user), ReadMark(kind, conv, msg_id))
        await self.until(lambda: self.persister.applied > n)

    async def hide(self, user: int, kind: int, conv: int) -> None:
        assert self.service.convs is not None
        n = self.persister.applied
        await self.service.convs.conv_hide(self.caller(user), ConvHide(kind, conv))
        await self.until(lambda: self.persister.applied > n)

    async def list_bytes(self, user: int, before: int = 0, limit: int = 0) -> bytes:
        assert self.service.convs is not None
        return await self.service.convs.conv_list(
            self.caller(user), ConvList(before, limit, request_id=3)
        )

    async def conv_list(self, user: int, before: int = 0, limit: int = 0) -> ConvPage:
        page = decode_payload((await self.list_bytes(user, before, limit))[4:])
        assert isinstance(page, ConvPage)
        return page

    async def changes(self, user: int, since: int, limit: int = 0) -> ConvChangesPage:
        assert self.service.convs is not None
        data = await self.service.convs.conv_changes(self.caller(user), ConvChanges(since, limit))
        page = decode_payload(data[4:])
        assert isinstance(page, ConvChangesPage)
        return page

    async def large(self, gid: int) -> bool:
        info = await self.backend.groups.info(gid)
        assert info is not None
        return info.large


@pytest_twisted.async_yield_fixture()
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    made: list[SQLiteBackend] = []
    persisters: list[Persister] = []

    async def build(store: Callable[[Any], Any] | None = None) -> Harness:
        backend = SQLiteBackend(
            tmp_path / f"db{len(made)}.sqlite3", reactor=reactor, large_group_threshold=THRESHOLD
        )
        await backend.start()
        made.append(backend)
        config = replace(Config(), state_op_burst=1000.0)
        service = ChatService(
            IdGenerator(1), backend.queue, backend.inbox, backend.history, backend.groups, Hub(),
            limits=RateLimits(config, Clock()),
            conversations=store(backend.conversations) if store else backend.conversations,
            timeline=backend.timeline,
        )  # fmt: skip
        assert service.convs is not None and service.convs.timelines is not None
        persister = Persister(
            backend.queue, backend.inbox, backend.history, backend.conversations,
            timeline=backend.timeline,
        )  # fmt: skip
        persister.start()
        persisters.append(persister)
        return Harness(backend, service, persister)

    yield build
    for p in persisters:
        p.stop()  # no fold timer left to fire into a closed database
    for b in made:
        await b.close()


def convs_of(page: ConvPage | ConvChangesPage) -> list[tuple[int, int]]:
    return [(c.conv_kind, c.conv_id) for c in page.convs]


def last_id(row: Any) -> int:
    return row.last[0].msg_id if row.last else 0


def row_of(page: ConvPage | ConvChangesPage, kind: int, conv: int) -> Any:
    (row,) = [c for c in page.convs if (c.conv_kind, c.conv_id) == (kind, conv)]
    return row


# ------------------------------------------------------------------------ CONV_LIST


@pytest_twisted.ensureDeferred
async def test_a_large_group_sorts_by_its_head_with_the_timeline_unread(make) -> None:
    h = await make()
    gid = await h.backend.groups.create(CAROL, "big", (BOB, DAVE), 1)
    assert await h.large(gid)
    m1 = await h.send(ALICE, BOB)
    g1 = await h.send(CAROL, gid, GROUP)
    g2 = await h.send(DAVE, gid, GROUP)
    page = await h.conv_list(BOB)
    assert convs_of(page) == [(GROUP, gid), (USER, ALICE)]  # newer than the older 1:1 row
    group = row_of(page, GROUP, gid)
    assert last_id(group) == g2 and group.last[0].sender_id == DAVE
    assert (group.version, group.read_id, group.hidden, group.unread) == (1, 0, 0, 2)  # no row
    assert page.total_unread == 3 and not page.has_more
    # the sender: its own messages read (the persister's marks), a stored row, merged
    carol = await h.conv_list(CAROL)
    row = row_of(carol, GROUP, gid)
    assert (last_id(row), row.read_id, row.unread) == (g2, g1, 1) and row.version > 0
    assert carol.total_unread == 1
    assert m1 < g1


@pytest_twisted.ensureDeferred
async def test_unread_is_the_stored_part_and_the_timeline_part(make) -> None:
    h = await make()
    gid = await h.backend.groups.create(CAROL, "grows", (BOB,), 1)
    assert not await h.large(gid)
    s1 = await h.send(CAROL, gid, GROUP)  # small: in the inboxes, counted in bob's row
    s2 = await h.send(CAROL, gid, GROUP)
    await h.backend.groups.add(gid, (DAVE,), h.service.ids.next()[0])
    assert await h.large(gid)
    t1 = await h.send(CAROL, gid, GROUP)  # large: in the timeline only
    t2 = await h.send(DAVE, gid, GROUP)
    (row,) = (await h.conv_list(BOB)).convs
    assert (last_id(row), row.unread, row.read_id) == (t2, 4, 0)
    version = row.version
    assert version > 0  # the stored row of the small period
    await h.mark(BOB, GROUP, gid, s1)
    page = await h.conv_list(BOB)
    (row,) = page.convs
    assert (last_id(row), row.unread, row.read_id) == (t2, 3, s1) and row.version > version
    assert page.total_unread == 3
    await h.mark(BOB, GROUP, gid, t1)  # past the small period: its rank in the timeline
    (row,) = (await h.conv_list(BOB)).convs
    assert (row.unread, row.read_id) == (1, t1)
    await h.mark(BOB, GROUP, gid, t2)
    page = await h.conv_list(BOB)
    assert page.convs[0].unread == 0 and page.total_unread == 0
    assert s2 < t1


async def _mixed(h: Harness) -> tuple[list[tuple[int, int]], dict[tuple[int, int], int]]:
    """Bob's rows: 1:1 ones, a large group with a stale stored row (small before), one whose
    stored row has no message (bob's own message: a read mark), three without a stored row
    (two of them older than every stored row).
    Returns the merged order expected and each row's unread."""
    g1 = await h.backend.groups.create(CAROL, "was small", (BOB,), 1)
    g2 = await h.backend.groups.create(DAVE, "own", (BOB, CAROL), 1)
    g3 = await h.backend.groups.create(DAVE, "unseen", (BOB, ALICE), 1)
    g4 = await h.backend.groups.create(DAVE, "quiet", (BOB, EVE), 1)
    g5 = await h.backend.groups.create(EVE, "quieter", (BOB, DAVE), 1)
    await h.send(EVE, g5, GROUP)  # z0, z1: older than every other row, no stored rows
    await h.send(DAVE, g4, GROUP)
    await h.send(CAROL, g1, GROUP)  # s1: bob's stored row of g1, unread 1
    await h.send(ALICE, BOB)  # a1
    await h.backend.groups.add(g1, (DAVE,), h.service.ids.next()[0])
    assert all([await h.large(g) for g in (g1, g2, g3, g4, g5)])
    await h.send(DAVE, g2, GROUP)  # x1, read by bob's own b1 below
    await h.send(CAROL, BOB)  # c1
    await h.send(BOB, g2, GROUP)  # b1: bob's row of g2 reads it, no message stored
    await h.send(EVE, BOB)  # e1
    await h.send(CAROL, g1, GROUP)  # t1
    await h.send(DAVE, g3, GROUP)  # y1
    await h.send(DAVE, BOB)  # d1
    order = [(USER, DAVE), (GROUP, g3), (GROUP, g1), (USER, EVE), (GROUP, g2), (USER, CAROL),
             (USER, ALICE), (GROUP, g4), (GROUP, g5)]  # fmt: skip
    unread = {(USER, DAVE): 1, (GROUP, g3): 1, (GROUP, g1): 2, (USER, EVE): 1, (GROUP, g2): 0,
              (USER, CAROL): 1, (USER, ALICE): 1, (GROUP, g4): 1, (GROUP, g5): 1}  # fmt: skip
    return order, unread


async def _paged(h: Harness, limit: int) -> list[tuple[int, int]]:
    """Every row of bob's list, page by page; has_more checked on each page."""
    seen: list[tuple[int, int]] = []
    before = 0
    while True:
        page = await h.conv_list(BOB, before, limit)
        assert 0 < len(page.convs) <= limit
        seen += convs_of(page)
        ids = [last_id(c) for c in page.convs]
        assert ids == sorted(ids, reverse=True) and all(ids)
        assert not before or ids[0] < before
        if not page.has_more:
            return seen
        before = ids[-1]


@pytest_twisted.ensureDeferred
async def test_paging_across_merged_rows_returns_every_row_once(make) -> None:
    for store in (None, FewRows):  # the merge reads the store on when a read is short
        h = await make(store)
        order, unread = await _mixed(h)
        page = await h.conv_list(BOB)
        assert convs_of(page) == order and not page.has_more
        assert {k: c.unread for k, c in zip(order, page.convs, strict=True)} == unread
        assert page.total_unread == sum(unread.values())
        g2 = row_of(page, GROUP, order[4][1])
        assert g2.version > 0 and g2.read_id == last_id(g2)  # bob's own message, read
        assert row_of(page, GROUP, order[1][1]).version == 1  # no stored row
        for limit in range(1, len(order) + 1):
            assert await _paged(h, limit) == order, limit
        reader = h.service.convs.store if h.service.convs else None
        if isinstance(reader, FewRows):
            assert reader.reads > len(order)  # read on, page after page


@pytest_twisted.ensureDeferred
async def test_has_more_at_the_boundary(make) -> None:
    h = await make()
    order, _ = await _mixed(h)
    n = len(order)
    full = await h.conv_list(BOB, limit=n)
    assert len(full.convs) == n and not full.has_more
    short = await h.conv_list(BOB, limit=n - 1)
    assert convs_of(short) == order[:-1] and short.has_more
    # the stored rows' last one (a1) is the boundary; from each row's position on
    ids = [last_id(c) for c in full.convs]
    for i, before in enumerate(ids):
        rest = await h.conv_list(BOB, before, limit=n - i - 1 or 1)
        assert convs_of(rest) == order[i + 1 :] and not rest.has_more
        if i + 2 < n:
            one = await h.conv_list(BOB, before, limit=n - i - 2)
            assert convs_of(one) == order[i + 1 : -1] and one.has_more
    # a large group's head above before_id stays out, its stale stored position too
    g1 = order[2]
    below = await h.conv_list(BOB, ids[2])
    assert g1 not in convs_of(below) and convs_of(below) == order[3:]


@pytest_twisted.ensureDeferred
async def test_a_hidden_large_group_shows_again_with_a_newer_message(make) -> None:
    h = await make()
    gid = await h.backend.groups.create(CAROL, "grows", (BOB,), 1)
    await h.send(CAROL, gid, GROUP)  # small period: bob's stored unread 1
    await h.backend.groups.add(gid, (DAVE,), h.service.ids.next()[0])
    await h.send(DAVE, gid, GROUP)  # timeline: 1 more
    m = await h.send(ALICE, BOB)
    page = await h.conv_list(BOB)
    assert convs_of(page) == [(USER, ALICE), (GROUP, gid)] and page.total_unread == 3
    await h.hide(BOB, GROUP, gid)
    page = await h.conv_list(BOB)
    assert convs_of(page) == [(USER, ALICE)] and page.total_unread == 1
    version = page.list_version
    (hidden,) = (await h.changes(BOB, version - 1)).convs
    assert (hidden.conv_id, hidden.hidden) == (gid, 1)
    assert (await h.changes(BOB, 0)).total_unread == 1
    t = await h.send(CAROL, gid, GROUP)  # newer than the hide: shows the row again
    page = await h.conv_list(BOB)
    assert convs_of(page) == [(GROUP, gid), (USER, ALICE)]
    row = page.convs[0]
    assert (row.hidden, last_id(row), row.unread) == (0, t, 3) and page.total_unread == 4
    assert (await h.changes(BOB, 0)).total_unread == 4
    assert m < t
    # and a group hidden after its newest message stays hidden
    await h.hide(BOB, GROUP, gid)
    page = await h.conv_list(BOB)
    assert convs_of(page) == [(USER, ALICE)] and page.total_unread == 1


@pytest_twisted.ensureDeferred
async def test_a_hidden_group_without_a_stored_message_shows_again(make) -> None:
    h = await make()
    gid = await h.backend.groups.create(CAROL, "big", (BOB, DAVE), 1)
    await h.hide(BOB, GROUP, gid)  # a hidden row, no message, before any
    assert (await h.conv_list(BOB)).convs == ()
    t = await h.send(CAROL, gid, GROUP)
    page = await h.conv_list(BOB)
    (row,) = page.convs
    assert (row.hidden, last_id(row), row.unread, page.total_unread) == (0, t, 1, 1)


# --------------------------------------------------------------------- CONV_CHANGES


@pytest_twisted.ensureDeferred
async def test_changes_carry_merged_rows_and_only_own_state_changes(make) -> None:
    h = await make()
    gid = await h.backend.groups.create(CAROL, "big", (BOB, DAVE), 1)
    await h.send(ALICE, BOB)
    g1 = await h.send(CAROL, gid, GROUP)
    everything = await h.changes(BOB, 0)
    assert convs_of(everything) == [(USER, ALICE)]  # bob has no row of the group: no version
    assert everything.total_unread == 2  # the timeline's unread counts
    version = everything.list_version
    g2 = await h.send(DAVE, gid, GROUP)
    later = await h.changes(BOB, version)
    assert later.convs == () and later.total_unread == 3  # TIMELINE_HEADS tells, not this
    await h.mark(BOB, GROUP, gid, g1)  # own state: the row changes
    changed = await h.changes(BOB, version)
    (row,) = changed.convs
    assert (row.conv_kind, row.conv_id, row.read_id) == (GROUP, gid, g1)
    assert (last_id(row), row.unread, row.hidden) == (g2, 1, 0)  # merged
    assert changed.list_version == row.version and changed.total_unread == 2
    listed = row_of(await h.conv_list(BOB), GROUP, gid)
    assert listed == row


# ---------------------------------------------------------------- without timelines


@pytest_twisted.ensureDeferred
async def test_without_timelines_the_lists_are_the_stored_rows(make) -> None:
    h = await make()
    convs = h.service.convs
    assert convs is not None
    order, _ = await _mixed(h)
    merged = await h.list_bytes(BOB)
    convs.timelines = None
    stored = await h.backend.conversations.by_activity(BOB, 0, 50, 10**6)
    assert await h.list_bytes(BOB) == _page(FrameType.CONV_PAGE, 3, stored, changes=False)
    assert await h.list_bytes(BOB) != merged
    plain = await h.changes(BOB, 0)
    assert plain.total_unread == stored.total_unread and len(plain.convs) == len(stored.convs)
    # a user without large groups: the same bytes either way
    await h.send(EVE, FRANK)
    await h.send(FRANK, DAVE)
    without = [await h.list_bytes(FRANK), await h.list_bytes(FRANK, limit=1)]
    convs.timelines = h.service.timelines
    assert [await h.list_bytes(FRANK), await h.list_bytes(FRANK, limit=1)] == without
    assert order


# ------------------------------------------------------------- the stored hide position


@pytest.mark.parametrize(
    "kind", ["sqlite", pytest.param("redis", marks=pytest.mark.services("redis"))]
)
@pytest_twisted.ensureDeferred
async def test_both_stores_read_the_hide_position(kind: str, tmp_path: Path) -> None:
    """ConvState.hide_id: the newest hide's msg_id (0: none), on both ConversationStores;
    not part of a row's equality (the CONV record does not carry it)."""
    backend = FACTORIES[kind](tmp_path, FakeClock())
    await backend.start()
    try:
        convs = backend.conversations
        await convs.apply([
            StateJob(StateJob.HIDE, BOB, GROUP, 9, 500),
            StateJob(StateJob.HIDE, BOB, GROUP, 9, 400),  # older: the newest stays
            StateJob(StateJob.MARK, BOB, USER, ALICE, 300),
        ])  # fmt: skip
        rows = {(c.conv_kind, c.conv_id): c for c in (await convs.changes(BOB, 0, 10, 10**6)).convs}
        assert rows[(GROUP, 9)].hide_id == 500 and rows[(GROUP, 9)].hidden
        assert rows[(USER, ALICE)].hide_id == 0
        (shown,) = (await convs.by_activity(BOB, 0, 10, 10**6)).convs
        assert shown.hide_id == 0 and replace(shown, hide_id=7) == shown
    finally:
        await backend.close()
        destroy = getattr(backend, "destroy", None)
        if destroy is not None:
            destroy()
