"""RabbitQueue beyond the contract suite: many confirms in flight, requeue on failure, a
consumer dying mid-job, dedup (resend, concurrent resend, stale/failed pending keys),
reconnection after the TCP connection drops, poison messages, partitions.

Needs RabbitMQ and Redis (tests/support/services.py: skipped if absent, failing under
CI). Each test uses its own prefix; its queues, exchange and Redis keys are deleted
afterwards. Only this test's own connection is ever dropped.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pika
import pytest
import pytest_twisted
import txredisapi
from pika.adapters.twisted_connection import TwistedChannel
from pika.exceptions import AMQPError, ChannelClosedByBroker, ChannelWrongStateError, NackError

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ConnectionAborted
from twisted.internet.task import deferLater

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto_server.model import Accepted, PersistJob, QueuedJob, StateJob
from improto_server.production.amqp_connection import (
    MIN_BROKER_VERSION,
    QueueMismatch,
    broker_version,
)
from improto_server.production.amqp_jobs import (
    BATCH_TYPE,
    DEAD_QUEUE_ARGUMENTS,
    JOB_TYPE,
    MIXED_TYPE,
    NOTIFY_QUEUE_ARGUMENTS,
    decode_message,
    pack_jobs,
    partition_of,
    persist_queue_arguments,
    queue_names,
)
from improto_server.production.rabbit_notify import RabbitNotifyQueue, notify_queue_name
from improto_server.production.rabbit_queue import NotPublished, RabbitQueue
from tests.support import services
from tests.support.clock import START_MS
from tests.support.recorder import Recorder
from tests.support.services import needs
from tests.support.waiting import eventually, sleep

_ids = itertools.count(5_000_000)


def job(
    sender: int = 1,
    conv: int = 2,
    *,
    cmid: bytes | None = None,
    body: bytes = b"hi",
    kind: int = ConvKind.USER,
) -> PersistJob:
    mid = next(_ids)
    m = Message(
        mid, START_MS + mid, sender, "phone", kind, conv, ContentType.TEXT,
        cmid or mid.to_bytes(16, "big"), body,
    )  # fmt: skip
    return PersistJob(m, (sender, conv) if kind == ConvKind.USER else (sender,))


def accept(q: RabbitQueue, j: PersistJob) -> Deferred[Accepted]:
    return q.accept(j, j.message.client_msg_id)


@pytest.fixture
@needs("rabbitmq", "redis")
def make_queue() -> Iterator[Callable[..., RabbitQueue]]:
    """`make_queue(prefix=None, **kw)`: an unstarted RabbitQueue (a fresh prefix unless one is
    given); every queue made is closed, and every prefix cleaned, afterwards."""
    made: list[RabbitQueue] = []
    prefixes: dict[str, int] = {}

    def make(prefix: str | None = None, **kw: Any) -> RabbitQueue:
        prefix = prefix or f"improto-rabbit-test-{uuid.uuid4().hex[:12]}"
        kw = {"redis_host": services.REDIS.host, "redis_port": services.REDIS.port, **kw}
        q = RabbitQueue(services.AMQP_URL, prefix=prefix, **kw)
        prefixes[prefix] = max(prefixes.get(prefix, 1), q.partitions)
        made.append(q)
        return q

    try:
        yield make
    finally:
        for q in made:
            pytest_twisted.blockon(q.close())
        for prefix, partitions in prefixes.items():
            services.delete_queue_prefix(prefix, partitions)


@pytest.fixture
@needs("redis")
def redis() -> Iterator[Any]:
    client = txredisapi.lazyConnectionPool(
        services.REDIS.host, services.REDIS.port, poolsize=1, charset=None, convertNumbers=False
    )
    yield client
    pytest_twisted.blockon(client.disconnect())


async def consuming_one(q: RabbitQueue) -> tuple[Recorder, PersistJob]:
    """Start `q` consuming into a Recorder and see one job through: (the recorder, the job)."""
    await q.start()
    rec = Recorder()
    q.consume(rec)
    first = job()
    await accept(q, first)
    await eventually(lambda: rec.done == [first])
    return rec, first


async def redis_now_ms(redis: Any) -> int:
    sec, usec = await redis.execute_command("TIME")
    return int(sec) * 1000 + int(usec) // 1000


# --------------------------------------------------------------------------- confirms


@pytest_twisted.ensureDeferred
async def test_two_thousand_accepts_in_flight_are_all_confirmed_and_consumed_once(make_queue):
    q = make_queue(partitions=4)
    await q.start()
    jobs = [job(sender=1 + i % 7, conv=100 + i % 50) for i in range(2000)]
    results = await DeferredList([accept(q, j) for j in jobs], fireOnOneErrback=True)
    accepted = [r for _, r in results]
    assert accepted == [Accepted(j.message.msg_id, j.message.server_time, False) for j in jobs]
    # Every confirm stands for a queued message (one AMQP message carries up to 128 jobs).
    assert await q.backlog() == q.published >= 2000 / 128

    rec = Recorder()
    q.consume(rec)
    await eventually(lambda: len(rec.done) >= 2000)
    await sleep(0.3)  # nothing more arrives
    counts = Counter(rec.calls)
    assert set(counts) == {j.message.msg_id for j in jobs}
    assert set(counts.values()) == {1}
    assert {j: j for j in rec.done} == {j: j for j in jobs}  # intact
    assert await q.backlog() == 0


@pytest_twisted.ensureDeferred
async def test_partitions_keep_each_conversation_in_order(make_queue):
    q = make_queue(partitions=4)
    await q.start()
    sent = [job(sender=1, conv=10 + i % 6) for i in range(60)]  # interleaved conversations
    for j in sent:
        await accept(q, j)
    assert len({q.partition(j) for j in sent}) > 1  # the test spans several queues
    assert all(q.partition(j) == partition_of(str(j.history_key), 4) for j in sent)

    rec = Recorder()
    q.consume(rec)
    await eventually(lambda: len(rec.done) >= len(sent))
    for conv in range(10, 16):
        mine = [j.message.msg_id for j in sent if j.message.conv_id == conv]
        assert [m for m in rec.done_ids() if m in set(mine)] == mine


def mark(user: int, peer: int, msg_id: int) -> StateJob:
    return StateJob(StateJob.MARK, user, ConvKind.USER, peer, msg_id, "phone")


@pytest_twisted.ensureDeferred
async def test_state_jobs_go_to_their_conversations_partition_in_order(make_queue):
    q = make_queue(partitions=4)
    await q.start()
    sent: list[QueuedJob] = []
    for i in range(36):  # a message from the peer, then user 1 marks it read
        m = job(sender=10 + i % 6, conv=1)
        await accept(q, m)
        read = mark(1, 10 + i % 6, m.message.msg_id)
        await q.accept_state(read)
        assert q.partition(read) == q.partition(m)
        sent += [m, read]
    assert len({q.partition(j) for j in sent}) > 1

    got: list[QueuedJob] = []

    def handler(batch: Sequence[QueuedJob]) -> Deferred[None]:
        got.extend(batch)
        return succeed(None)

    q.consume(handler, max_batch=10)
    await eventually(lambda: len(got) >= len(sent))
    for peer in range(10, 16):
        mine = [j for j in sent if j.history_key.b == peer]
        assert [j for j in got if j.history_key.b == peer] == mine


@pytest_twisted.ensureDeferred
async def test_only_a_batch_with_a_state_job_gets_the_new_message_type(make_queue):
    """Messages alone keep the type every earlier version reads (BATCH_TYPE)."""
    q = make_queue()
    await q.start()
    plain = job()
    await accept(q, plain)
    # Accepted in one reactor turn: one message (a message's accept reaches the publisher
    # only after its Redis claim, so it would not share the state jobs' turn).
    marks = [mark(1, 2, 7), mark(2, 1, 8)]
    await DeferredList([q.accept_state(j) for j in marks], fireOnOneErrback=True)
    conn = q.connection
    assert conn is not None
    ch = await conn.channel()
    # A consumer, not basic.get: a quorum queue with a single active consumer refuses that.
    deliveries, _tag = await ch.basic_consume(q.names.partitions[0], auto_ack=True)
    got = []
    for _ in range(2):
        msg = await deliveries.get()
        got.append((msg.properties.type, decode_message(msg.properties.type, msg.body)))
    ch.close()
    assert got == [(BATCH_TYPE, [plain]), (MIXED_TYPE, marks)]


# --------------------------------------------------------------------- redelivery


@pytest_twisted.ensureDeferred
async def test_failing_handler_gets_the_job_again_in_order_and_nothing_is_lost(make_queue):
    q = make_queue(retry_delay_s=0.1)
    await q.start()
    a, b, c = job(), job(), job()
    rec = Recorder(fail={a.message.msg_id: 1, c.message.msg_id: 2})
    for j in (a, b, c):
        await accept(q, j)
    q.consume(rec)
    await eventually(lambda: len(rec.done) >= 3)
    ids = [j.message.msg_id for j in (a, b, c)]
    assert rec.calls == [ids[0], ids[0], ids[1], ids[2], ids[2], ids[2]]
    assert rec.done == [a, b, c]
    await sleep(0.2)
    assert len(rec.calls) == 6
    assert await q.backlog() == 0


@pytest_twisted.ensureDeferred
async def test_a_consumer_dying_mid_job_hands_the_job_to_the_next_consumer(make_queue):
    prefix = f"improto-rabbit-test-{uuid.uuid4().hex[:12]}"
    first = make_queue(prefix)
    await first.start()
    stuck: Deferred[None] = Deferred()
    seen: list[int] = []

    def hang(batch: Sequence[PersistJob]) -> Deferred[None]:
        seen.extend(j.message.msg_id for j in batch)
        return stuck

    first.consume(hang)
    j = job()
    await accept(first, j)
    await eventually(lambda: seen == [j.message.msg_id])

    # A second persister stands by (single active consumer) until the first one dies.
    second = make_queue(prefix)
    await second.start()
    rec = Recorder()
    second.consume(rec)
    await sleep(0.2)
    assert rec.calls == []

    old = first.connection
    assert old is not None and old.transport is not None
    old.transport.abortConnection()  # the first persister's connection dies, job unacked
    await eventually(lambda: rec.done_ids() == [j.message.msg_id])
    assert rec.done == [j]

    # The first one reconnects; its late handler result is dropped, not acked.
    await eventually(lambda: first.connection is not None and first.connection is not old)
    stuck.callback(None)
    await sleep(0.2)
    assert seen == [j.message.msg_id]
    assert rec.calls == [j.message.msg_id]
    assert await second.backlog() == 0


# -------------------------------------------------------------------------- dedup


@pytest_twisted.ensureDeferred
async def test_resend_returns_the_original_ids_and_publishes_nothing(make_queue, redis):
    q = make_queue(dedup_ttl_ms=3_600_000)
    await q.start()
    cmid = b"\x00\xffresend-key-012"
    original = job(sender=9, cmid=cmid)
    first = await q.accept(original, cmid)
    assert first == Accepted(original.message.msg_id, original.message.server_time, False)
    again = await q.accept(job(sender=9, cmid=cmid, body=b"other"), cmid)
    assert again == Accepted(first.msg_id, first.server_time, duplicate=True)
    # Another sender with the same client id is another message.
    assert not (await q.accept(job(sender=10, cmid=cmid), cmid)).duplicate
    assert await q.backlog() == 2

    key = q.dedup_key(9, cmid)
    assert key == f"{q.prefix}:dedup:{{s9}}:{cmid.hex()}"
    record = await redis.execute_command("HGETALL", key)
    fields = dict(zip(record[::2], record[1::2], strict=True))
    assert fields == {
        b"state": b"confirmed",
        b"msg_id": str(first.msg_id).encode(),
        b"time": str(first.server_time).encode(),
    }
    ttl = await redis.execute_command("PTTL", key)
    assert 3_500_000 < ttl <= 3_600_000


@pytest_twisted.ensureDeferred
async def test_concurrent_resends_accept_one_message(make_queue):
    q = make_queue()
    await q.start()
    cmid = b"C" * 16
    attempts = [job(sender=3, cmid=cmid) for _ in range(5)]
    results = await DeferredList([q.accept(j, cmid) for j in attempts], fireOnOneErrback=True)
    accepted = [r for _, r in results]
    assert sum(not a.duplicate for a in accepted) == 1
    assert len({(a.msg_id, a.server_time) for a in accepted}) == 1
    assert await q.backlog() == 1


async def _plant(redis: Any, key: str, state: str, at: int, j: PersistJob) -> None:
    """A dedup record as an accept leaves it when its gateway dies (pending: between the
    claim and the publish; failed: after a publish whose outcome is unknown)."""
    m = j.message
    await redis.execute_command(
        "HSET", key, "state", state, "owner", "dead-gateway", "at", at,
        "msg_id", m.msg_id, "time", m.server_time, "job", j.to_bytes(),
    )  # fmt: skip
    await redis.execute_command("PEXPIRE", key, 60_000)


@pytest.mark.parametrize(("state", "age_ms"), [("pending", 60_000), ("failed", 0)])
@pytest_twisted.ensureDeferred
async def test_a_stale_or_failed_claim_is_republished_on_resend(make_queue, redis, state, age_ms):
    q = make_queue()
    await q.start()
    cmid = b"S" * 16
    lost = job(sender=4, cmid=cmid, body=b"claimed, never published")
    key = q.dedup_key(4, cmid)
    await _plant(redis, key, state, await redis_now_ms(redis) - age_ms, lost)

    started = time.monotonic()
    resend = await q.accept(job(sender=4, cmid=cmid, body=b"resend"), cmid)
    assert time.monotonic() - started < 1.0  # no waiting for a dead publisher
    assert resend == Accepted(lost.message.msg_id, lost.message.server_time, duplicate=True)
    assert await redis.execute_command("HGET", key, "state") == b"confirmed"

    rec = Recorder()
    q.consume(rec)
    await eventually(lambda: bool(rec.done))
    assert rec.done == [lost]  # the stored job, not the resend
    # Settled now: a further resend publishes nothing.
    assert (await q.accept(job(sender=4, cmid=cmid), cmid)).duplicate
    await sleep(0.2)
    assert rec.done == [lost]


@pytest_twisted.ensureDeferred
async def test_a_young_pending_claim_is_waited_for_then_taken_over(make_queue, redis):
    q = make_queue(stale_pending_ms=1000)
    await q.start()
    cmid = b"Y" * 16
    lost = job(sender=5, cmid=cmid)
    key = q.dedup_key(5, cmid)
    await _plant(redis, key, "pending", await redis_now_ms(redis), lost)

    started = time.monotonic()
    resend = await q.accept(job(sender=5, cmid=cmid), cmid)
    waited = time.monotonic() - started
    assert 0.8 < waited < 3.0  # it polled until the claim went stale
    assert resend == Accepted(lost.message.msg_id, lost.message.server_time, duplicate=True)
    assert await q.backlog() == 1


@pytest_twisted.ensureDeferred
async def test_a_nacked_publish_fails_and_the_retry_republishes_the_same_message(
    make_queue, redis, monkeypatch
):
    q = make_queue()
    await q.start()
    publish = TwistedChannel.basic_publish

    def nacked(self: TwistedChannel, *args: Any, **kw: Any) -> Deferred[Any]:
        publish(self, *args, **kw)  # the broker may well have it: the outcome is unknown
        d: Deferred[Any] = Deferred()
        d.errback(NackError([]))
        return d

    monkeypatch.setattr(TwistedChannel, "basic_publish", nacked)
    cmid = b"N" * 16
    first = job(sender=6, cmid=cmid)
    with pytest.raises(NackError):
        await q.accept(first, cmid)
    monkeypatch.undo()
    key = q.dedup_key(6, cmid)
    assert await redis.execute_command("HGET", key, "state") == b"failed"

    retry = await q.accept(job(sender=6, cmid=cmid), cmid)
    assert retry == Accepted(first.message.msg_id, first.message.server_time, duplicate=True)
    rec = Recorder()
    q.consume(rec)
    await eventually(lambda: len(rec.done) == 2)
    assert rec.done == [first, first]  # two copies of one message, written once by msg_id


@pytest_twisted.ensureDeferred
async def test_a_publish_never_sent_frees_the_key_for_a_fresh_accept(
    make_queue, redis, monkeypatch
):
    q = make_queue()
    await q.start()

    def refused(self: TwistedChannel, *args: Any, **kw: Any) -> Deferred[Any]:
        raise ChannelWrongStateError("channel is closing")

    monkeypatch.setattr(TwistedChannel, "basic_publish", refused)
    cmid = b"R" * 16
    with pytest.raises(NotPublished):
        await q.accept(job(sender=7, cmid=cmid), cmid)
    monkeypatch.undo()
    assert await redis.execute_command("EXISTS", q.dedup_key(7, cmid)) == 0

    second = job(sender=7, cmid=cmid)
    assert not (await q.accept(second, cmid)).duplicate
    rec = Recorder()
    q.consume(rec)
    await eventually(lambda: bool(rec.done))
    await sleep(0.2)
    assert rec.done == [second]


# ---------------------------------------------------------------------- reconnect


@pytest_twisted.ensureDeferred
async def test_accepts_and_consumption_resume_after_the_connection_drops(make_queue, monkeypatch):
    q = make_queue(partitions=2, publish_batch=4)  # 50 accepts: 13 or more messages
    rec, before = await consuming_one(q)

    # Drop our own TCP connection right after the 10th publish (of 50 concurrent accepts,
    # coalesced 4 at most per message) was handed to pika: it and those handed over before
    # the loss is noticed stay unconfirmed (outcome unknown) and fail; accepts flushed on the
    # closed channel fail as never published; the later ones wait for the reconnection.
    old = q.connection
    assert old is not None and old.transport is not None
    publish = TwistedChannel.basic_publish
    published: list[bytes] = []

    def publish_then_drop(self: TwistedChannel, *args: Any, **kw: Any) -> Deferred[Any]:
        d = publish(self, *args, **kw)
        published.append(args[2])
        if len(published) == 10:
            old.transport.abortConnection()
        return d

    monkeypatch.setattr(TwistedChannel, "basic_publish", publish_then_drop)
    racing = [job(sender=20 + i, conv=2) for i in range(50)]
    outcomes = await DeferredList([accept(q, j) for j in racing], consumeErrors=True)
    monkeypatch.undo()
    await eventually(lambda: q.connection is not None and q.connection is not old)
    assert q.connections == 2
    failed = [j for j, (ok, _) in zip(racing, outcomes, strict=True) if not ok]
    assert failed  # those handed to pika before the loss was noticed (with the claims
    # coalesced per reactor turn that can be all 50); accepts after the reconnection: below

    # Each client whose accept failed retries: same client id, a new message. The first
    # message may be queued already, so the retry re-publishes it and returns its ids.
    final: dict[bytes, Accepted] = {}
    unknown = 0
    for j, (ok, result) in zip(racing, outcomes, strict=True):
        cmid = j.message.client_msg_id
        if ok:
            final[cmid] = result
            assert result == Accepted(j.message.msg_id, j.message.server_time, False)
        else:
            retry = job(sender=j.message.sender_id, conv=2, cmid=cmid)
            final[cmid] = await q.accept(retry, cmid)
            if isinstance(result.value, NotPublished):  # never reached the broker: fresh
                assert final[cmid] == Accepted(retry.message.msg_id, retry.message.server_time,
                                               False)  # fmt: skip
            else:  # outcome unknown: the stored job is re-published, same ids
                assert final[cmid] == Accepted(j.message.msg_id, j.message.server_time, True)
                unknown += 1
    assert unknown >= 1  # the batch handed to pika before the drop
    after = [job(conv=3) for _ in range(5)]
    for j in after:
        await accept(q, j)

    expected = {a.msg_id for a in final.values()} | {j.message.msg_id for j in after}
    await eventually(lambda: expected <= set(rec.done_ids()))
    await sleep(0.3)
    # One msg_id per client message id: a copy published twice is the same msg_id (the
    # persister writes it once), never a second message.
    by_cmid: dict[bytes, set[int]] = {}
    for d in rec.done:
        by_cmid.setdefault(d.message.client_msg_id, set()).add(d.message.msg_id)
    assert all(len(ids) == 1 for ids in by_cmid.values())
    assert set(rec.done_ids()) == expected | {before.message.msg_id}
    assert await q.backlog() == 0


@pytest_twisted.ensureDeferred
async def test_a_queue_deleted_under_the_consumer_is_declared_again(make_queue):
    q = make_queue()
    rec, first = await consuming_one(q)
    old = q.connection
    assert old is not None
    ch = await old.channel()
    try:
        await ch.queue_delete(q.names.partitions[0])  # the broker cancels our consumer
    except (ConnectionAborted, AMQPError):
        pass  # the queue reset its connection before the Delete-Ok arrived
    await eventually(lambda: q.connection is not None and q.connection is not old)
    second = job()
    await accept(q, second)
    await eventually(lambda: rec.done == [first, second])


# ------------------------------------------------------------------------- poison


@pytest_twisted.ensureDeferred
async def test_an_undecodable_message_is_dead_lettered_and_the_queue_moves_on(make_queue):
    q = make_queue()
    await q.start()
    conn = q.connection
    assert conn is not None
    ch = await conn.channel()
    await ch.basic_publish(
        "", q.names.partitions[0], b"\x00\x00\x00\x05garbage",
        pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, message_id="bad"),
    )  # fmt: skip
    ch.close()
    good = job()
    await accept(q, good)
    rec = Recorder()
    q.consume(rec)
    await eventually(lambda: rec.done == [good])
    names = queue_names(q.prefix, 1)
    conn = q.connection
    assert conn is not None
    ch = await conn.channel()
    # a quorum queue dead-letters at least once, after the nack, by an internal confirmed
    # publish: the dead queue shows the message a moment later
    count, deadline = 0, reactor.seconds() + 10
    while count == 0 and reactor.seconds() < deadline:
        frame = await ch.queue_declare(names.dead_queue, passive=True)
        count = frame.method.message_count
        if count == 0:
            await deferLater(reactor, 0.05, lambda: None)
    ch.close()
    assert count == 1
    assert await q.backlog() == 0


# ------------------------------------------------------------------------- batching


def test_a_batch_body_carries_its_jobs_in_order_and_bad_bodies_are_refused():
    jobs = [job(body=bytes([i]) * i) for i in range(1, 5)]
    body = pack_jobs([j.to_bytes() for j in jobs])
    assert decode_message(BATCH_TYPE, body) == jobs
    one = jobs[0].to_bytes()
    assert decode_message(JOB_TYPE, one) == [jobs[0]]  # what an older version published
    assert decode_message(None, one) == [jobs[0]]
    for bad in (b"", body[:-1], body + b"\x00", b"\x00\x00\x00\x00" + body, body[:3]):
        with pytest.raises(ValueError):
            decode_message(BATCH_TYPE, bad)
    mixed: list[QueuedJob] = [jobs[0], mark(1, 2, 5), jobs[1]]
    assert decode_message(MIXED_TYPE, pack_jobs([j.to_bytes() for j in mixed])) == mixed
    with pytest.raises(ValueError):
        decode_message(MIXED_TYPE, pack_jobs([mark(1, 2, 5).to_bytes()[:-1]]))


@pytest_twisted.ensureDeferred
async def test_accepts_in_one_reactor_turn_share_messages_and_arrive_once(make_queue):
    q = make_queue(publish_batch=16)
    await q.start()
    sent = [job() for _ in range(40)]
    results = await DeferredList([accept(q, j) for j in sent], fireOnOneErrback=True)
    assert all(ok for ok, _ in results)
    assert 3 <= q.published < 40  # coalesced: at most 16 jobs per message
    rec = Recorder()
    q.consume(rec, max_batch=7)
    await eventually(lambda: len(rec.done) >= 40)
    # Concurrent accepts have no order among themselves (the claims travel over several
    # Redis connections); each job arrives intact, exactly once.
    assert sorted(rec.done_ids()) == sorted(j.message.msg_id for j in sent)
    assert {j.message.msg_id: j for j in rec.done} == {j.message.msg_id: j for j in sent}
    await sleep(0.2)
    assert len(rec.calls) == 40 and await q.backlog() == 0


# -------------------------------------------------------------------- quorum queues


def declared_type(name: str, arguments: dict[str, object]) -> str:
    """The type of the existing queue `name`, as the broker tells it: declaring it again with
    exactly `arguments` must succeed (RabbitMQ compares every argument), and with only the
    type changed to classic it answers 406 naming the type it has."""
    conn = services.amqp_connection()
    try:
        conn.channel().queue_declare(name, durable=True, arguments=arguments)
        try:
            conn.channel().queue_declare(
                name, durable=True, arguments={**arguments, "x-queue-type": "classic"}
            )
        except ChannelClosedByBroker as e:
            assert e.reply_code == 406
            found = re.search(r"arg 'x-queue-type'.* current is '(\w+)'", e.reply_text)
            assert found, e.reply_text
            return found.group(1)
        return "classic"
    finally:
        conn.close()


def listed_types(names: Sequence[str]) -> dict[str, str] | None:
    """`rabbitmqctl list_queues name type` for these queues, when rabbitmqctl is here and the
    broker is on this machine (None otherwise)."""
    tool = shutil.which("rabbitmqctl")
    if tool is None or services.RABBITMQ.host not in ("127.0.0.1", "localhost"):
        return None
    try:
        out = subprocess.run(
            [tool, "-q", "list_queues", "name", "type"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    rows = dict(line.split("\t")[:2] for line in out.splitlines() if line.count("\t") >= 1)
    return {name: rows.get(name, "missing") for name in names}


@pytest_twisted.ensureDeferred
async def test_the_persist_dead_letter_and_notify_queues_are_quorum_queues(make_queue):
    q = make_queue(partitions=3)
    await q.start()
    notify = RabbitNotifyQueue(services.AMQP_URL, prefix=q.prefix)  # cleaned with the prefix
    try:
        await notify.start()
    finally:
        await notify.close()
    names = q.names
    expected = {name: persist_queue_arguments(names.dead_exchange) for name in names.partitions}
    expected[names.dead_queue] = DEAD_QUEUE_ARGUMENTS
    expected[notify.name] = NOTIFY_QUEUE_ARGUMENTS
    assert {name: declared_type(name, args) for name, args in expected.items()} == dict.fromkeys(
        expected, "quorum"
    )
    listed = listed_types(list(expected))
    assert listed is None or listed == dict.fromkeys(expected, "quorum")
    assert persist_queue_arguments(names.dead_exchange) == {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-dead-letter-exchange": names.dead_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def declare_old_topology(prefix: str) -> None:
    """The queues of prefix as an improto version before quorum queues declared them (classic,
    the same names), with one job waiting in P.persist.0 and one in P.notify."""
    names = queue_names(prefix, 1)
    conn = services.amqp_connection()
    try:
        ch = conn.channel()
        ch.exchange_declare(names.dead_exchange, exchange_type="fanout", durable=True)
        ch.queue_declare(names.dead_queue, durable=True)
        ch.queue_bind(names.dead_queue, names.dead_exchange)
        ch.queue_declare(
            names.partitions[0], durable=True,
            arguments={"x-dead-letter-exchange": names.dead_exchange,
                       "x-single-active-consumer": True},
        )  # fmt: skip
        ch.queue_declare(
            notify_queue_name(prefix), durable=True, arguments={"x-single-active-consumer": True}
        )
        ch.confirm_delivery()
        persistent = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
        for queue in (names.partitions[0], notify_queue_name(prefix)):
            ch.basic_publish("", queue, pack_jobs([job().to_bytes()]), persistent)
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_classic_queues_of_an_earlier_version_fail_start_with_how_to_migrate(
    make_queue, logs
):
    prefix = f"improto-rabbit-test-{uuid.uuid4().hex[:12]}"
    q = make_queue(prefix)  # registers the prefix for cleanup before anything is declared
    declare_old_topology(prefix)

    started = time.monotonic()
    with pytest.raises(QueueMismatch) as refused:
        await q.start()
    assert time.monotonic() - started < 5.0  # at once, not after the 30 s start timeout
    assert "delete_queue" in str(refused.value)
    hint = [line for line in logs if "RabbitMQ refused to declare queue" in line]
    assert hint and f"{prefix}.persist.dead" in hint[0]  # the first queue declared
    assert "classic queue" in hint[0] and "docs/SERVICES.md" in hint[0]
    assert "drain" in hint[0] and "rabbitmqctl delete_queue" in hint[0]

    notify = RabbitNotifyQueue(services.AMQP_URL, prefix=prefix)
    try:
        with pytest.raises(QueueMismatch):
            await notify.start()
    finally:
        await notify.close()
    assert any(f"queue {prefix}.notify as a quorum queue" in line for line in logs)

    # Nothing was touched: the old queues and their jobs are still there, still classic.
    old = [f"{prefix}.persist.0", f"{prefix}.notify"]
    assert services.queued_messages(old) == 2
    listed = listed_types([*old, f"{prefix}.persist.dead"])
    assert listed is None or set(listed.values()) == {"classic"}
    await q.close()

    # The migration: (drained,) deleted, started again: quorum queues.
    services.delete_queues(prefix)
    again = make_queue(prefix)
    await again.start()
    assert declared_type(again.names.partitions[0], persist_queue_arguments(
        again.names.dead_exchange)) == "quorum"  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_requeued_deliveries_come_back_in_order_behind_more_than_a_few(make_queue):
    """Quorum queues return requeued messages ahead of the rest, in their order, also with
    hundreds outstanding (checked here with one job per message: 300 deliveries on hand)."""
    q = make_queue(publish_batch=1, retry_delay_s=0.1)
    await q.start()
    sent = [job() for _ in range(300)]
    for j in sent:
        await accept(q, j)
    assert q.published == 300
    failing = sent[40].message.msg_id
    rec = Recorder(fail={failing: 2})
    q.consume(rec, max_batch=16)
    await eventually(lambda: len(rec.done) >= 300, timeout=20)
    assert rec.done == sent  # in order, each once, after two requeues of 260 deliveries
    assert rec.calls.count(failing) == 3
    await sleep(0.2)
    assert len(rec.done) == 300 and await q.backlog() == 0


def test_the_broker_version_is_read_from_its_start_properties():
    class Proto:
        def __init__(self, version: object) -> None:
            self._impl = type("Impl", (), {"server_properties": {"version": version}})()

    assert broker_version(Proto("3.10.8")) == (3, 10, 8)
    assert broker_version(Proto(b"4.0.0-rc.2")) == (4, 0, 0)
    assert broker_version(Proto(None)) is None
    assert broker_version(Proto("3.9.29")) < MIN_BROKER_VERSION
