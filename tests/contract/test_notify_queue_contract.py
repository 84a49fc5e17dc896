"""NotifyQueue contract: durable puts, ordered at-least-once delivery in batches, retries,
redelivery after a restart."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest_twisted

from twisted.internet.defer import Deferred

from improto import records
from improto_server.model import DeviceNotifyJob, PersistJob
from tests.support.recorder import Recorder

PORT = "notify_queue"


def _queue(backend):
    return backend.current.notify_queue


@pytest_twisted.ensureDeferred
async def test_put_jobs_come_intact_in_order(backend, jobs, wait_for):
    queued = [jobs.job(1, 2, 3, sender=1, body=f"m{i}".encode()) for i in range(30)]
    await _queue(backend).put(queued[:10])
    for job in queued[10:]:
        await _queue(backend).put([job])
    await _queue(backend).put([])  # nothing to queue: fine
    rec = Recorder()
    _queue(backend).consume(rec, max_batch=8)
    await wait_for(lambda: len(rec.done) >= len(queued))
    assert rec.done == queued
    assert rec.calls == [j.message.msg_id for j in queued]  # each exactly once
    assert all(1 <= n <= 8 for n in rec.batches)


@pytest_twisted.ensureDeferred
async def test_device_jobs_come_intact_in_order_among_messages(backend, jobs, wait_for):
    """A gateway's DeviceNotifyJob (an unacknowledged PUSH) travels with the persister's
    jobs: alone, or in one put with them."""

    def device(user: int, device_id: str) -> DeviceNotifyJob:
        return DeviceNotifyJob.of(user, device_id, records.record_of(jobs.message(sender=9)))

    first = device(2, "phone")
    mixed = [jobs.job(1, 2), device(3, "t\u00e9l\u00e9phone"), jobs.job(2, 3)]
    await _queue(backend).put([first])
    await _queue(backend).put(mixed)
    rec = Recorder()
    _queue(backend).consume(rec, max_batch=8)
    await wait_for(lambda: len(rec.done) >= 4)
    assert rec.done == [first, *mixed]
    got = rec.done[2]
    assert isinstance(got, DeviceNotifyJob) and got.record == mixed[1].record


@pytest_twisted.ensureDeferred
async def test_idle_consumer_is_woken_by_put(backend, jobs, wait_for):
    rec = Recorder()
    _queue(backend).consume(rec)
    for i in range(3):
        started = time.monotonic()
        await _queue(backend).put([jobs.job()])
        await wait_for(lambda n=i + 1: len(rec.done) == n, timeout=0.3)
        assert time.monotonic() - started < 0.3
    assert len(rec.calls) == 3


@pytest_twisted.ensureDeferred
async def test_failed_batches_are_retried_in_order_without_loss(backend, jobs, wait_for):
    """A failed batch comes again with what followed it, in order; jobs handled before it
    may come again too (put together, they travel together: handlers are idempotent)."""
    queued = [jobs.job() for _ in range(20)]
    for i in range(0, 20, 4):
        await _queue(backend).put(queued[i : i + 4])
    ids = [j.message.msg_id for j in queued]
    rec = Recorder(fail={ids[12]: 2})
    _queue(backend).consume(rec, max_batch=5)
    await wait_for(lambda: ids[-1] in rec.done_ids(), timeout=10)
    assert list(dict.fromkeys(rec.done_ids())) == ids
    # Every batch, failed or not, is a run of consecutive jobs starting at or before the first
    # job not yet done: delivery resumes at or before a failed batch, nothing overtakes it.
    done, failures, pos = 0, 2, 0
    for n in rec.batches:
        batch, pos = rec.calls[pos : pos + n], pos + n
        start = ids.index(batch[0])
        assert 1 <= n <= 5 and start <= done and batch == ids[start : start + n]
        if ids[12] in batch and failures:
            failures -= 1
        else:
            done = max(done, start + n)
    assert (done, failures, pos) == (20, 0, len(rec.calls))


@pytest_twisted.ensureDeferred
async def test_put_jobs_survive_a_restart(backend, jobs, wait_for):
    queued = [jobs.job() for _ in range(3)]
    await _queue(backend).put(queued)
    await backend.restart()
    rec = Recorder()
    _queue(backend).consume(rec)
    await wait_for(lambda: len(rec.done) >= 3)
    assert rec.done == queued


@pytest_twisted.ensureDeferred
async def test_unfinished_batch_is_redelivered_after_restart(backend, jobs, wait_for):
    first, second = jobs.job(), jobs.job()
    await _queue(backend).put([first])
    await _queue(backend).put([second])
    in_flight: Deferred[None] = Deferred()
    seen: list[int] = []

    def stuck(batch: Sequence[PersistJob]) -> Deferred[None]:
        seen.extend(job.message.msg_id for job in batch)
        return in_flight

    _queue(backend).consume(stuck)
    await wait_for(lambda: len(seen) == 1)
    restarted = backend.restart()
    in_flight.errback(RuntimeError("notifier went away (on purpose)"))
    await restarted
    assert seen == [first.message.msg_id]

    rec = Recorder()
    _queue(backend).consume(rec)
    await wait_for(lambda: len(rec.done) >= 2)
    assert rec.done == [first, second]


@pytest_twisted.ensureDeferred
async def test_close_waits_for_the_in_flight_handler_and_acks_it(backend, jobs, wait_for):
    job = jobs.job()
    await _queue(backend).put([job])
    in_flight: Deferred[None] = Deferred()
    seen: list[int] = []

    def handler(batch: Sequence[PersistJob]) -> Deferred[None]:
        seen.extend(j.message.msg_id for j in batch)
        return in_flight

    _queue(backend).consume(handler)
    await wait_for(lambda: bool(seen))
    closed = _queue(backend).close()
    fired: list[bool] = []
    closed.addCallback(lambda _: fired.append(True))
    assert not fired  # still waiting for the handler
    in_flight.callback(None)
    await closed
    assert fired == [True]

    await backend.restart()
    rec = Recorder()
    _queue(backend).consume(rec)
    sentinel = jobs.job()
    await _queue(backend).put([sentinel])
    await wait_for(lambda: bool(rec.done))
    assert rec.done == [sentinel]  # the handled job did not come again
