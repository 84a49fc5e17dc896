"""Per-user rate limits (PROTOCOL.md 9.4) and the persister's row-bounded store rounds."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater

from improto.enums import ContentType, ConvKind
from improto.errors import ErrorCode
from improto.frames import GroupAdd, GroupCreate, GroupRemove, Message, MyGroups, Send
from improto_server.config import Config
from improto_server.embedded.backend import SQLiteBackend
from improto_server.embedded.inbox import SQLiteInbox
from improto_server.hub import Hub
from improto_server.ids import IdGenerator
from improto_server.model import PersistJob
from improto_server.persister import MAX_ROWS, ROW_UNIT_BYTES, Persister, rounds, row_weight
from improto_server.production.redis_inbox import RedisInbox
from improto_server.rate_limits import DAY_S, RateLimits, TokenBuckets
from improto_server.service import Caller, ChatService, RequestError

# --------------------------------------------------------------------------- token buckets


def test_a_bucket_admits_its_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    b = TokenBuckets(2.0, 5.0, clock)
    assert [b.try_take("u", 1) for _ in range(5)] == [0.0] * 5
    assert b.try_take("u", 1) == pytest.approx(0.5)  # one token comes back in 1/rate s
    assert b.level("u") == pytest.approx(0.0)  # a refused take takes nothing
    clock.advance(0.5)
    assert b.try_take("u", 1) == 0.0
    assert b.try_take("u", 1) == pytest.approx(0.5)
    clock.advance(100)
    assert b.level("u") == 5.0  # never above the burst
    assert b.try_take("other", 5) == 0.0  # each key has its own bucket


def test_weights_are_costs_and_one_request_above_the_burst_leaves_a_debt() -> None:
    clock = Clock()
    b = TokenBuckets(10.0, 20.0, clock)
    assert b.try_take("u", 15.5) == 0.0
    assert b.wait("u", 5) == pytest.approx(0.05)  # 4.5 held, 5 needed
    clock.advance(10)
    assert b.try_take("u", 50) == 0.0  # dearer than the burst, admitted when full
    assert b.level("u") == pytest.approx(-30.0)
    assert b.wait("u", 1) == pytest.approx(3.1)  # the debt is repaid first
    clock.advance(3.2)
    assert b.try_take("u", 1) == 0.0


def test_full_buckets_are_dropped_and_memory_is_bounded() -> None:
    clock = Clock()
    b = TokenBuckets(1.0, 2.0, clock, max_keys=50)
    for key in range(10):
        b.take(key, 1)
    assert len(b) == 10
    clock.advance(1.0)  # all full again: the next takes drop the oldest ones
    for key in range(100, 110):
        b.take(key, 1)
    assert len(b) == 10  # 0..9 went, two at a time
    assert all(b.level(k) == 2.0 for k in range(10))  # a dropped bucket is a full bucket
    for key in range(1000, 3000):  # none refills before the next: the cap decides
        b.take(key, 1)
    assert len(b) == 50
    assert b.level(2999) == 1.0  # the most recently used are the ones kept
    assert b.level(1000) == 2.0  # forgotten: only ever more lenient


def test_give_back_undoes_a_take() -> None:
    clock = Clock()
    b = TokenBuckets(1.0, 3.0, clock)
    b.take("u", 2)
    b.give_back("u", 1)
    assert b.level("u") == pytest.approx(2.0)
    b.give_back("u", 1)
    assert len(b) == 0
    b.give_back("u", 1)  # nothing to give back: no bucket above full
    assert b.level("u") == 3.0


def test_negative_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBuckets(-1.0, 1.0, Clock())
    with pytest.raises(ValueError):
        TokenBuckets(1.0, float("nan"), Clock())


def test_a_group_send_weighs_by_members_and_bytes_by_receivers() -> None:
    clock = Clock()
    config = Config(send_rate=1.0, send_burst=100.0, send_bytes_rate=1000.0,
                    send_bytes_burst=10_000.0)  # fmt: skip
    limits = RateLimits(config, clock)
    assert limits.send(1, None, 2, 10) == 0.0
    assert limits.sends.level(1) == pytest.approx(99.0)
    assert limits.send_bytes.level(1) == pytest.approx(10_000 - 20)
    assert limits.send(1, 1001, 1001, 0) == 0.0  # 1 + 1001 / 100
    assert limits.sends.level(1) == pytest.approx(99.0 - 11.01)
    # the bytes bucket refuses: neither bucket is charged
    assert limits.send(1, None, 2, 6000) == pytest.approx(0.02)  # min(12000, burst) - 9980
    assert limits.sends.level(1) == pytest.approx(99.0 - 11.01)


# --------------------------------------------------------------------------- the service

ALICE, BOB = Caller(1, "phone"), Caller(2, "phone")


class Harness:
    def __init__(self, backend: SQLiteBackend, clock: Clock, config: Config) -> None:
        self.backend = backend
        self.clock = clock
        self.service = ChatService(
            IdGenerator(1), backend.queue, backend.inbox, backend.history, backend.groups,
            Hub(), limits=RateLimits(config, clock),
        )  # fmt: skip

    async def queued(self, n: int) -> list[PersistJob]:
        """The jobs the queue holds, once there are `n` (consumes them)."""
        got: list[PersistJob] = []

        def record(batch: Sequence[PersistJob]) -> Deferred[None]:
            got.extend(batch)
            return succeed(None)

        self.backend.queue.consume(record, max_batch=100)
        for _ in range(200):
            if len(got) >= n:
                break
            await deferLater(reactor, 0.01, lambda: None)
        await deferLater(reactor, 0.05, lambda: None)  # and no more
        return got


@pytest_twisted.async_yield_fixture()
async def make(tmp_path: Path) -> AsyncIterator[object]:
    backends: list[SQLiteBackend] = []

    async def build(**settings: float) -> Harness:
        backend = SQLiteBackend(tmp_path / f"db{len(backends)}.sqlite3", reactor=reactor)
        await backend.start()
        backends.append(backend)
        return Harness(backend, Clock(), replace(Config(), **settings))

    yield build
    for b in backends:
        await b.close()


def send(cmid: bytes, body: bytes = b"hi", to: int = BOB.user_id,
         kind: ConvKind = ConvKind.USER) -> Send:  # fmt: skip
    return Send(cmid * 16, kind, to, ContentType.TEXT, body)


async def refused(work: object, code: ErrorCode = ErrorCode.RATE_LIMITED) -> RequestError:
    with pytest.raises(RequestError) as raised:
        await work  # type: ignore[misc]
    assert raised.value.code == code
    return raised.value


@pytest_twisted.ensureDeferred
async def test_a_send_too_fast_is_refused_with_a_retry_after_and_leaves_nothing(make) -> None:
    h = await make(send_rate=2.0, send_burst=2.0)
    a1 = await h.service.send(ALICE, send(b"a"))
    a2 = await h.service.send(ALICE, send(b"b"))
    err = await refused(h.service.send(ALICE, send(b"c")))
    assert err.text.startswith("retry_after_ms=500 ")  # PROTOCOL.md 9.4: machine-readable
    assert [j.message.msg_id for j in await h.queued(3)] == [a1.msg_id, a2.msg_id]
    await h.service.send(BOB, send(b"c"))  # another user is not affected
    h.clock.advance(0.5)
    again = await h.service.send(ALICE, send(b"c"))  # the same client_msg_id
    assert again.duplicate == 0  # the refused SEND was not remembered
    assert again.msg_id > a2.msg_id


@pytest_twisted.ensureDeferred
async def test_a_group_send_weighs_by_its_members(make) -> None:
    h = await make(send_rate=1.0, send_burst=10.0)
    gid = (await h.service.group_create(ALICE, GroupCreate("big", tuple(range(10, 459))))).group_id
    await h.service.send(ALICE, send(b"g", to=gid, kind=ConvKind.GROUP))  # weighs 5.5
    err = await refused(h.service.send(ALICE, send(b"h", to=gid, kind=ConvKind.GROUP)))
    assert err.text.startswith("retry_after_ms=1000 ")  # 4.5 held, 5.5 needed
    await h.service.send(ALICE, send(b"i"))  # a 1:1 SEND weighs 1


@pytest_twisted.ensureDeferred
async def test_group_changes_are_rate_limited_but_leaving_is_not(make) -> None:
    h = await make(group_op_rate=0.5, group_op_burst=2.0)
    g1 = (await h.service.group_create(ALICE, GroupCreate("one", (2,)))).group_id
    await h.service.group_add(ALICE, GroupAdd(g1, (3,)))
    err = await refused(h.service.group_create(ALICE, GroupCreate("two", ())))
    assert err.text.startswith("retry_after_ms=2000 ")
    await refused(h.service.group_remove(ALICE, GroupRemove(g1, (2,))))
    assert len((await h.service.my_groups(ALICE, MyGroups())).groups) == 1  # no effect
    await h.service.group_remove(ALICE, GroupRemove(g1, (1,)))  # leaving is free
    h.clock.advance(2.0)
    await h.service.group_create(ALICE, GroupCreate("two", ()))


@pytest_twisted.ensureDeferred
async def test_being_added_by_others_is_bounded_per_day(make) -> None:
    h = await make(added_by_others_per_day=2, group_op_burst=100.0)
    victim = 9
    adders = [Caller(u, "d") for u in (1, 2, 3, 4)]
    await h.service.group_create(adders[0], GroupCreate("a", (victim, 5)))
    g2 = (await h.service.group_create(adders[1], GroupCreate("b", ()))).group_id
    await h.service.group_add(adders[1], GroupAdd(g2, (victim,)))
    await h.service.group_add(adders[1], GroupAdd(g2, (victim,)))  # already in: not counted
    err = await refused(h.service.group_create(adders[2], GroupCreate("c", (7, victim))),
                        ErrorCode.LIMIT_EXCEEDED)  # fmt: skip
    assert str(victim) in err.text
    assert (await h.service.my_groups(adders[2], MyGroups())).groups == ()  # refused whole
    g4 = (await h.service.group_create(adders[3], GroupCreate("d", ()))).group_id
    await refused(h.service.group_add(adders[3], GroupAdd(g4, (victim, 8))),
                  ErrorCode.LIMIT_EXCEEDED)  # fmt: skip
    assert h.service.limits.added.level(8) == 2.0  # a refused request counts nobody
    victim_caller = Caller(victim, "d")
    await h.service.group_create(victim_caller, GroupCreate("mine", ()))  # one's own: free
    h.clock.advance(DAY_S / 2 + 1)  # one more group's worth of allowance
    await h.service.group_add(adders[3], GroupAdd(g4, (victim,)))
    groups = (await h.service.my_groups(victim_caller, MyGroups())).groups
    assert len(groups) == 4


# --------------------------------------------------------------------------- the persister


def _job(msg_id: int, users: tuple[int, ...], kind: ConvKind = ConvKind.GROUP) -> PersistJob:
    m = Message(msg_id, 1_750_000_000_000, 1, "d", kind, 77, ContentType.TEXT, b"c" * 16, b"x")
    return PersistJob(m, users)


def test_store_rounds_are_bounded_by_rows_not_jobs() -> None:
    small = [_job(i, (1, 2), ConvKind.USER) for i in range(1, 8)]  # 3 rows each
    big = _job(100, tuple(range(1, 24)))  # 24 rows
    out = list(rounds([*small[:3], big, *small[3:]], 10))
    for inbox, history in out:
        assert sum(len(j.inbox_users) for j in inbox) + len(history) <= 10
    # every receiver of every job once, in batch order; each history row once
    entries = [(j.message.msg_id, u) for inbox, _ in out for j in inbox for u in j.inbox_users]
    want = [(j.message.msg_id, u) for j in [*small[:3], big, *small[3:]] for u in j.inbox_users]
    assert entries == want
    hist = [j.message.msg_id for _, history in out for _, j in history]
    assert hist == [1, 2, 3, 100, 4, 5, 6, 7]
    # 3 small (9 rows); big: 9 + history, 10, 4 (joined by 2 small: 10); 2 small (6)
    assert [len(inbox) for inbox, _ in out] == [3, 1, 1, 3, 2]
    assert list(rounds([], 10)) == []


def test_store_rounds_weigh_rows_by_their_bytes() -> None:
    def sized(msg_id: int, users: tuple[int, ...], size: int) -> PersistJob:
        m = Message(msg_id, 1_750_000_000_000, 1, "d", ConvKind.USER, 77, 2,
                    b"c" * 16, b"\xab" * size)  # fmt: skip
        return PersistJob(m, users)

    big = [sized(i, (1, 2), 65_000) for i in range(1, 11)]  # 3 rows of weight 16 each
    assert row_weight(big[0]) == 16 and row_weight(_job(99, (1,))) == 1
    out = list(rounds(big, MAX_ROWS, ROW_UNIT_BYTES))
    for inbox, history in out:
        weight = sum((len(j.inbox_users) + 1) * row_weight(j) for j in inbox)
        assert weight <= MAX_ROWS and len(inbox) == len(history)
    assert [len(inbox) for inbox, _ in out] == [5, 5]  # 5 x 48 = 240 <= 250
    fan = sized(50, tuple(range(1, 41)), 65_000)  # 41 rows of 16: 15 receivers a round
    parts = list(rounds([fan, big[0]], MAX_ROWS, ROW_UNIT_BYTES))
    # 14 and the history row; 15; the last 11 joined by the next job
    assert [len(p.inbox_users) for inbox, _ in parts for p in inbox] == [14, 15, 11, 2]
    assert [len(h) for _, h in parts] == [1, 0, 1]
    fan_users = [u for inbox, _ in parts for p in inbox if p.message.msg_id == 50
                 for u in p.inbox_users]  # fmt: skip
    assert fan_users == list(range(1, 41))


def test_only_a_store_that_asks_gets_byte_weighted_rounds() -> None:
    big = [Message(i, 1_750_000_000_000, 1, "d", ConvKind.USER, 77, 2, b"c" * 16,
                   b"\xab" * 65_000) for i in range(1, 11)]  # fmt: skip
    jobs = [PersistJob(m, (1, 2)) for m in big]
    assert [len(i) for i, _ in rounds(jobs, MAX_ROWS)] == [10]  # 30 rows: one round
    assert len(list(rounds(jobs, MAX_ROWS, ROW_UNIT_BYTES))) == 2
    assert SQLiteInbox.ROUND_ROW_UNIT_BYTES == ROW_UNIT_BYTES
    assert not hasattr(RedisInbox, "ROUND_ROW_UNIT_BYTES")


@pytest_twisted.ensureDeferred
async def test_the_persister_writes_a_batch_in_row_bounded_rounds(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "db.sqlite3", reactor=reactor)
    await backend.start()
    try:
        members = tuple(range(1, 41))
        jobs = [_job(1000 + i, members) for i in range(5)]
        persister = Persister(backend.queue, backend.inbox, backend.history, max_rows=25)
        await persister.handle(jobs)
        assert persister.rounds == 10  # 41 rows per job: two rounds each

        def counts(db: sqlite3.Connection) -> tuple[int, int, int]:
            one = "SELECT count(*), count(DISTINCT user_id), count(DISTINCT msg_id) FROM inbox"
            return db.execute(one).fetchone()  # type: ignore[no-any-return]

        assert await backend.db.call(counts) == (200, 40, 5)  # every entry once
        history = await backend.db.call(lambda db: db.execute(
            "SELECT count(*) FROM history").fetchone()[0])  # fmt: skip
        assert history == 5
    finally:
        await backend.close()
