"""Group events the persistence queue refused (PROTOCOL.md 12.2: each change of a member list
produces one event message). The membership change stands and is answered OK; the event is
kept and accepted later by the service's background retry (server/improto_server/
event_retry.py), in its group's order, then persisted once and pushed.

Real wiring: sessions on StringTransports, a ChatService over the embedded SQLite backend
and its persister. The only stand-in is `Refusing`, the real embedded queue behind a switch
that refuses accepts as a broker that is down would; the retries run on a task.Clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from improto.enums import ContentType
from improto.frames import (
    Frame,
    GroupAdd,
    GroupAddOk,
    GroupCreate,
    GroupCreated,
    GroupRemove,
    GroupRemoveOk,
    Push,
)
from improto_server import metrics
from improto_server.config import Config
from improto_server.embedded.backend import SQLiteBackend
from improto_server.hub import Hub
from improto_server.ids import IdGenerator
from improto_server.model import Accepted, ConvKey, PersistJob
from improto_server.persister import Persister
from improto_server.rate_limits import RateLimits
from improto_server.service import ChatService
from improto_server.session import SessionFactory
from tests.contract.pages import ANY_SIZE
from tests.support.sessions import Peer, fake_clock
from tests.support.waiting import eventually, sleep

SECRET = "group-event-delivery-secret-0123456789"
THRESHOLD = 4  # large above 4 members
OWNER, B, C, D, E = 31, 32, 33, 34, 35


class Refusing:
    """The real queue, except that `refuse(job)` True makes an accept fail as if the broker
    were down; `lose_answer`: the job does reach the queue, but the answer is a failure (a
    confirm lost)."""

    def __init__(self, queue: Any) -> None:
        self._queue = queue
        self.refuse: Callable[[PersistJob], bool] = lambda job: False
        self.lose_answer = False
        self.attempts: list[PersistJob] = []  # every accept asked for
        self.accepted: list[tuple[PersistJob, Accepted]] = []

    def down(self, down: bool = True) -> None:
        self.refuse = lambda job: down

    def accept(self, job: PersistJob, client_msg_id: bytes) -> Deferred[Accepted]:
        self.attempts.append(job)
        if self.refuse(job):
            return fail(ConnectionRefusedError("broker down (test)"))
        d = self._queue.accept(job, client_msg_id)

        def answered(a: Accepted) -> Accepted:
            self.accepted.append((job, a))
            if self.lose_answer:
                raise TimeoutError("confirm lost (test)")
            return a

        return d.addCallback(answered)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


@dataclass
class Stack:
    backend: SQLiteBackend
    queue: Refusing
    service: ChatService
    factory: SessionFactory
    persister: Persister
    retry_clock: Clock
    logs: list[str]
    hosts: int = 0
    rid: int = 100
    pushes: dict[int, list[int]] = field(default_factory=dict)  # id(peer) -> pushed msg_ids

    def peer(self, user: int, device: str = "phone") -> Peer:
        self.hosts += 1
        p = Peer(self.factory, host=f"192.0.2.{self.hosts}")
        p.login(user, device)
        return p

    def _read(self, peer: Peer) -> list[Frame]:
        out = []
        for f in peer.frames():
            if isinstance(f, Push):
                self.pushes.setdefault(id(peer), []).append(f.message.msg_id)
            else:
                out.append(f)
        return out

    def pushed(self, peer: Peer) -> list[int]:
        self._read(peer)
        return self.pushes.get(id(peer), [])

    async def ask(self, peer: Peer, make: Callable[[int], Frame]) -> Any:
        self.rid += 1
        rid = self.rid
        peer.send(make(rid))
        got: list[Frame] = []

        def replied() -> bool:
            got.extend(self._read(peer))
            return any(f.request_id == rid for f in got)

        await eventually(replied)
        (reply,) = [f for f in got if f.request_id == rid]
        return reply

    async def create(self, owner: Peer, members: tuple[int, ...]) -> int:
        created = await self.ask(owner, lambda r: GroupCreate("team", members, request_id=r))
        assert isinstance(created, GroupCreated), created
        return created.group_id

    async def add(self, owner: Peer, gid: int, users: tuple[int, ...]) -> None:
        ok = await self.ask(owner, lambda r: GroupAdd(gid, users, request_id=r))
        assert isinstance(ok, GroupAddOk) and ok.count == len(users), ok

    async def remove(self, owner: Peer, gid: int, users: tuple[int, ...]) -> None:
        ok = await self.ask(owner, lambda r: GroupRemove(gid, users, request_id=r))
        assert isinstance(ok, GroupRemoveOk) and ok.count == len(users), ok

    async def settled(self, n: int) -> None:
        await eventually(lambda: self.persister.persisted >= n)

    async def retry(self, seconds: float) -> None:
        """Let the retry clock run `seconds`, then the real reactor finish what it started."""
        self.retry_clock.advance(seconds)
        await sleep(0.05)

    async def inbox_ids(self, user: int) -> list[int]:
        page = await self.backend.inbox.page(user, 0, 1000, ANY_SIZE)
        return [int.from_bytes(r[:8], "big") for r in page.records]

    async def history_ids(self, gid: int) -> list[int]:
        page = await self.backend.history.page(ConvKey.group(gid), 0, 1000, 0, ANY_SIZE)
        return sorted(int.from_bytes(r[:8], "big") for r in page.records)

    async def timeline_ids(self, gid: int) -> list[int]:
        page = await self.backend.timeline.after(gid, 0, 1000, ANY_SIZE)
        return [int.from_bytes(r[:8], "big") for r in page.records]

    def event_ids(self) -> list[int]:
        """The msg_ids of the group events asked to be accepted, in first-asked order."""
        out: list[int] = []
        for job in self.queue.attempts:
            m = job.message
            if m.content_type == ContentType.GROUP_EVENT and m.msg_id not in out:
                out.append(m.msg_id)
        return out

    def refusal_lines(self, msg_id: int) -> list[str]:
        return [x for x in self.logs if f"persistence queue refused message {msg_id} " in x]


@pytest_twisted.async_yield_fixture()
async def stack(tmp_path: Path, logs: list[str]) -> AsyncIterator[Stack]:
    backend = SQLiteBackend(
        tmp_path / "db.sqlite3", reactor=reactor, large_group_threshold=THRESHOLD
    )
    await backend.start()
    config = replace(Config(), large_group_threshold=THRESHOLD)
    clock = fake_clock()
    retry_clock = Clock()
    queue = Refusing(backend.queue)
    hub = Hub()
    service = ChatService(
        IdGenerator(1), queue, backend.inbox, backend.history, backend.groups, hub,
        limits=RateLimits(config, clock), conversations=backend.conversations,
        timeline=backend.timeline, clock=retry_clock,
    )  # fmt: skip
    persister = Persister(backend.queue, backend.inbox, backend.history, backend.conversations,
                          timeline=backend.timeline)  # fmt: skip
    persister.start()
    factory = SessionFactory(config, service, hub, clock, SECRET)
    yield Stack(backend, queue, service, factory, persister, retry_clock, logs)
    persister.stop()
    await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_refused_event_is_accepted_later_persisted_once_and_pushed(stack: Stack) -> None:
    s = stack
    owner, tablet, bob = s.peer(OWNER), s.peer(OWNER, "tablet"), s.peer(B)
    gid = await s.create(owner, (B, C))
    await s.settled(1)
    s.queue.down()
    await s.add(owner, gid, (D,))  # answered OK: the change stands
    (_, event) = s.event_ids()
    assert s.refusal_lines(event)
    await sleep(0.05)
    for user in (OWNER, B, C, D):  # not persisted, not pushed: nothing accepted yet
        assert event not in await s.inbox_ids(user)
    assert event not in await s.history_ids(gid)
    assert event not in s.pushed(bob) + s.pushed(tablet)
    assert s.service.events.pending == 1

    await s.retry(0.25)  # still down: refused again
    assert [j.message.msg_id for j in s.queue.attempts].count(event) == 2
    assert len(s.refusal_lines(event)) == 1  # logged once per event
    s.queue.down(False)
    await s.retry(0.5)  # the doubled delay
    await s.settled(2)
    assert s.service.events.pending == 0
    for user in (OWNER, B, C, D):
        assert (await s.inbox_ids(user)).count(event) == 1
    assert (await s.history_ids(gid)).count(event) == 1
    assert s.pushed(bob).count(event) == 1 and s.pushed(tablet).count(event) == 1
    assert event not in s.pushed(owner)  # the connection that made the change got its reply
    attempts = len(s.queue.attempts)
    await s.retry(30)
    assert len(s.queue.attempts) == attempts  # nothing left to retry


@pytest_twisted.ensureDeferred
async def test_a_retry_after_a_lost_answer_makes_no_second_message(stack: Stack) -> None:
    """The first attempt reached the queue but its answer was lost: the retry (same job, same
    client_msg_id) is a duplicate, and the event is persisted and pushed once."""
    s = stack
    owner, bob = s.peer(OWNER), s.peer(B)
    gid = await s.create(owner, (B, C))
    await s.settled(1)
    s.queue.lose_answer = True
    await s.add(owner, gid, (D,))
    (_, event) = s.event_ids()
    assert s.refusal_lines(event) and s.service.events.pending == 1
    s.queue.lose_answer = False
    await s.retry(0.25)
    assert [a.duplicate for j, a in s.queue.accepted if j.message.msg_id == event] == [
        False, True,
    ]  # fmt: skip
    await s.settled(2)
    await sleep(0.1)
    assert s.persister.persisted == 2
    for user in (OWNER, B, C, D):
        assert (await s.inbox_ids(user)).count(event) == 1
    assert (await s.history_ids(gid)).count(event) == 1
    assert s.pushed(bob).count(event) == 1


@pytest_twisted.ensureDeferred
async def test_events_of_one_group_keep_their_order_behind_a_refused_one(stack: Stack) -> None:
    s = stack
    owner = s.peer(OWNER)
    gid = await s.create(owner, (B,))
    await s.settled(1)
    refused_once: set[int] = set()

    def first_attempt_of_d(job: PersistJob) -> bool:  # the broker refuses only that one
        m = job.message
        if b'"added"' in m.body and b'"34"' in m.body and m.msg_id not in refused_once:
            refused_once.add(m.msg_id)
            return True
        return False

    s.queue.refuse = first_attempt_of_d
    await s.add(owner, gid, (D,))
    await s.add(owner, gid, (E,))  # the queue would take it, but it waits behind D's
    first, second = s.service.events.pending_ids()
    assert first < second
    assert second not in [j.message.msg_id for j in s.queue.attempts]  # not even tried
    other = await s.create(owner, (C,))  # another group's event does not wait
    await s.settled(2)
    assert len(await s.history_ids(other)) == 1
    assert first not in await s.history_ids(gid)

    await s.retry(0.25)
    await s.settled(4)
    attempts = [j.message.msg_id for j in s.queue.attempts]
    assert attempts.index(second) > len(attempts) - 1 - attempts[::-1].index(first)
    for user in (OWNER, B):  # in every inbox in the order of the changes
        ids = await s.inbox_ids(user)
        assert ids.index(first) < ids.index(second)
    assert (await s.inbox_ids(D)).count(first) == 1
    assert first not in await s.inbox_ids(E) and second in await s.inbox_ids(E)
    assert s.service.events.pending == 0


@pytest_twisted.ensureDeferred
async def test_past_the_bound_an_event_is_dropped_and_logged(stack: Stack) -> None:
    s = stack
    owner = s.peer(OWNER)
    gid = await s.create(owner, (B,))
    await s.settled(1)
    s.service.events.max_pending = 1
    dropped = metrics.sample("improto_group_events_dropped_total")
    s.queue.down()
    await s.add(owner, gid, (D,))
    await s.add(owner, gid, (E,))  # answered OK too; its event is dropped
    assert s.service.events.pending == 1
    assert metrics.sample("improto_group_events_dropped_total") == dropped + 1
    assert [x for x in s.logs if "dropped: 1 events already wait" in x]
    s.queue.down(False)
    await s.retry(0.25)
    await s.settled(2)
    await sleep(0.05)
    history = await s.history_ids(gid)
    assert len(history) == 2  # created, added D; E's event lost (logged, counted)
    assert s.persister.persisted == 2


@pytest_twisted.ensureDeferred
async def test_a_large_groups_removal_event_and_the_removed_users_copy_both_arrive(
    stack: Stack,
) -> None:
    s = stack
    owner, bob = s.peer(OWNER), s.peer(B)
    gid = await s.create(owner, (B, C, D, E))  # 5 members: large
    await s.settled(1)
    s.queue.down()
    await s.remove(owner, gid, (E,))  # the event (timeline) and E's inbox copy, both refused
    (_, removal) = s.event_ids()
    await s.retry(0.25)
    assert removal not in await s.timeline_ids(gid) and removal not in await s.inbox_ids(E)
    s.queue.down(False)
    await s.retry(0.5)
    await s.settled(3)  # the event and its copy
    assert s.service.events.pending == 0
    assert (await s.timeline_ids(gid)).count(removal) == 1
    assert (await s.history_ids(gid)).count(removal) == 1
    assert (await s.inbox_ids(E)).count(removal) == 1  # E can no longer read the timeline
    assert removal not in await s.inbox_ids(B)  # the members read it in the timeline
    assert s.pushed(bob).count(removal) == 1

    # Only the copy refused: the event is accepted (and pushed) at once, the copy later.
    s.queue.refuse = lambda job: not job.timeline
    await s.remove(owner, gid, (D,))
    (*_, second) = s.event_ids()
    await s.settled(4)
    assert second in await s.timeline_ids(gid)
    assert s.pushed(bob).count(second) == 1
    assert second not in await s.inbox_ids(D)
    assert s.refusal_lines(second) and s.service.events.pending == 1
    s.queue.refuse = lambda job: False
    await s.retry(0.25)
    await s.settled(5)
    assert (await s.inbox_ids(D)).count(second) == 1
    assert (await s.timeline_ids(gid)).count(second) == 1
    assert s.pushed(bob).count(second) == 1  # pushed once, when the event was accepted


@pytest_twisted.ensureDeferred
async def test_close_makes_one_last_attempt_and_logs_what_remains(stack: Stack) -> None:
    s = stack
    owner = s.peer(OWNER)
    first = await s.create(owner, (B,))
    second = await s.create(owner, (C,))
    await s.settled(2)
    s.queue.down()
    await s.add(owner, first, (D,))
    await s.add(owner, second, (E,))
    *_, to_first, to_second = s.event_ids()
    # The broker is back for the first group's event only when the service stops.
    s.queue.refuse = lambda job: job.message.conv_id == second
    await s.service.close()  # no clock advance: the stop itself tries once more
    await s.settled(3)
    assert to_first in await s.history_ids(first)
    assert to_second not in await s.history_ids(second)
    assert [x for x in s.logs if "stopping with 1 group events" in x and str(to_second) in x]
    attempts = len(s.queue.attempts)
    await s.retry(30)
    assert len(s.queue.attempts) == attempts  # no retry after the stop
