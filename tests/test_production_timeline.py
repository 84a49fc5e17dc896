"""The production TimelineStore (Redis + HBase) beyond the contract suite: seqs kept across
redeliveries, the Cluster split, done only after the HBase write, the index's trim and rank
below it, the keys' TTLs and the rows' layout.

Needs Redis and HBase (tests/support/services.py: skipped if absent, failing under CI). Each
test uses its own key prefix and table and deletes them afterwards.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import happybase
import pytest
import pytest_twisted

from twisted.internet.defer import Deferred, fail, gatherResults

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto.records import message_of
from improto_server.model import ConvKey, PersistJob, TimelineRecords
from improto_server.production.hbase_history import HBaseHistory, conversation_prefix
from improto_server.production.redis_connection import connect
from improto_server.production.redis_slots import key_slot
from improto_server.production.redis_timeline import DAY_MS
from improto_server.production.timeline import ProductionTimeline, seq_of, timeline_prefix
from tests.contract.pages import ANY_SIZE, format_one
from tests.support import services
from tests.support.clock import HISTORY_RETENTION_MS, START_MS, FakeClock
from tests.support.services import needs

INDEX = 5  # msg_ids indexed per group here (TIMELINE_INDEX in production)


@dataclass
class Env:
    redis: Any
    prefix: str
    clock: FakeClock
    history: HBaseHistory
    hbase: happybase.Connection

    def timeline(self, prefix: str = "", **kw: Any) -> ProductionTimeline:
        kw.setdefault("index_size", INDEX)
        return ProductionTimeline(self.redis, self.history, self.prefix + prefix, **kw)

    def command(self, *args: Any) -> Deferred[Any]:
        return self.redis.execute_command(*args)


@pytest.fixture
@needs("redis", "hbase")
def env() -> Iterator[Env]:
    prefix = f"improto-test-timeline:{uuid.uuid4().hex}"
    table = f"improto_test_{uuid.uuid4().hex[:12]}"
    redis = connect(services.REDIS.host, services.REDIS.port)
    clock = FakeClock()
    # The fake clock is not wall time: no family TTL, retention is the read filter.
    history = HBaseHistory(
        services.HBASE.host, services.HBASE.port, table, now_ms=clock,
        retention_ms=HISTORY_RETENTION_MS, family_ttl=False,
    )  # fmt: skip
    pytest_twisted.blockon(history.start())
    conn = services.hbase_connection()
    try:
        yield Env(redis, prefix, clock, history, conn)
    finally:
        pytest_twisted.blockon(history.close())
        pytest_twisted.blockon(redis.disconnect())
        conn.close()
        services.delete_redis_prefix(prefix)
        services.drop_hbase_tables([table])


@pytest.fixture
def timeline(env: Env) -> ProductionTimeline:
    tl = env.timeline()
    pytest_twisted.blockon(tl.start())
    return tl


_ids = itertools.count(1_000_000)


def job(group: int, *, msg_id: int | None = None, server_time: int = START_MS,
        body: bytes = b"hello") -> PersistJob:  # fmt: skip
    mid = next(_ids) if msg_id is None else msg_id
    m = Message(
        mid, server_time, 1, "phone-1", ConvKind.GROUP, group, ContentType.TEXT,
        mid.to_bytes(16, "big"), body,
    )  # fmt: skip
    return PersistJob(m, ())


def ids(page: TimelineRecords) -> list[int]:
    return [message_of(r).msg_id for r in page.records]


async def every(tl: ProductionTimeline, group: int) -> TimelineRecords:
    return await tl.after(group, 0, 1000, ANY_SIZE)


# ------------------------------------------------------------------------------- seqs


@pytest_twisted.ensureDeferred
async def test_seqs_are_kept_across_redeliveries_within_and_across_calls(timeline):
    a, b, c = job(7), job(7), job(8)
    assert await timeline.append([a, c, b, a]) == [1, 1, 2, 1]
    assert await timeline.append([b, job(7, msg_id=a.message.msg_id), c]) == [2, 1, 1]
    d = job(7)
    assert await timeline.append([a, d]) == [1, 3]  # nothing burnt by the redeliveries
    page = await every(timeline, 7)
    assert (page.first_seq, page.done, page.has_more) == (1, 3, False)
    assert ids(page) == [a.message.msg_id, b.message.msg_id, d.message.msg_id]
    heads = await timeline.heads([8, 7, 9])
    assert list(heads) == [7, 8]
    assert (heads[7].done, heads[7].last_msg_id, heads[7].last) == (3, d.message.msg_id, d.record)


@pytest_twisted.ensureDeferred
async def test_concurrent_appends_of_one_group_get_distinct_consecutive_seqs(timeline):
    batches = [[job(3), job(4), job(3)] for _ in range(10)]
    got = await gatherResults([timeline.append(b) for b in batches])
    seqs3 = sorted(s for batch in got for s in (batch[0], batch[2]))
    assert seqs3 == list(range(1, 21))
    assert sorted(batch[1] for batch in got) == list(range(1, 11))
    # each append ran after the previous one touching its groups: seqs follow call order
    assert [batch[0] for batch in got] == list(range(1, 21, 2))
    page = await every(timeline, 3)
    assert page.done == 20 and len(page.records) == 20
    assert timeline._locks == {}  # none left behind


@pytest_twisted.ensureDeferred
async def test_cluster_mode_splits_calls_by_slot_with_the_same_result(env, timeline):
    clustered = env.timeline(":c", cluster=True)  # other keys, the same table: other groups
    await clustered.start()
    calls: list[list[str]] = []
    original = clustered.redis._assign_call

    def spy(groups, hexes):  # type: ignore[no-untyped-def]
        calls.append([k for g in groups for k in clustered.redis.keys(g)])
        return original(groups, hexes)

    clustered.redis._assign_call = spy  # type: ignore[method-assign]
    groups = range(100, 140)
    batch = [job(g) for g in groups] + [job(g + 1000) for g in groups]
    plain = [job(g + 2000, msg_id=j.message.msg_id) for g, j in zip(groups, batch, strict=False)]
    got = await clustered.append(batch)
    assert got == [1] * len(batch)
    assert len(calls) > 2 and all(len({key_slot(k) for k in keys}) == 1 for keys in calls)
    assert await timeline.append(plain) == [1] * len(plain)
    heads = await clustered.heads([*groups, *(g + 1000 for g in groups)])
    assert len(heads) == 80 and all(h.done == 1 for h in heads.values())
    assert ids(await every(clustered, 100)) == [batch[0].message.msg_id]


# ------------------------------------------------------------------------------- done


@pytest_twisted.ensureDeferred
async def test_done_moves_only_after_the_hbase_write(env, timeline, monkeypatch):
    first = job(5)
    await timeline.append([first])
    jobs = [job(5), job(5)]
    real = env.history.put_rows
    monkeypatch.setattr(env.history, "put_rows", lambda rows: fail(OSError("HBase is down")))
    with pytest.raises(OSError):
        await timeline.append(jobs)
    page = await every(timeline, 5)
    assert (page.done, ids(page)) == (1, [first.message.msg_id])
    assert (await timeline.heads([5]))[5].last_msg_id == first.message.msg_id
    assert timeline._locks == {}
    monkeypatch.setattr(env.history, "put_rows", real)
    assert await timeline.append(jobs) == [2, 3]  # the retry gets the seqs of the first try
    page = await every(timeline, 5)
    assert page.done == 3 and ids(page) == [j.message.msg_id for j in [first, *jobs]]


@pytest_twisted.ensureDeferred
async def test_a_redelivery_below_done_leaves_the_head(timeline):
    a, b = job(6), job(6)
    await timeline.append([a, b])
    assert await timeline.append([a]) == [1]
    head = (await timeline.heads([6]))[6]
    assert (head.done, head.last_msg_id) == (2, b.message.msg_id)


# ------------------------------------------------------------------------ index, rank


@pytest_twisted.ensureDeferred
async def test_the_index_keeps_the_highest_msg_ids_and_rank_counts_below_it(env, timeline):
    jobs = [job(9, msg_id=100 + i) for i in range(1, 9)]  # ids 101..108, seqs 1..8
    assert await timeline.append(jobs) == list(range(1, 9))
    head, ix = timeline.redis.keys(9)
    members = await env.command("ZRANGE", ix, 0, -1)
    assert members == [b"%016x:%d" % (100 + s, s) for s in range(4, 9)]  # INDEX = 5 kept
    assert int(await env.command("HGET", head, "cut")) == 3
    # exact at and above the lowest kept id: the seq of the newest message at or below
    for s in range(4, 9):
        assert await timeline.rank(9, 100 + s) == s
    assert await timeline.rank(9, 10**6) == 8
    # below it: what was cut counts as below (at least the truth: unread a lower bound)
    assert await timeline.rank(9, 102) == 3
    assert await timeline.rank(9, 1) == 3
    assert await timeline.rank(10, 105) == 0  # no timeline
    # an indexed msg_id keeps its seq; one cut from the index gets a new one
    assert await timeline.append([jobs[7], jobs[3]]) == [8, 4]
    assert await timeline.append([jobs[0]]) == [9]


@pytest_twisted.ensureDeferred
async def test_rank_counts_by_msg_id_when_ids_do_not_rise_with_seq(timeline):
    # two gateways' clocks: seq order 1..5 carries ids 10, 30, 20, 50, 40
    await timeline.append([job(2, msg_id=m) for m in (10, 30, 20, 50, 40)])
    for read, n in ((5, 0), (10, 1), (20, 2), (25, 2), (30, 3), (45, 4), (50, 5), (60, 5)):
        assert await timeline.rank(2, read) == n, read
    # a sixth id, INDEX = 5: 10 is cut; at or above the lowest kept id the count stays exact
    await timeline.append([job(2, msg_id=60)])
    assert [await timeline.rank(2, r) for r in (20, 40, 60)] == [2, 4, 6]
    assert await timeline.rank(2, 5) == 1  # below the index: at least the true count (0)


# ----------------------------------------------------------------------- TTLs, rows


@pytest_twisted.ensureDeferred
async def test_the_index_expires_after_the_last_append_and_the_head_never(env, timeline):
    """The index gets retention + a margin, refreshed by every append; the head has no TTL,
    so seqs go on after the group was idle past retention, and what the expired index held
    counts as read."""
    await timeline.append([job(4), job(4)])
    head, ix = timeline.redis.keys(4)
    ttl = HISTORY_RETENTION_MS + DAY_MS
    await env.command("PEXPIRE", ix, 1000)
    await timeline.append([job(4)])  # refreshed by every append
    assert ttl - 60_000 < await env.command("PTTL", ix) <= ttl
    assert await env.command("PTTL", head) == -1
    assert sorted(services.redis_keys(env.prefix)) == sorted(k.encode() for k in (head, ix))
    await env.command("DEL", ix)  # as its TTL would, the group idle past retention
    later = job(4)
    assert await timeline.append([later]) == [4]
    assert await timeline.rank(4, later.message.msg_id) == 4
    assert await timeline.rank(4, later.message.msg_id - 1) == 3  # the expired ones: read


@pytest_twisted.ensureDeferred
async def test_rows_sit_under_the_timeline_prefix_in_seq_order(env, timeline):
    jobs = [job(12, body=b"x" * n) for n in (1, 300, 2)]
    await timeline.append(jobs)
    await env.history.append_many([(ConvKey.group(12), j) for j in jobs])  # the history row
    table = env.hbase.table(env.history.table_name)
    rows = list(table.scan(row_prefix=timeline_prefix(12)))
    assert [seq_of(r) for r, _ in rows] == [1, 2, 3]
    for (_, cells), j in zip(rows, jobs, strict=True):
        assert cells[b"m:v"] == j.stored_record and cells[b"m:s"] == b"%d" % len(j.record)
        assert cells[b"m:t"] == b"%016x" % j.message.server_time
    history = list(table.scan(row_prefix=conversation_prefix(ConvKey.group(12))))
    assert len(history) == 3 and not timeline_prefix(12).startswith(b"g")
    assert conversation_prefix(ConvKey.group(12)) != timeline_prefix(12)


# ------------------------------------------------------------------------------ pages


@pytest_twisted.ensureDeferred
async def test_pages_stop_at_a_seq_past_retention(env, timeline):
    old = env.clock.now - HISTORY_RETENTION_MS - 1  # past retention already
    times = [START_MS, old, START_MS, old, old, START_MS]  # a clock that stepped back
    jobs = [job(1, server_time=t) for t in times]
    await timeline.append(jobs)
    got: list[tuple[int, list[int], bool]] = []
    after = 0
    while True:
        page = await timeline.after(1, after, 10, ANY_SIZE)
        got.append((page.first_seq, ids(page), page.has_more))
        if not page.records:
            break
        after = page.first_seq + len(page.records) - 1
    m = [j.message.msg_id for j in jobs]
    assert got == [(1, [m[0]], True), (3, [m[2]], True), (6, [m[5]], False), (7, [], False)]


@pytest_twisted.ensureDeferred
async def test_budget_limit_and_has_more(timeline):
    jobs = [job(11, body=b"b" * 1000) for _ in range(4)]
    await timeline.append(jobs)
    size = len(jobs[0].record)
    page = await timeline.after(11, 0, 10, 2 * size)
    assert (page.first_seq, len(page.records), page.has_more) == (1, 2, True)
    page = await timeline.after(11, 0, 10, size - 1)  # at least one
    assert (len(page.records), page.has_more) == (1, True)
    page = await timeline.after(11, 1, 3, ANY_SIZE)
    assert (page.first_seq, len(page.records), page.has_more) == (2, 3, False)
    page = await timeline.after(11, 4, 3, ANY_SIZE)
    assert page == TimelineRecords(5, (), False, 4)
    assert await timeline.after(99, 0, 3, ANY_SIZE) == TimelineRecords(1, (), False, 0)


@pytest_twisted.ensureDeferred
async def test_format_one_records_read_back_as_message_records(timeline):
    j = job(13)
    await timeline.append([format_one(j)])
    assert (await every(timeline, 13)).records == (j.record,)
    assert (await timeline.heads([13]))[13].last == j.record


@pytest_twisted.ensureDeferred
async def test_a_message_that_is_not_a_group_message_is_refused(timeline):
    direct = PersistJob(dataclasses.replace(job(1).message, conv_kind=ConvKind.USER), ())
    with pytest.raises(ValueError):
        await timeline.append([direct])
    assert await timeline.heads([1]) == {}
