"""Regression (found by bench/chaos.py): group SENDs of one connection reached the persist
queue out of msg_id order, because the id was taken before the membership lookup and the
lookups can finish in any order. The id is now taken right before the queue."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from improto.enums import ContentType, ConvKind
from improto.errors import ErrorCode
from improto.frames import Send
from improto_server.embedded.backend import SQLiteBackend
from improto_server.hub import Hub
from improto_server.ids import IdGenerator
from improto_server.model import GroupInfo, PersistJob
from improto_server.service import Caller, ChatService, RequestError


class HeldLookups:
    """The real group store, except that `info` answers only when the test says so."""

    def __init__(self, groups: Any) -> None:
        self._groups = groups
        self.held: list[tuple[Deferred[GroupInfo | None], int]] = []

    def info(self, group_id: int) -> Deferred[GroupInfo | None]:
        d: Deferred[GroupInfo | None] = Deferred()
        self.held.append((d, group_id))
        return d

    async def release_in_reverse(self) -> None:
        for d, group_id in reversed(self.held):
            d.callback(await self._groups.info(group_id))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._groups, name)


@asynccontextmanager
async def held_service(
    tmp_path: Path,
) -> AsyncIterator[tuple[SQLiteBackend, int, HeldLookups, ChatService, Caller]]:
    """A service on a real store whose group lookups wait (HeldLookups), a group of users
    1, 2 and 3, and user 1's caller."""
    backend = SQLiteBackend(tmp_path / "db.sqlite3", reactor=reactor)
    await backend.start()
    try:
        gid = await backend.groups.create(1, "team", (2, 3), 1)
        groups = HeldLookups(backend.groups)
        service = ChatService(
            IdGenerator(1), backend.queue, backend.inbox, backend.history, groups, Hub()
        )
        yield backend, gid, groups, service, Caller(1, "phone")
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_group_sends_are_queued_in_id_order_when_lookups_finish_out_of_order(
    tmp_path: Path,
) -> None:
    async with held_service(tmp_path) as (backend, gid, groups, service, caller):
        sends = [
            Deferred.fromCoroutine(
                service.send(
                    caller,
                    Send(bytes([i + 1]) * 16, ConvKind.GROUP, gid, ContentType.TEXT, b"m%d" % i),
                )
            )
            for i in range(6)
        ]
        assert len(groups.held) == 6  # every send waits for its lookup
        await groups.release_in_reverse()
        acks = await gatherResults(sends)
        queued: list[PersistJob] = []

        def record(batch: list[PersistJob]) -> Deferred[None]:
            queued.extend(batch)
            return deferLater(reactor, 0, lambda: None)

        backend.queue.consume(record, max_batch=100)
        while len(queued) < 6:
            await deferLater(reactor, 0.01, lambda: None)
        ids = [j.message.msg_id for j in queued]
        assert ids == sorted(ids)  # queue order is id order
        assert sorted(ids) == sorted(a.msg_id for a in acks)
        # ...and id order is the order the connection sent them in (found by bench/relay.py
        # fan-out: pipelined group SENDs reached the members out of the sender's order)
        assert [a.msg_id for a in acks] == sorted(ids)
        assert [j.message.body for j in queued] == [b"m%d" % i for i in range(6)]


@pytest_twisted.ensureDeferred
async def test_one_to_one_sends_behind_a_waiting_group_send_keep_the_connection_order(
    tmp_path: Path,
) -> None:
    """send_now (what a session calls) takes a 1:1 SEND's id at once, without a coroutine,
    only when no earlier SEND of the connection waits for its group lookup: otherwise the
    1:1 SEND would take an id before the group SEND sent ahead of it."""
    async with held_service(tmp_path) as (_, gid, groups, service, caller):
        first = service.send_now(caller, Send(b"a" * 16, ConvKind.USER, 2, ContentType.TEXT, b"1"))
        kinds = [ConvKind.GROUP, ConvKind.USER, ConvKind.GROUP, ConvKind.USER]
        later = [
            service.send_now(
                caller,
                Send(
                    bytes([i + 1]) * 16,
                    kind,
                    gid if kind == ConvKind.GROUP else 2,
                    ContentType.TEXT,
                    b"m%d" % i,
                ),
            )
            for i, kind in enumerate(kinds)
        ]
        assert len(groups.held) == 2 and service._id_gates.get(caller) is not None
        await groups.release_in_reverse()
        acks = await gatherResults([first, *later])
        assert [a.msg_id for a in acks] == sorted(a.msg_id for a in acks)
        assert not service._id_gates  # nothing left waiting: the next 1:1 SEND is direct


@pytest_twisted.ensureDeferred
async def test_a_store_failure_is_unavailable_not_internal(tmp_path: Path) -> None:
    """Found by bench/chaos.py: during a Redis restart, group SENDs got INTERNAL (500)."""
    backend = SQLiteBackend(tmp_path / "db.sqlite3", reactor=reactor)
    await backend.start()
    try:
        gid = await backend.groups.create(1, "team", (2,), 1)

        class Down(HeldLookups):
            def info(self, group_id: int) -> Deferred[GroupInfo | None]:
                d: Deferred[GroupInfo | None] = Deferred()
                d.errback(ConnectionRefusedError("redis restarting"))
                return d

        service = ChatService(
            IdGenerator(1), backend.queue, backend.inbox, backend.history,
            Down(backend.groups), Hub(),
        )  # fmt: skip
        send = Send(b"u" * 16, ConvKind.GROUP, gid, ContentType.TEXT, b"x")
        with pytest.raises(RequestError) as raised:
            await service.send(Caller(1, "phone"), send)
        assert raised.value.code == ErrorCode.UNAVAILABLE
        refused = Send(b"v" * 16, ConvKind.GROUP, gid + 1000, ContentType.TEXT, b"x")
        with pytest.raises(RequestError) as raised:  # a deliberate answer passes through
            await ChatService(
                IdGenerator(1), backend.queue, backend.inbox, backend.history,
                backend.groups, Hub(),
            ).send(Caller(1, "phone"), refused)  # fmt: skip
        assert raised.value.code == ErrorCode.NOT_FOUND
    finally:
        await backend.close()
