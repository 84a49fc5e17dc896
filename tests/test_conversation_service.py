"""The conversation handlers (server/improto_server/conversation_service.py) on the real
embedded backend and its persister: CONV_LIST / CONV_CHANGES pages, READ_MARK and CONV_HIDE
with their errors and limits, the READ_UPDATE fan-out, and OFFLINE_PAGE unread counts that
follow the read positions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from improto.codec import FrameReader, decode_payload
from improto.enums import ConvKind, Feature
from improto.errors import ErrorCode
from improto.frames import (
    ConvChanges,
    ConvChangesPage,
    ConvHide,
    ConvHideOk,
    ConvList,
    ConvPage,
    Frame,
    OfflinePull,
    ReadMark,
    ReadMarkOk,
    ReadUpdate,
    Send,
)
from improto.limits import U64_MAX
from improto_server.config import Config
from improto_server.embedded.backend import SQLiteBackend
from improto_server.hub import Hub
from improto_server.ids import IdGenerator
from improto_server.model import StateJob
from improto_server.persister import Persister
from improto_server.rate_limits import RateLimits
from improto_server.service import Caller, ChatService, RequestError
from tests.support.waiting import sleep

ALICE, BOB, CAROL = 21, 22, 23


@dataclass(eq=False)
class Conn:
    """An online device: what the hub writes to it, decoded."""

    user_id: int
    device_id: str
    features: frozenset[int] = frozenset()
    got: list[Frame] = field(default_factory=list)

    def push(self, msg_id: int, data: bytes) -> None:
        pass  # pushes are not what these tests look at

    def notify(self, data: bytes, feature: int) -> bool:
        if feature not in self.features:
            return False
        (payload,) = FrameReader().feed(data)
        self.got.append(decode_payload(payload))
        return True


class StateQueue:
    """The backend's queue, except that state changes are refused (a broker down)."""

    def __init__(self, queue: Any) -> None:
        self._queue = queue

    def accept_state(self, job: StateJob) -> Deferred[None]:
        return fail(ConnectionError("queue down"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


class DownStore:
    """A conversation store whose reads fail (a service restarting)."""

    def __getattr__(self, name: str) -> Callable[..., Deferred[Any]]:
        return lambda *a, **kw: fail(ConnectionError("store down"))


@dataclass
class Harness:
    backend: SQLiteBackend
    service: ChatService
    hub: Hub
    persister: Persister

    def caller(self, user: int, device: str = "phone", *features: int) -> Caller:
        """A caller whose connection is online with `features`."""
        conn = Conn(user, device, frozenset(features))
        self.hub.register(conn)
        return Caller(user, device, conn)

    async def send(self, caller: Caller, to: int, kind: int = ConvKind.USER) -> int:
        n = self.persister.persisted
        cmid = (b"%d-%d" % (caller.user_id, n)).ljust(16, b".")
        ack = await self.service.send(caller, Send(cmid, kind, to, 1, b"hello"))
        await self.until(lambda: self.persister.persisted > n)
        return ack.msg_id

    async def until(self, check: Callable[[], bool]) -> None:
        for _ in range(2000):
            if check():
                return
            await sleep(0.005)
        raise AssertionError("the persister did not get there")

    async def applied(self, n: int) -> None:
        await self.until(lambda: self.persister.applied >= n)

    async def conv_list(self, caller: Caller, before: int = 0, limit: int = 0) -> ConvPage:
        assert self.service.convs is not None
        data = await self.service.convs.conv_list(caller, ConvList(before, limit, request_id=3))
        page = decode_payload(data[4:])
        assert isinstance(page, ConvPage) and page.request_id == 3
        return page

    async def changes(self, caller: Caller, since: int, limit: int = 0) -> ConvChangesPage:
        assert self.service.convs is not None
        data = await self.service.convs.conv_changes(caller, ConvChanges(since, limit))
        page = decode_payload(data[4:])
        assert isinstance(page, ConvChangesPage)
        return page


@pytest_twisted.async_yield_fixture()
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    made: list[SQLiteBackend] = []

    async def build(queue: Callable[[Any], Any] | None = None, store: Any = None,
                    **settings: object) -> Harness:  # fmt: skip
        backend = SQLiteBackend(tmp_path / f"db{len(made)}.sqlite3", reactor=reactor)
        await backend.start()
        made.append(backend)
        config = replace(Config(), **settings)  # type: ignore[arg-type]
        hub = Hub()
        service = ChatService(
            IdGenerator(1), queue(backend.queue) if queue else backend.queue, backend.inbox,
            backend.history, backend.groups, hub, limits=RateLimits(config, Clock()),
            conversations=store or backend.conversations, read_receipts=config.read_receipts,
        )  # fmt: skip
        persister = Persister(backend.queue, backend.inbox, backend.history,
                              backend.conversations)  # fmt: skip
        persister.start()
        return Harness(backend, service, hub, persister)

    yield build
    for b in made:
        await b.close()


async def refused(work: Any, code: ErrorCode) -> RequestError:
    with pytest.raises(RequestError) as raised:
        await work
    assert raised.value.code == code
    return raised.value


# ------------------------------------------------------------------------ lists


@pytest_twisted.ensureDeferred
async def test_conv_list_newest_first_paged_with_unread_and_versions(make) -> None:
    h = await make()
    alice, bob, carol = h.caller(ALICE), h.caller(BOB), h.caller(CAROL)
    gid = await h.backend.groups.create(CAROL, "team", (BOB,), 1)
    m1 = await h.send(alice, BOB)
    m2 = await h.send(carol, gid, ConvKind.GROUP)
    m3 = await h.send(bob, CAROL)  # bob's own message: read, nothing unread there
    page = await h.conv_list(bob)
    assert [(c.conv_kind, c.conv_id) for c in page.convs] == [
        (ConvKind.USER, CAROL), (ConvKind.GROUP, gid), (ConvKind.USER, ALICE),
    ]  # fmt: skip
    assert [c.last[0].msg_id for c in page.convs] == [m3, m2, m1]
    assert [c.unread for c in page.convs] == [0, 1, 1] and page.total_unread == 2
    assert page.list_version == max(c.version for c in page.convs) and not page.has_more
    first = await h.conv_list(bob, limit=2)
    assert first.has_more and len(first.convs) == 2
    rest = await h.conv_list(bob, before=first.convs[-1].last[0].msg_id)
    assert [c.conv_id for c in rest.convs] == [ALICE] and not rest.has_more
    # changes since the list's version: none; then one more message changes one row
    assert (await h.changes(bob, page.list_version)).convs == ()
    await h.send(alice, BOB)
    changed = await h.changes(bob, page.list_version)
    (row,) = changed.convs
    assert (row.conv_id, row.unread) == (ALICE, 2) and changed.list_version == row.version
    everything = await h.changes(bob, 0, limit=1)
    assert everything.has_more and len(everything.convs) == 1
    assert everything.list_version == everything.convs[0].version


@pytest_twisted.ensureDeferred
async def test_store_failure_is_unavailable(make) -> None:
    h = await make(store=DownStore())
    assert h.service.convs is not None
    bob = h.caller(BOB)
    await refused(h.service.convs.conv_list(bob, ConvList()), ErrorCode.UNAVAILABLE)
    await refused(h.service.convs.conv_changes(bob, ConvChanges()), ErrorCode.UNAVAILABLE)


# ------------------------------------------------------------------- read marks


@pytest_twisted.ensureDeferred
async def test_read_mark_moves_the_position_and_tells_devices_and_the_peer(make) -> None:
    h = await make()
    assert h.service.convs is not None
    alice = h.caller(ALICE, "phone", Feature.CONVERSATIONS, Feature.READ_RECEIPTS)
    alice_old = h.caller(ALICE, "old")  # version 1
    bob = h.caller(BOB, "phone", Feature.CONVERSATIONS)
    bob_tablet = h.caller(BOB, "tablet", Feature.CONVERSATIONS)
    m1 = await h.send(alice, BOB)
    m2 = await h.send(alice, BOB)
    ok = await h.service.convs.read_mark(bob, ReadMark(ConvKind.USER, ALICE, m1, request_id=6))
    assert ok == ReadMarkOk(ConvKind.USER, ALICE, m1, request_id=6)
    assert bob_tablet.connection.got == [ReadUpdate(BOB, ConvKind.USER, ALICE, m1)]  # type: ignore[union-attr]
    assert bob.connection.got == []  # type: ignore[union-attr]  # the one that marked
    assert alice.connection.got == [ReadUpdate(BOB, ConvKind.USER, BOB, m1)]  # type: ignore[union-attr]
    assert alice_old.connection.got == []  # type: ignore[union-attr]
    await h.applied(1)
    (row,) = (await h.conv_list(bob)).convs
    assert (row.read_id, row.unread) == (m1, 1)
    (peer_row,) = (await h.conv_list(alice)).convs
    assert peer_row.peer_read_id == m1
    # positions only move forward
    await h.service.convs.read_mark(bob, ReadMark(ConvKind.USER, ALICE, m2))
    await h.service.convs.read_mark(bob, ReadMark(ConvKind.USER, ALICE, m1))
    await h.applied(3)
    (row,) = (await h.conv_list(bob)).convs
    assert (row.read_id, row.unread) == (m2, 0)


@pytest_twisted.ensureDeferred
async def test_read_mark_is_clamped_to_a_fresh_id(make) -> None:
    h = await make()
    assert h.service.convs is not None
    bob = h.caller(BOB)
    ok = await h.service.convs.read_mark(bob, ReadMark(ConvKind.USER, ALICE, U64_MAX))
    later = h.service.ids.next()[0]
    assert 0 < ok.msg_id < later


@pytest_twisted.ensureDeferred
async def test_receipts_off_tell_only_own_devices(make) -> None:
    h = await make(read_receipts=False)
    assert h.service.convs is not None
    alice = h.caller(ALICE, "phone", Feature.CONVERSATIONS, Feature.READ_RECEIPTS)
    bob = h.caller(BOB, "phone", Feature.CONVERSATIONS)
    tablet = h.caller(BOB, "tablet", Feature.CONVERSATIONS)
    m = await h.send(alice, BOB)
    await h.service.convs.read_mark(bob, ReadMark(ConvKind.USER, ALICE, m))
    assert alice.connection.got == []  # type: ignore[union-attr]
    assert tablet.connection.got == [ReadUpdate(BOB, ConvKind.USER, ALICE, m)]  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_read_mark_of_oneself_sends_no_receipt(make) -> None:
    h = await make()
    assert h.service.convs is not None
    me = h.caller(ALICE, "phone", Feature.CONVERSATIONS, Feature.READ_RECEIPTS)
    other = h.caller(ALICE, "tablet", Feature.CONVERSATIONS, Feature.READ_RECEIPTS)
    m = await h.send(me, ALICE)  # notes to self
    await h.service.convs.read_mark(me, ReadMark(ConvKind.USER, ALICE, m))
    assert other.connection.got == [ReadUpdate(ALICE, ConvKind.USER, ALICE, m)]  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_group_read_mark_needs_a_member(make) -> None:
    h = await make()
    assert h.service.convs is not None
    bob, carol = h.caller(BOB, "phone", Feature.CONVERSATIONS), h.caller(CAROL)
    gid = await h.backend.groups.create(BOB, "team", (ALICE,), 1)
    mark = h.service.convs.read_mark
    await refused(mark(bob, ReadMark(ConvKind.GROUP, gid + 1000, 5)), ErrorCode.NOT_FOUND)
    await refused(mark(carol, ReadMark(ConvKind.GROUP, gid, 5)), ErrorCode.FORBIDDEN)
    ok = await mark(bob, ReadMark(ConvKind.GROUP, gid, 5))
    assert (ok.conv_kind, ok.conv_id, ok.msg_id) == (ConvKind.GROUP, gid, 5)


@pytest_twisted.ensureDeferred
async def test_state_ops_are_rate_limited(make) -> None:
    h = await make(state_op_rate=1.0, state_op_burst=3.0)
    assert h.service.convs is not None
    bob = h.caller(BOB)
    for _ in range(2):
        await h.service.convs.read_mark(bob, ReadMark(ConvKind.USER, ALICE, 5))
    await h.service.convs.conv_hide(bob, ConvHide(ConvKind.USER, ALICE))
    err = await refused(h.service.convs.read_mark(bob, ReadMark(ConvKind.USER, ALICE, 5)),
                        ErrorCode.RATE_LIMITED)  # fmt: skip
    assert err.text.startswith("retry_after_ms=1000 ") and err.retry_after_s == 1.0
    await refused(h.service.convs.conv_hide(bob, ConvHide(ConvKind.USER, ALICE)),
                  ErrorCode.RATE_LIMITED)  # fmt: skip
    assert h.service.limits.state_op(ALICE) == 0.0  # per user


@pytest_twisted.ensureDeferred
async def test_queue_failure_is_unavailable_and_tells_nobody(make) -> None:
    h = await make(queue=StateQueue)
    assert h.service.convs is not None
    bob = h.caller(BOB)
    tablet = h.caller(BOB, "tablet", Feature.CONVERSATIONS)
    await refused(h.service.convs.read_mark(bob, ReadMark(ConvKind.USER, ALICE, 5)),
                  ErrorCode.UNAVAILABLE)  # fmt: skip
    await refused(h.service.convs.conv_hide(bob, ConvHide(ConvKind.USER, ALICE)),
                  ErrorCode.UNAVAILABLE)  # fmt: skip
    assert tablet.connection.got == []  # type: ignore[union-attr]


# ------------------------------------------------------------------------- hide


@pytest_twisted.ensureDeferred
async def test_hide_until_a_newer_message(make) -> None:
    h = await make()
    assert h.service.convs is not None
    alice, bob = h.caller(ALICE), h.caller(BOB)
    await h.send(alice, BOB)
    before = await h.conv_list(bob)
    ok = await h.service.convs.conv_hide(bob, ConvHide(ConvKind.USER, ALICE, request_id=4))
    assert ok == ConvHideOk(ConvKind.USER, ALICE, request_id=4)
    await h.applied(1)
    hidden = await h.conv_list(bob)
    assert hidden.convs == () and hidden.total_unread == 0
    (row,) = (await h.changes(bob, before.list_version)).convs
    assert row.hidden == 1  # the client's other devices drop it from their lists
    m = await h.send(alice, BOB)
    (row,) = (await h.conv_list(bob)).convs
    assert row.last[0].msg_id == m and row.hidden == 0


# ---------------------------------------------------------- offline unread counts


@pytest_twisted.ensureDeferred
async def test_offline_unread_follows_the_read_position(make) -> None:
    h = await make()
    assert h.service.convs is not None
    alice, carol, bob = h.caller(ALICE), h.caller(CAROL), h.caller(BOB)
    await h.send(bob, ALICE)  # own: never unread (and sending reads what came before it)
    a1 = await h.send(alice, BOB)
    await h.send(alice, BOB)
    c1 = await h.send(carol, BOB)
    await h.service.convs.read_mark(bob, ReadMark(ConvKind.USER, ALICE, a1))
    await h.service.convs.read_mark(bob, ReadMark(ConvKind.USER, CAROL, c1))
    await h.applied(2)
    marked = decode_payload((await h.service.offline_pull(bob, OfflinePull(0, 0),
                                                          read_positions=True))[4:])  # fmt: skip
    v1 = decode_payload((await h.service.offline_pull(bob, OfflinePull(0, 0)))[4:])
    assert [(u.conv_id, u.count) for u in marked.unread] == [(ALICE, 1)]  # type: ignore[attr-defined]
    assert [(u.conv_id, u.count) for u in v1.unread] == [(ALICE, 2), (CAROL, 1)]  # type: ignore[attr-defined]
    assert marked.messages == v1.messages  # type: ignore[attr-defined]
