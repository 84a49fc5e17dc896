"""The memory queue beyond the contract suite (which runs it as its `memory` row): dedup keys
expire with the inbox retention through the backend's sweep, the health check counts its
jobs, and a job that does not encode is refused alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto_server.embedded.backend import SQLiteBackend
from improto_server.embedded.memory_queue import MemoryQueue
from improto_server.model import PersistJob, QueuedJob
from tests.support.clock import INBOX_RETENTION_MS, FakeClock


def job(sender: int, msg_id: int, body: bytes = b"hi") -> PersistJob:
    m = Message(
        msg_id=msg_id, server_time=1_000 + msg_id, sender_id=sender, sender_device="d",
        conv_kind=ConvKind.USER, conv_id=sender + 1, content_type=ContentType.TEXT,
        client_msg_id=msg_id.to_bytes(16, "big"), body=body,
    )  # fmt: skip
    return PersistJob(m, (sender, sender + 1))


@pytest.fixture
def memory() -> tuple[SQLiteBackend, FakeClock]:
    clock = FakeClock()
    backend = SQLiteBackend(":memory:", now_ms=clock, inbox_retention_ms=INBOX_RETENTION_MS)
    pytest_twisted.blockon(backend.start())
    yield backend, clock
    pytest_twisted.blockon(backend.close())


def test_memory_storage_gets_the_memory_queue(memory):
    backend, _ = memory
    assert isinstance(backend.queue, MemoryQueue)


@pytest_twisted.ensureDeferred
async def test_dedup_keys_expire_with_the_inbox_retention(memory):
    backend, clock = memory
    queue = backend.queue
    first = await queue.accept(job(1, 10), b"a" * 16)
    clock.advance(1_000)
    await queue.accept(job(1, 11), b"b" * 16)
    assert (await queue.accept(job(1, 12), b"a" * 16)).duplicate
    clock.advance(INBOX_RETENTION_MS - 500)  # the first key is older than the retention
    counts = await backend.sweep()
    assert counts["dedup"] == 1
    again = await queue.accept(job(1, 13), b"a" * 16)
    assert not again.duplicate and again.msg_id == 13 != first.msg_id
    assert (await queue.accept(job(1, 14), b"b" * 16)).duplicate  # younger: kept


@pytest_twisted.ensureDeferred
async def test_health_counts_the_jobs_not_yet_persisted(memory):
    backend, _ = memory
    for i in range(3):
        await backend.queue.accept(job(2, 20 + i), bytes([i]) * 16)
    health = await backend.health()
    assert health.queue_depth == 3
    delivered: list[QueuedJob] = []
    done: Deferred[None] = Deferred()

    def handler(batch: list[QueuedJob]) -> Deferred[None]:
        delivered.extend(batch)
        if len(delivered) == 3 and not done.called:
            reactor.callLater(0, done.callback, None)
        return succeed(None)

    backend.queue.consume(handler, 10)
    await done
    assert [j.message.msg_id for j in delivered] == [20, 21, 22]  # type: ignore[union-attr]
    assert (await backend.health()).queue_depth == 0


@pytest_twisted.ensureDeferred
async def test_a_job_that_does_not_encode_is_refused_alone(memory):
    backend, _ = memory
    bad = job(3, 30)
    bad = PersistJob(replace(bad.message, sender_device="x" * 300), bad.inbox_users)
    with pytest.raises(Exception):  # noqa: B017 - whatever the codec raises, it is not kept
        await backend.queue.accept(bad, b"c" * 16)
    assert len(backend.queue) == 0
    ok = await backend.queue.accept(job(3, 31), b"c" * 16)
    assert not ok.duplicate and len(backend.queue) == 1
