"""Large groups end to end (issue 14, PROTOCOL.md section 20): sessions on StringTransports
over a real embedded backend and its persister, the group threshold set low (4) so that a
few users cross it. A large group's messages are pushed to its online members and reach the
others through TIMELINE_HEADS / TIMELINE_PULL, never through their inboxes; a message is in
a member's inbox or in the timeline, never both, never neither, across crossings."""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest_twisted

from twisted.internet import reactor

from improto.enums import ContentType, ConvKind, Feature, FrameType
from improto.errors import ErrorCode
from improto.frames import (
    Error,
    Features,
    FeaturesOk,
    Frame,
    GroupAdd,
    GroupAddOk,
    GroupCreate,
    GroupCreated,
    GroupRemove,
    GroupRemoveOk,
    HistoryPage,
    HistoryPull,
    Message,
    OfflinePage,
    OfflinePull,
    Push,
    ReadMark,
    ReadMarkOk,
    Send,
    SendAck,
    TimelineHeads,
    TimelineHeadsPage,
    TimelinePage,
    TimelinePull,
)
from improto.limits import TIMELINE_HELD_MAX
from improto.vectors import raw_frame
from improto_server.config import Config
from improto_server.embedded.backend import SQLiteBackend
from improto_server.hub import Hub
from improto_server.ids import IdGenerator
from improto_server.model import ConvKey, PersistJob
from improto_server.persister import Persister
from improto_server.rate_limits import RateLimits
from improto_server.service import ChatService
from improto_server.session import SessionFactory
from tests.contract.pages import ANY_SIZE
from tests.support.sessions import Peer, fake_clock
from tests.support.waiting import eventually

SECRET = "large-groups-test-secret-0123456789ab"
THRESHOLD = 4  # large above 4 members, small again at 3 or fewer
OWNER, B, C, D, E, F = 21, 22, 23, 24, 25, 26
LARGE = (Feature.LARGE_GROUPS, Feature.CONVERSATIONS)


@dataclass
class Stack:
    backend: SQLiteBackend
    factory: SessionFactory
    persister: Persister
    hosts: int = 0
    rid: int = 100

    def peer(self, user: int, features: tuple[int, ...] = LARGE, device: str = "phone") -> Peer:
        self.hosts += 1
        p = Peer(self.factory, host=f"192.0.2.{self.hosts}")
        p.login(user, device)
        if features:
            p.send(Features(features, request_id=2))
            (ok,) = p.frames()
            assert isinstance(ok, FeaturesOk) and set(features) <= set(ok.features), ok
        return p

    async def ask(
        self, peer: Peer, make: Callable[[int], Frame | bytes],
        pushes: list[Message] | None = None,
    ) -> Any:  # fmt: skip
        """Send the request (a fresh request id) and return its reply; pushes meanwhile
        go to `pushes`."""
        self.rid += 1
        rid = self.rid
        peer.send(make(rid))
        got: list[Frame] = []

        def replied() -> bool:
            for f in peer.frames():
                if isinstance(f, Push):
                    if pushes is not None:
                        pushes.append(f.message)
                else:
                    got.append(f)
            return any(f.request_id == rid for f in got)

        await eventually(replied)
        (reply,) = [f for f in got if f.request_id == rid]
        return reply

    async def send(self, peer: Peer, group: int, body: bytes) -> int:
        ack = await self.ask(
            peer,
            lambda r: Send(bytes([r % 256]) * 16, ConvKind.GROUP, group, 1, body, request_id=r),
        )
        assert isinstance(ack, SendAck), ack
        return ack.msg_id

    async def settled(self, n: int) -> None:
        await eventually(lambda: self.persister.persisted >= n)

    async def timeline(self, peer: Peer, group: int, after: int = 0, limit: int = 0
                       ) -> list[TimelinePage]:  # fmt: skip
        pages = []
        while True:
            page = await self.ask(
                peer, lambda r, a=after: TimelinePull(group, a, limit, request_id=r)
            )
            assert isinstance(page, TimelinePage), page
            pages.append(page)
            after = page.position
            if not page.has_more:
                return pages

    async def heads(self, peer: Peer) -> dict[int, Any]:
        page = await self.ask(peer, lambda r: TimelineHeads(request_id=r))
        assert isinstance(page, TimelineHeadsPage), page
        return {h.group_id: h for h in page.heads}

    async def inbox_ids(self, user: int) -> list[int]:
        page = await self.backend.inbox.page(user, 0, 1000, ANY_SIZE)
        return [int.from_bytes(r[:8], "big") for r in page.records]

    async def history_ids(self, group: int) -> list[int]:
        page = await self.backend.history.page(ConvKey.group(group), 0, 1000, 0, ANY_SIZE)
        return sorted(int.from_bytes(r[:8], "big") for r in page.records)


@pytest_twisted.async_yield_fixture()
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    backend = SQLiteBackend(
        tmp_path / "db.sqlite3", reactor=reactor, large_group_threshold=THRESHOLD
    )
    await backend.start()
    config = replace(Config(), large_group_threshold=THRESHOLD)
    clock = fake_clock()
    hub = Hub()
    service = ChatService(
        IdGenerator(1), backend.queue, backend.inbox, backend.history, backend.groups, hub,
        limits=RateLimits(config, clock), conversations=backend.conversations,
        timeline=backend.timeline,
    )  # fmt: skip
    persister = Persister(backend.queue, backend.inbox, backend.history, backend.conversations,
                          timeline=backend.timeline)  # fmt: skip
    persister.start()
    yield Stack(backend, SessionFactory(config, service, hub, clock, SECRET), persister)
    persister.stop()
    await backend.close()


async def _group(s: Stack, owner: Peer, members: tuple[int, ...]) -> int:
    created = await s.ask(owner, lambda r: GroupCreate("big", members, request_id=r))
    assert isinstance(created, GroupCreated), created
    return created.group_id


@pytest_twisted.ensureDeferred
async def test_a_large_groups_messages_are_pushed_and_pulled_not_in_the_inboxes(stack):
    s = stack
    owner, v1 = s.peer(OWNER), s.peer(B, features=())
    gid = await _group(s, owner, (B, C, D, E))  # 5 members: large
    events = 1
    m1 = await s.send(owner, gid, b"one")
    m2 = await s.send(owner, gid, b"two")
    await s.settled(events + 2)
    pushed: list[Message] = []
    await s.ask(v1, lambda r: OfflinePull(0, 0, request_id=r), pushed)  # (a round trip)
    assert [m.msg_id for m in pushed if m.content_type != ContentType.GROUP_EVENT] == [m1, m2]

    for user in (OWNER, B, C, D, E):  # the created event (before the group was large) only
        ids = await s.inbox_ids(user)
        assert len(ids) == 1 and m1 not in ids and m2 not in ids
    assert (await s.history_ids(gid))[-2:] == [m1, m2]  # HISTORY_PULL as before

    carol = s.peer(C)
    heads = await s.heads(carol)
    assert list(heads) == [gid]
    h = heads[gid]
    assert (h.done, h.read_seq, h.unread, h.last_msg_id) == (2, 0, 2, m2)
    (page,) = await s.timeline(carol, gid)
    assert [m.msg_id for m in page.messages] == [m1, m2]
    assert (page.position, page.done, page.has_more) == (2, 2, 0)
    assert [m.body for m in page.messages] == [b"one", b"two"]
    again = await s.timeline(carol, gid, after=2)
    assert [(p.position, p.messages) for p in again] == [(2, ())]

    mine = (await s.heads(owner))[gid]  # the sender has read up to its own message
    assert (mine.read_seq, mine.unread) == (2, 0)
    # Marked read on one device: every device's read_seq.
    ok = await s.ask(carol, lambda r: ReadMark(ConvKind.GROUP, gid, m1, request_id=r))
    assert isinstance(ok, ReadMarkOk)
    await eventually(lambda: s.persister.applied >= 1)
    other_device = s.peer(C, device="tablet")
    h = (await s.heads(other_device))[gid]
    assert (h.read_seq, h.unread) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_forward_pages_hold_200_and_chain_by_position(stack):
    s = stack
    owner = s.peer(OWNER)
    gid = await _group(s, owner, (B, C, D, E))
    sent = [await s.send(owner, gid, f"m{i}".encode()) for i in range(230)]
    await s.settled(231)
    reader = s.peer(C)
    pages = await s.timeline(reader, gid)
    assert [len(p.messages) for p in pages] == [200, 30]
    assert [p.position for p in pages] == [200, 230]
    assert [m.msg_id for p in pages for m in p.messages] == sent
    small = await s.timeline(reader, gid, after=225, limit=2)
    assert [[m.msg_id for m in p.messages] for p in small] == [sent[225:227], sent[227:229],
                                                               sent[229:]]  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_pulls_refused_as_history_pulls_are(stack):
    s = stack
    owner, outsider = s.peer(OWNER), s.peer(F)
    gid = await s.ask(owner, lambda r: GroupCreate("big", (B, C, D, E), request_id=r))
    gid = gid.group_id
    err = await s.ask(outsider, lambda r: TimelinePull(gid, 0, 0, request_id=r))
    assert isinstance(err, Error) and err.code == ErrorCode.FORBIDDEN
    err = await s.ask(outsider, lambda r: TimelinePull(gid + 1, 0, 0, request_id=r))
    assert isinstance(err, Error) and err.code == ErrorCode.NOT_FOUND
    v1 = s.peer(B, features=())
    err = await s.ask(v1, lambda r: TimelinePull(gid, 0, 0, request_id=r))
    assert isinstance(err, Error) and err.code == ErrorCode.UNKNOWN_FRAME_TYPE
    assert await s.heads(outsider) == {}


@pytest_twisted.ensureDeferred
async def test_a_late_joiner_reads_from_its_join_and_a_removed_member_cannot(stack):
    s = stack
    owner = s.peer(OWNER)
    gid = await _group(s, owner, (B, C, D, E))
    before = await s.send(owner, gid, b"before F joined")
    added = await s.ask(owner, lambda r: GroupAdd(gid, (F,), request_id=r))
    assert isinstance(added, GroupAddOk) and added.count == 1
    after = await s.send(owner, gid, b"after")
    await s.settled(4)
    late = s.peer(F)
    h = (await s.heads(late))[gid]
    assert (h.done, h.read_seq, h.unread) == (3, 1, 2)  # the join event and `after`
    (page,) = await s.timeline(late, gid)
    assert before not in [m.msg_id for m in page.messages]
    assert [m.msg_id for m in page.messages][-1] == after and page.position == 3
    assert [m.msg_id for m in (await s.timeline(late, gid, after=0))[0].messages] == [
        m.msg_id for m in page.messages
    ]
    removed = await s.ask(owner, lambda r: GroupRemove(gid, (F,), request_id=r))
    assert isinstance(removed, GroupRemoveOk) and removed.count == 1
    err = await s.ask(late, lambda r: TimelinePull(gid, 0, 0, request_id=r))
    assert isinstance(err, Error) and err.code == ErrorCode.FORBIDDEN
    await s.settled(6)  # the removal event, in the timeline and in F's inbox
    # The removed member learns of its removal in its inbox (it cannot read the timeline).
    assert (await s.inbox_ids(F))[-1] > after


@pytest_twisted.ensureDeferred
async def test_crossing_the_threshold_both_ways_loses_and_duplicates_nothing(stack):
    """Small (3) -> large (5) -> still large (4: above 90%) -> small (3): for every member,
    each message of the group is in its inbox or in the timeline, exactly once."""
    s = stack
    owner = s.peer(OWNER)
    gid = await _group(s, owner, (B, C))
    sent = [await s.send(owner, gid, b"small")]
    await s.ask(owner, lambda r: GroupAdd(gid, (D, E), request_id=r))
    sent.append(await s.send(owner, gid, b"large"))
    await s.ask(owner, lambda r: GroupRemove(gid, (E,), request_id=r))
    sent.append(await s.send(owner, gid, b"still large"))
    await s.ask(owner, lambda r: GroupRemove(gid, (D,), request_id=r))
    sent.append(await s.send(owner, gid, b"small again"))
    total = 4 + 4  # messages and events (created, added, removed twice)
    await s.settled(total + 2)  # and the removal events' copies for E's and D's inboxes
    history = await s.history_ids(gid)
    assert len(history) == total and set(sent) <= set(history)

    reader = s.peer(B)
    timeline = {m.msg_id for p in await s.timeline(reader, gid) for m in p.messages}
    assert timeline and sent[1] in timeline and sent[2] in timeline
    for user in (OWNER, B, C):  # members throughout
        inbox = set(await s.inbox_ids(user))
        assert not inbox & timeline
        assert inbox | timeline == set(history), user
    assert sent[0] in inbox and sent[3] in inbox
    assert (await s.heads(reader))[gid].done == len(timeline)  # frozen, still listed
    pulled = await s.ask(reader, lambda r: HistoryPull(ConvKind.GROUP, gid, 0, 0, request_id=r))
    assert isinstance(pulled, HistoryPage)
    assert sorted(m.msg_id for m in pulled.messages) == history
    assert isinstance(await s.ask(reader, lambda r: OfflinePull(0, 0, request_id=r)), OfflinePage)


@pytest_twisted.ensureDeferred
async def test_a_reconnect_catches_up_without_downloading_the_pushed_messages_again(stack):
    """Carol's phone is online for N messages (pushed), then offline for two more. Its
    catch-up pulls list the N as held: the pages carry only the two it missed, and the
    position still reaches done. Without held ids the same pages carry all N + 2."""
    s = stack
    n = 30
    owner = s.peer(OWNER)
    gid = await _group(s, owner, (B, C, D, E))
    phone = s.peer(C)
    (start,) = await s.timeline(phone, gid)  # caught up: the position before the pushes
    pushed: list[Message] = []
    live = [await s.send(owner, gid, f"live {i}".encode()) for i in range(n)]
    await s.settled(1 + n)

    def all_pushed() -> bool:
        pushed.extend(f.message for f in phone.frames() if isinstance(f, Push))
        return {m.msg_id for m in pushed} >= set(live)

    await eventually(all_pushed)
    phone.session.connectionLost()  # the connection drops
    missed = [await s.send(owner, gid, f"missed {i}".encode()) for i in range(2)]
    await s.settled(1 + n + 2)

    phone = s.peer(C)  # reconnects; holds the N pushes above its stored position
    h = (await s.heads(phone))[gid]
    assert h.done == start.position + n + 2
    held = tuple(sorted(m.msg_id for m in pushed))
    pages, after = [], start.position
    while True:  # the sync loop of 20.6, 5 seqs a page so that it takes several
        page = await s.ask(phone, lambda r, a=after: TimelinePull(gid, a, 5, held, request_id=r))
        assert isinstance(page, TimelinePage), page
        pages.append(page)
        after = page.position
        if not page.has_more:
            break
    got = [m.msg_id for p in pages for m in p.messages]
    assert got == missed  # none of the N pushed records
    assert pages[-1].position == h.done and len(pages) == -(-(n + 2) // 5)
    assert [p.position for p in pages] == [min(start.position + 5 * (i + 1), h.done)
                                           for i in range(len(pages))]  # fmt: skip
    # The same loop without held ids downloads all of them again (what it cost before).
    again = await s.timeline(phone, gid, after=start.position, limit=5)
    assert [m.msg_id for p in again for m in p.messages] == live + missed
    assert [(p.position, p.has_more) for p in again] == [(p.position, p.has_more) for p in pages]


@pytest_twisted.ensureDeferred
async def test_held_ids_outside_the_page_are_ignored_and_bad_lists_refused(stack):
    s = stack
    owner = s.peer(OWNER)
    gid = await _group(s, owner, (B, C, D, E))
    sent = [await s.send(owner, gid, f"m{i}".encode()) for i in range(4)]
    await s.settled(5)
    reader = s.peer(B)
    # held: an id of no message, seq 2's message, and one above done (not stored yet)
    held = (7, sent[1], sent[3] + 1)
    page = await s.ask(reader, lambda r: TimelinePull(gid, 1, 2, held, request_id=r))
    assert isinstance(page, TimelinePage)
    assert (page.position, page.done, page.has_more) == (3, 4, 1)  # seqs 2 and 3 covered
    assert [m.msg_id for m in page.messages] == [sent[2]]
    # not strictly ascending, repeated, an id 0, too many: INVALID_FIELD, the session goes on
    for bad in ((sent[1], sent[0]), (sent[0], sent[0]), (0, sent[0])):
        err = await s.ask(reader, lambda r, b=bad: _raw_pull(gid, b, r))
        assert isinstance(err, Error) and err.code == ErrorCode.INVALID_FIELD, err
    too_many = struct.pack(">QQHH", gid, 0, 0, TIMELINE_HELD_MAX + 1)
    err = await s.ask(reader, lambda r: raw_frame(FrameType.TIMELINE_PULL, too_many, r))
    assert isinstance(err, Error) and err.code == ErrorCode.INVALID_FIELD, err
    assert (await s.heads(reader))[gid].done == 4


def _raw_pull(gid: int, held: tuple[int, ...], rid: int) -> bytes:
    """A TIMELINE_PULL with any held list (the codec refuses to encode a bad one)."""
    body = struct.pack(f">QQHH{len(held)}Q", gid, 0, 0, len(held), *held)
    return raw_frame(FrameType.TIMELINE_PULL, body, rid)


# ------------------------------------------------------------------ join floors (20.2)
# Seq order (the persister's) is not msg_id order: a message accepted just before a join on
# another gateway (or a redelivered job) can be numbered after the join event, and one
# accepted just after it before the event. The seqs a member skips (its join floor) must stop
# below the first message it may read (msg_id >= its join's), whatever the order.


def _numbered_job(gid: int, msg_id: int) -> PersistJob:
    """A timeline job with a chosen msg_id (its body names it)."""
    message = Message(
        msg_id, int(time.time() * 1000), OWNER, "phone", ConvKind.GROUP, gid,
        ContentType.TEXT, msg_id.to_bytes(16, "big"), b"m%d" % msg_id,
    )  # fmt: skip
    return PersistJob.for_timeline(message)


async def _number(s: Stack, gid: int, msg_ids: list[int]) -> None:
    """Number these messages in this order, as the persister would have."""
    head = (await s.backend.timeline.heads([gid])).get(gid)
    first = head.done + 1 if head is not None else 1
    jobs = [_numbered_job(gid, m) for m in msg_ids]
    assert await s.backend.timeline.append(jobs) == list(range(first, first + len(jobs)))


def _served(pages: list[TimelinePage]) -> list[int]:
    return [m.msg_id for p in pages for m in p.messages]


@pytest_twisted.ensureDeferred
async def test_a_re_added_member_reads_its_join_whatever_the_seq_order(stack):
    """F was a member (position 2), was removed, and is added again at msg_id 2000. Around
    the join, seqs 6..9 carry 2010 (accepted just after it), 2000 (the "added" event), 1990
    and 1995 (accepted just before it, numbered late): 7 messages below 2000, so rank(1999)
    is 7 and a floor there would skip 2010 and the join event for good. Its phone (the old
    position) and a fresh tablet (the head's read_seq) get each message from the join on
    exactly once, and none from before it."""
    s = stack
    gid = await s.backend.groups.create(OWNER, "big", (B, C, D, E, F), 1000)
    await _number(s, gid, [1100, 1200])
    phone = s.peer(F)
    assert _served(await s.timeline(phone, gid)) == [1100, 1200]  # position 2
    assert await s.backend.groups.remove(gid, (F,)) == (F,)
    await _number(s, gid, [1300, 1400, 1500])  # the removal event, two while F is away
    assert await s.backend.groups.add(gid, (F,), 2000) == (F,)
    readable = [2010, 2000, 2020, 2030]  # in seq order
    await _number(s, gid, [2010, 2000, 1990, 1995, 2020, 2030])  # seqs 6..11
    assert await s.backend.timeline.rank(gid, 1999) == 7

    pages = await s.timeline(phone, gid, after=2)  # the position stored before the removal
    assert _served(pages) == readable
    assert (pages[-1].position, pages[-1].done, pages[-1].has_more) == (11, 11, 0)

    tablet = s.peer(F, device="tablet")
    h = (await s.heads(tablet))[gid]
    assert (h.done, h.read_seq) == (11, 5)  # the seqs before 2010's
    assert _served(await s.timeline(tablet, gid, after=h.read_seq)) == readable
    # A pull from 0 (no position at all) serves the same: the window leaves out the rest.
    assert _served(await s.timeline(tablet, gid, after=0)) == readable


@pytest_twisted.ensureDeferred
async def test_a_member_whose_join_event_is_not_numbered_yet_misses_nothing(stack):
    """F joined at 2000; its join event is not in the timeline yet, but a message accepted
    just after the join (2010) is, followed by one from before it (1990). A fresh device
    starts at the head's read_seq: 3, not rank(1999) = 4 (which would skip 2010); the event
    and later messages come in the next pull."""
    s = stack
    gid = await s.backend.groups.create(OWNER, "big", (B, C, D, E), 1000)
    await _number(s, gid, [1100, 1200, 1300])
    assert await s.backend.groups.add(gid, (F,), 2000) == (F,)
    await _number(s, gid, [2010, 1990])
    device = s.peer(F)
    h = (await s.heads(device))[gid]
    assert (h.done, h.read_seq) == (5, 3)
    pages = await s.timeline(device, gid, after=h.read_seq)
    assert _served(pages) == [2010]
    await _number(s, gid, [2000, 1995, 2020])  # the join event, one more late, one after
    more = await s.timeline(device, gid, after=pages[-1].position)
    assert _served(more) == [2000, 2020]
    assert more[-1].position == 8
