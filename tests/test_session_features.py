"""Post-v1 features on sessions (PROTOCOL.md section 18): negotiation, the gating of the new
types (a version-1 connection's bytes unchanged), wire-once notices, the login watch, read
marks and their fan-out. Sessions on StringTransports with the timers on a fake clock; the
storage is a real embedded backend with its persister, on the running reactor."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest_twisted

from twisted.internet import reactor
from twisted.internet.task import Clock

from improto.codec import encode
from improto.enums import ConvKind, Feature
from improto.errors import ErrorCode
from improto.frames import (
    ConvChanges,
    ConvChangesPage,
    ConvList,
    ConvPage,
    Error,
    Features,
    FeaturesOk,
    InboxNotice,
    OfflinePage,
    OfflinePull,
    Push,
    PushAck,
    ReadMark,
    ReadMarkOk,
    ReadUpdate,
    Send,
    SendAck,
    SyncHint,
)
from improto_server.config import Config
from improto_server.embedded.backend import SQLiteBackend
from improto_server.hub import Hub
from improto_server.ids import IdGenerator
from improto_server.inbox_follower import ACK_DELAY_S, WATCH_STEPS_S, InboxFollower
from improto_server.persister import Persister
from improto_server.rate_limits import RateLimits
from improto_server.service import ChatService
from improto_server.session import SessionFactory
from tests.support.sessions import Peer, advance, fake_clock, replies
from tests.support.waiting import sleep

SECRET = "features-test-secret-0123456789abcdef"
ALICE, BOB = 11, 12
ALL = (Feature.WIRE_ONCE, Feature.CONVERSATIONS, Feature.READ_RECEIPTS)


@dataclass
class Stack:
    backend: SQLiteBackend
    clock: Clock
    factory: SessionFactory
    persister: Persister
    hosts: int = 0

    def peer(self, user: int, device: str = "phone", features: tuple[int, ...] = ()) -> Peer:
        """A logged-in connection (each from its own address) that asked for `features`."""
        self.hosts += 1
        p = Peer(self.factory, host=f"192.0.2.{self.hosts}")
        p.login(user, device)
        if features:
            p.send(Features(features, request_id=2))
            (ok,) = p.frames()
            assert isinstance(ok, FeaturesOk), ok
        return p

    async def in_inbox(self, user: int, n: int) -> None:
        """Until the user's inbox has `n` entries (the persister wrote them)."""
        got = 0
        for _ in range(2000):
            got = len((await self.backend.inbox.ids(user, 0, 1000)).cursors)
            if got >= n:
                return
            await sleep(0.005)
        raise AssertionError(f"inbox of {user} has {got} entries, not {n}")

    async def advance(self, seconds: float, steps: int = 1) -> None:
        await advance(self.clock, seconds, steps)


@pytest_twisted.async_yield_fixture()
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    made: list[SQLiteBackend] = []

    async def build(persist: bool = True, **settings: object) -> Stack:
        backend = SQLiteBackend(tmp_path / f"db{len(made)}.sqlite3", reactor=reactor)
        await backend.start()
        made.append(backend)
        config = replace(Config(), **settings)  # type: ignore[arg-type]
        clock = fake_clock()
        hub = Hub()
        service = ChatService(
            IdGenerator(1), backend.queue, backend.inbox, backend.history, backend.groups, hub,
            limits=RateLimits(config, clock), conversations=backend.conversations,
            read_receipts=config.read_receipts,
        )  # fmt: skip
        persister = Persister(backend.queue, backend.inbox, backend.history,
                              backend.conversations)  # fmt: skip
        if persist:
            persister.start()
        return Stack(backend, clock, SessionFactory(config, service, hub, clock, SECRET),
                     persister)  # fmt: skip

    yield build
    for b in made:
        await b.close()


def follower_timers(clock: Clock) -> list[object]:
    return [c for c in clock.getDelayedCalls() if isinstance(c.func.__self__, InboxFollower)]


def send(to: int, body: bytes = b"hi", rid: int = 5) -> Send:
    return Send(bytes([rid]) * 16, ConvKind.USER, to, 1, body, request_id=rid)


async def synced(peer: Peer, cursor: int = 0, rid: int = 3) -> OfflinePage:
    """The peer's sync loop: pages until has_more is 0."""
    while True:
        peer.send(OfflinePull(cursor, 0, request_id=rid))
        (page,) = await replies(peer)
        assert isinstance(page, OfflinePage), page
        if not page.has_more:
            return page
        cursor = page.cursor


# ------------------------------------------------------------------ negotiation


@pytest_twisted.ensureDeferred
async def test_features_ok_lists_what_is_enabled_ascending(make) -> None:
    s = await make()
    p = s.peer(ALICE)
    p.send(Features((3, 99, 1, 1, 2, 0), request_id=8))  # unknown numbers, duplicates ignored
    assert p.frames() == [FeaturesOk((1, 2, 3), request_id=8)]
    p.send(Features((Feature.READ_RECEIPTS, Feature.WIRE_ONCE), request_id=9))
    assert p.frames() == [FeaturesOk((1,), request_id=9)]  # receipts need CONVERSATIONS
    p.send(Features((), request_id=10))  # each FEATURES replaces the set
    assert p.frames() == [FeaturesOk((), request_id=10)]
    assert p.session.features == 0
    await s.advance(3.0)  # the login watch is over: a version-1 connection keeps nothing
    assert p.session.follower is None


@pytest_twisted.ensureDeferred
async def test_receipts_off_by_setting(make) -> None:
    s = await make(read_receipts=False)
    p = s.peer(ALICE)
    p.send(Features(ALL, request_id=4))
    assert p.frames() == [FeaturesOk((1, 2), request_id=4)]


@pytest_twisted.ensureDeferred
async def test_features_before_hello_is_not_authenticated(make) -> None:
    s = await make()
    p = Peer(s.factory)
    p.send(Features((1,), request_id=6))
    (err,) = p.frames()
    assert isinstance(err, Error) and (err.code, err.request_id) == (
        ErrorCode.NOT_AUTHENTICATED, 6,
    )  # fmt: skip


def _raw(kind: int, body: bytes, rid: int) -> bytes:
    return struct.pack(">IBBBI", 7 + len(body), 1, kind, 0, rid) + body


def _v1_unknown(kind: int, rid: int) -> bytes:
    return encode(Error(ErrorCode.UNKNOWN_FRAME_TYPE, f"unknown frame type 0x{kind:02x}",
                        request_id=rid))  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_new_types_are_unknown_to_a_v1_connection_byte_for_byte(make) -> None:
    s = await make()
    before = Peer(s.factory, host="198.51.100.1")
    for kind in (0x31, 0x32, 0x33, 0x34):
        before.send(_raw(kind, b"\x01", kind))  # a short body: the type is checked first
        assert before.transport.value() == _v1_unknown(kind, kind)
        before.transport.clear()
    p = s.peer(ALICE)
    for kind in (0x31, 0x32, 0x33, 0x34, 0xA3, 0xA4, 0xB0, 0xB1):
        p.send(_raw(kind, b"", 40 + kind))
        assert p.transport.value() == _v1_unknown(kind, 40 + kind)
        p.transport.clear()
    p.send(Features((Feature.WIRE_ONCE,), request_id=2))
    p.frames()
    p.send(encode(ConvList(request_id=12)))  # WIRE_ONCE does not enable the list
    assert p.transport.value() == _v1_unknown(0x31, 12)
    assert not p.closed


@pytest_twisted.ensureDeferred
async def test_conversations_enables_the_requests(make) -> None:
    s = await make()
    p = s.peer(ALICE, features=(Feature.CONVERSATIONS,))
    p.send(ConvList(request_id=12))
    (page,) = await replies(p)
    assert page == ConvPage(0, 0, 0, (), request_id=12)
    p.send(_raw(0x31, b"", 13))  # now a known type with a malformed body
    (err,) = p.frames()
    assert isinstance(err, Error) and (err.code, err.request_id) == (ErrorCode.MALFORMED_FRAME, 13)
    p.send(_raw(0xA3, b"", 14))  # a server-to-client type
    (err,) = p.frames()
    assert isinstance(err, Error) and err.code == ErrorCode.UNKNOWN_FRAME_TYPE
    assert err.text == "server-to-client frame type"


# ------------------------------------------------------------------- wire-once


@pytest_twisted.ensureDeferred
async def test_wire_once_pushed_messages_are_noticed_not_downloaded_again(make) -> None:
    s = await make()
    bob = s.peer(BOB, features=(Feature.WIRE_ONCE,))
    assert (await synced(bob)).cursor == 0
    alice = s.peer(ALICE, features=(Feature.WIRE_ONCE,))
    ids = []
    for i in range(3):
        alice.send(send(BOB, b"m%d" % i, rid=20 + i))
        (ack,) = await replies(alice)
        assert isinstance(ack, SendAck)
        ids.append(ack.msg_id)
    pushes = await replies(bob, 3)
    assert [f.message.msg_id for f in pushes if isinstance(f, Push)] == ids
    for m in ids:
        bob.send(PushAck(m))
    await s.in_inbox(BOB, 3)
    await s.advance(ACK_DELAY_S)
    (notice,) = await replies(bob)
    assert notice == InboxNotice(0, 3, tuple(ids))
    page = await synced(bob, notice.to_cursor)  # the client's next sync: nothing again
    assert page.messages == () and page.cursor == 3
    # the sender is told of its own messages too (after its own final page)
    await synced(alice)
    alice.send(send(BOB, b"more", rid=30))
    (ack,) = await replies(alice)
    await s.in_inbox(ALICE, 4)
    await s.advance(ACK_DELAY_S)
    (own,) = await replies(alice)
    assert own == InboxNotice(3, 4, (ack.msg_id,))


@pytest_twisted.ensureDeferred
async def test_wire_once_message_not_pushed_gets_sync_hint(make) -> None:
    s = await make(max_unacked_pushes=1)
    bob = s.peer(BOB, features=(Feature.WIRE_ONCE,))
    await synced(bob)
    alice = s.peer(ALICE)
    for i in range(2):  # the second does not fit bob's window of one
        alice.send(send(BOB, rid=40 + i))
        await replies(alice)
    (push,) = await replies(bob)
    assert isinstance(push, Push)
    await s.in_inbox(BOB, 2)
    bob.send(PushAck(push.message.msg_id))  # the window's own SYNC_HINT, as in version 1
    assert await replies(bob) == [SyncHint()]
    await s.advance(1.0, steps=10)
    assert bob.frames() == []  # no notice while the client syncs
    page = await synced(bob)
    assert len(page.messages) == 2


# ------------------------------------------------------------------ login watch


@pytest_twisted.ensureDeferred
async def test_login_race_gets_sync_hint_on_a_v1_connection(make) -> None:
    s = await make(persist=False)  # the persister is late: the entry comes after the page
    alice = s.peer(ALICE)
    alice.send(send(BOB))
    (ack,) = await replies(alice)
    bob = s.peer(BOB)  # version 1: no FEATURES
    assert (await synced(bob)).messages == ()
    s.persister.start()
    await s.in_inbox(BOB, 1)
    await s.advance(WATCH_STEPS_S[0])
    assert await replies(bob) == [SyncHint()]
    page = await synced(bob)
    assert [m.msg_id for m in page.messages] == [ack.msg_id]
    await s.advance(5.0, steps=10)
    assert bob.frames() == [] and bob.session.follower is None  # watch over, nothing kept


@pytest_twisted.ensureDeferred
async def test_login_watch_no_hint_for_pushed_messages(make) -> None:
    s = await make()
    bob = s.peer(BOB)
    await synced(bob)
    alice = s.peer(ALICE)
    alice.send(send(BOB))
    await replies(alice)
    (push,) = await replies(bob)
    assert isinstance(push, Push)
    await s.in_inbox(BOB, 1)
    await s.advance(WATCH_STEPS_S[-1] + 0.1, steps=20)
    assert bob.frames() == []
    await s.advance(5.0)
    assert bob.session.follower is None


@pytest_twisted.ensureDeferred
async def test_idle_v1_connection_keeps_no_follower(make) -> None:
    s = await make()
    bob = s.peer(BOB)
    assert bob.session.follower is None  # made on first use only
    await synced(bob)
    assert bob.session.follower is not None
    await s.advance(4.0, steps=8)
    assert bob.session.follower is None
    assert not follower_timers(s.clock)


@pytest_twisted.ensureDeferred
async def test_closing_cancels_the_follower_timers(make) -> None:
    s = await make()
    bob = s.peer(BOB, features=(Feature.WIRE_ONCE,))
    await synced(bob)
    follower = bob.session.follower
    assert follower is not None
    assert follower_timers(s.clock)
    bob.session.connectionLost()
    assert bob.session.follower is None
    assert not follower_timers(s.clock)


# -------------------------------------------------------------- conversations


@pytest_twisted.ensureDeferred
async def test_read_mark_reaches_own_devices_and_the_peer(make) -> None:
    s = await make()
    phone = s.peer(BOB, "phone", (Feature.CONVERSATIONS,))
    tablet = s.peer(BOB, "tablet", (Feature.CONVERSATIONS,))
    laptop = s.peer(BOB, "laptop")  # version 1
    alice = s.peer(ALICE, "phone", ALL)
    alice_v1 = s.peer(ALICE, "web", (Feature.CONVERSATIONS,))  # no receipts asked for
    alice.send(send(BOB, b"read me"))
    (ack,) = await replies(alice)
    for p in (phone, tablet, laptop, alice_v1):
        await replies(p)  # the push
    for _ in range(200):  # the persister writes the row shortly after the inbox entry
        phone.send(ConvList(request_id=7))
        (page,) = await replies(phone)
        assert isinstance(page, ConvPage)
        if page.convs:
            break
        await sleep(0.01)
    assert page.total_unread == 1
    (conv,) = page.convs
    assert (conv.conv_kind, conv.conv_id, conv.unread) == (ConvKind.USER, ALICE, 1)
    phone.send(ReadMark(ConvKind.USER, ALICE, ack.msg_id, request_id=8))
    assert await replies(phone) == [ReadMarkOk(ConvKind.USER, ALICE, ack.msg_id, request_id=8)]
    assert await replies(tablet) == [ReadUpdate(BOB, ConvKind.USER, ALICE, ack.msg_id)]
    assert await replies(alice) == [ReadUpdate(BOB, ConvKind.USER, BOB, ack.msg_id)]
    await sleep(0.05)
    assert laptop.frames() == [] and alice_v1.frames() == []
    # persisted shortly after: the list follows, and so do the offline page's unread counts
    for _ in range(200):
        phone.send(ConvChanges(page.list_version, request_id=9))
        (changes,) = await replies(phone)
        assert isinstance(changes, ConvChangesPage)
        if changes.convs:
            break
        await sleep(0.01)
    (conv,) = changes.convs
    assert (conv.read_id, conv.unread) == (ack.msg_id, 0)
    assert (await synced(phone)).unread == ()  # read: not counted
    (counted,) = (await synced(laptop)).unread  # version 1: every message from others
    assert counted.count == 1


@pytest_twisted.ensureDeferred
async def test_read_mark_is_a_page_free_request_and_limited(make) -> None:
    s = await make(state_op_rate=1.0, state_op_burst=2.0)
    p = s.peer(BOB, features=(Feature.CONVERSATIONS,))
    for rid in (1, 2):
        p.send(ReadMark(ConvKind.USER, ALICE, 5, request_id=rid))
        assert isinstance((await replies(p))[0], ReadMarkOk)
    p.send(ReadMark(ConvKind.USER, ALICE, 5, request_id=3))
    (err,) = await replies(p)
    assert isinstance(err, Error) and err.code == ErrorCode.RATE_LIMITED
    assert err.text.startswith("retry_after_ms=")
