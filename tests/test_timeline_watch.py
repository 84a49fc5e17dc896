"""The timelines' login watch (PROTOCOL.md 20.6, server/improto_server/timeline_watch.py): a
large group's message accepted before a login, whose record is written after that login's
TIMELINE_HEADS answer, gets the connection a SYNC_HINT; messages pushed to it do not.
Sessions on StringTransports with the timers on a fake clock; the storage is a real embedded
backend with its persister, on the running reactor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest_twisted

from twisted.internet import reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from improto.enums import ConvKind, Feature
from improto.frames import (
    Features,
    FeaturesOk,
    OfflinePage,
    OfflinePull,
    Push,
    Send,
    SendAck,
    SyncHint,
    TimelineHeads,
    TimelineHeadsPage,
    TimelinePage,
    TimelinePull,
)
from improto_server.config import Config
from improto_server.embedded.backend import SQLiteBackend
from improto_server.hub import Hub
from improto_server.ids import IdGenerator
from improto_server.inbox_follower import LOGIN_WATCH_S, WATCH_STEPS_S
from improto_server.persister import Persister
from improto_server.rate_limits import RateLimits
from improto_server.service import ChatService
from improto_server.session import SessionFactory
from improto_server.timeline_watch import TimelineWatch
from tests.support.sessions import Peer, advance, fake_clock, replies
from tests.support.waiting import sleep

SECRET = "timeline-watch-test-secret-0123456789abcdef"
ALICE, BOB, CAROL = 21, 22, 23


@dataclass
class Stack:
    backend: SQLiteBackend
    clock: Clock
    service: ChatService
    factory: SessionFactory
    persister: Persister
    hosts: int = 0

    def peer(self, user: int) -> Peer:
        """A logged-in connection with LARGE_GROUPS, from its own address."""
        self.hosts += 1
        p = Peer(self.factory, host=f"192.0.2.{self.hosts}")
        p.login(user, "phone")
        p.send(Features((Feature.LARGE_GROUPS,), request_id=2))
        (ok,) = p.frames()
        assert isinstance(ok, FeaturesOk) and Feature.LARGE_GROUPS in ok.features, ok
        return p

    async def written(self, gid: int, done: int) -> None:
        """Until the group's timeline has `done` records (the persister wrote them)."""
        for _ in range(2000):
            heads = await self.backend.timeline.heads([gid])
            if gid in heads and heads[gid].done >= done:
                return
            await sleep(0.005)
        raise AssertionError(f"group {gid}'s timeline did not reach {done}")

    async def advance(self, seconds: float, steps: int = 1) -> None:
        await advance(self.clock, seconds, steps)


@pytest_twisted.async_yield_fixture()
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    made: list[SQLiteBackend] = []

    async def build(persist: bool = True) -> Stack:
        backend = SQLiteBackend(
            tmp_path / f"db{len(made)}.sqlite3", reactor=reactor, large_group_threshold=2
        )
        await backend.start()
        made.append(backend)
        config = replace(Config(), large_group_threshold=2)
        clock = fake_clock()
        hub = Hub()
        service = ChatService(
            IdGenerator(1), backend.queue, backend.inbox, backend.history, backend.groups, hub,
            limits=RateLimits(config, clock), conversations=backend.conversations,
            timeline=backend.timeline,
        )  # fmt: skip
        persister = Persister(backend.queue, backend.inbox, backend.history,
                              backend.conversations, timeline=backend.timeline)  # fmt: skip
        if persist:
            persister.start()
        factory = SessionFactory(config, service, hub, clock, SECRET)
        return Stack(backend, clock, service, factory, persister)

    yield build
    for b in made:
        await b.close()


async def large_group(s: Stack) -> int:
    """A group of three with the threshold at 2: large from its creation."""
    gid = await s.backend.groups.create(ALICE, "big", (BOB, CAROL), s.service.ids.next()[0])
    info = await s.backend.groups.info(gid)
    assert info is not None and info.large
    return gid


def group_send(gid: int, rid: int, body: bytes = b"hi") -> Send:
    return Send(bytes([rid]) * 16, ConvKind.GROUP, gid, 1, body, request_id=rid)


async def sync_loop(peer: Peer) -> TimelineHeadsPage:
    """The offline loop (an empty inbox: one page), then TIMELINE_HEADS (20.6)."""
    peer.send(OfflinePull(0, 0, request_id=3))
    (page,) = await replies(peer)
    assert isinstance(page, OfflinePage) and not page.has_more, page
    peer.send(TimelineHeads(request_id=4))
    (heads,) = await replies(peer)
    assert isinstance(heads, TimelineHeadsPage), heads
    return heads


def watches(s: Stack) -> list[object]:
    return [c for c in s.clock.getDelayedCalls() if isinstance(c.func.__self__, TimelineWatch)]


@pytest_twisted.ensureDeferred
async def test_message_written_after_the_heads_answer_gets_sync_hint(make) -> None:
    s = await make(persist=False)  # the persister is late: the record comes after the answer
    gid = await large_group(s)
    alice = s.peer(ALICE)
    alice.send(group_send(gid, 5))
    (ack,) = await replies(alice)
    assert isinstance(ack, SendAck)
    bob = s.peer(BOB)  # logs in after the SEND was accepted: it is never pushed to him
    heads = await sync_loop(bob)
    assert all(h.done == 0 for h in heads.heads if h.group_id == gid)
    s.persister.start()
    await s.written(gid, 1)
    await s.advance(WATCH_STEPS_S[0])
    assert await replies(bob) == [SyncHint()]
    # The client's sync loop after the hint finds it.
    heads = await sync_loop(bob)
    (head,) = [h for h in heads.heads if h.group_id == gid]
    bob.send(TimelinePull(gid, head.read_seq, 0, request_id=6))
    (page,) = await replies(bob)
    assert isinstance(page, TimelinePage)
    assert ack.msg_id in [m.msg_id for m in page.messages]
    await s.advance(LOGIN_WATCH_S + 1, steps=10)
    assert bob.frames() == []  # one hint: the second answer saw everything
    assert not watches(s)


@pytest_twisted.ensureDeferred
async def test_pushed_messages_get_no_hint_and_the_watch_ends(make) -> None:
    s = await make()
    gid = await large_group(s)
    bob = s.peer(BOB)
    await sync_loop(bob)
    alice = s.peer(ALICE)
    for rid in (5, 6):
        alice.send(group_send(gid, rid))
    await replies(alice, 2)
    pushes = await replies(bob, 2)
    assert [type(f) for f in pushes] == [Push, Push]
    await s.written(gid, 2)
    await s.advance(LOGIN_WATCH_S + 0.1, steps=30)
    assert bob.frames() == []
    assert not watches(s)
    watch = bob.session._timeline_watch
    assert watch is not None and watch.reads >= 5 and not watch.active


@pytest_twisted.ensureDeferred
async def test_an_answer_after_the_login_watch_starts_no_watch(make) -> None:
    s = await make()
    await large_group(s)
    bob = s.peer(BOB)
    await s.advance(LOGIN_WATCH_S + 0.5)
    await sync_loop(bob)
    assert bob.session._timeline_watch is None and not watches(s)


@pytest_twisted.ensureDeferred
async def test_closing_the_connection_stops_the_watch(make) -> None:
    s = await make()
    await large_group(s)
    bob = s.peer(BOB)
    await sync_loop(bob)
    assert watches(s)
    bob.session.connectionLost(Failure(ConnectionDone()))
    assert not watches(s) and bob.session._timeline_watch is None
