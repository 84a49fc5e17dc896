"""PersistQueue contract: dedup, durability, ordered at-least-once delivery, retries; state
jobs (accept_state) queued among the messages of their conversation."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest_twisted

from twisted.internet.defer import Deferred, DeferredList, fail, succeed

from improto.enums import ConvKind
from improto_server.model import Accepted, PersistJob, QueuedJob, StateJob
from improto_server.ports import BatchHandler
from tests.support.recorder import Recorder

PORT = "queue"

CMID_A = b"A" * 16
CMID_B = b"B" * 16


@pytest_twisted.ensureDeferred
async def test_accept_returns_the_message_id_and_time(backend, jobs):
    job = jobs.job()
    accepted = await backend.queue.accept(job, CMID_A)
    assert accepted == Accepted(job.message.msg_id, job.message.server_time, duplicate=False)


@pytest_twisted.ensureDeferred
async def test_duplicate_returns_the_original_and_queues_nothing(backend, jobs, wait_for):
    first = jobs.job(sender=7)
    resend = jobs.job(sender=7, body=b"resent with a new id")
    original = await backend.queue.accept(first, CMID_A)
    backend.advance(1000)
    dup = await backend.queue.accept(resend, CMID_A)
    assert dup == Accepted(original.msg_id, original.server_time, duplicate=True)

    # The same key from another sender is a different message.
    other = jobs.job(sender=8)
    assert not (await backend.queue.accept(other, CMID_A)).duplicate

    rec = Recorder()
    backend.queue.consume(rec)
    await wait_for(lambda: len(rec.done) >= 2)
    # A sentinel accepted last proves nothing else (the resend) was queued before it.
    sentinel = jobs.job(sender=7)
    await backend.queue.accept(sentinel, CMID_B)
    await wait_for(lambda: len(rec.done) >= 3)
    assert rec.done_ids() == [first.message.msg_id, other.message.msg_id, sentinel.message.msg_id]
    assert rec.done[0] == first


@pytest_twisted.ensureDeferred
async def test_consume_delivers_every_job_intact_in_order(backend, jobs, wait_for):
    accepted = [
        jobs.job(1, 2, 3, sender=1, body=f"m{i}".encode(), client_msg_id=bytes([i]) * 16)
        for i in range(30)
    ]
    for job in accepted:
        await backend.queue.accept(job, job.message.client_msg_id)
    rec = Recorder()
    backend.queue.consume(rec)
    await wait_for(lambda: len(rec.done) >= len(accepted))
    assert rec.done == accepted
    assert rec.calls == [j.message.msg_id for j in accepted]  # each exactly once


@pytest_twisted.ensureDeferred
async def test_idle_consumer_is_woken_by_accept(backend, jobs, wait_for):
    rec = Recorder()
    backend.queue.consume(rec)
    for i in range(3):
        job = jobs.job(client_msg_id=bytes([i + 1]) * 16)
        started = time.monotonic()
        await backend.queue.accept(job, job.message.client_msg_id)
        # Well under any polling or retry interval: the accept itself wakes the consumer.
        await wait_for(lambda n=i + 1: len(rec.done) == n, timeout=0.3)
        assert time.monotonic() - started < 0.3
    assert len(rec.calls) == 3


@pytest_twisted.ensureDeferred
async def test_failing_handler_is_retried_without_loss_or_reordering(backend, jobs, wait_for):
    first, second, third = (jobs.job(client_msg_id=bytes([i + 1]) * 16) for i in range(3))
    rec = Recorder(fail={first.message.msg_id: 2})
    for job in (first, second, third):
        await backend.queue.accept(job, job.message.client_msg_id)
    backend.queue.consume(rec)
    await wait_for(lambda: len(rec.done) >= 3, timeout=10)
    ids = [j.message.msg_id for j in (first, second, third)]
    assert rec.calls == [ids[0], ids[0], ids[0], ids[1], ids[2]]
    assert rec.done == [first, second, third]


@pytest_twisted.ensureDeferred
async def test_batches_keep_queue_order_and_are_retried_whole(backend, jobs, wait_for):
    queued = [jobs.job(client_msg_id=bytes([i + 1]) * 16) for i in range(40)]
    for job in queued:
        await backend.queue.accept(job, job.message.client_msg_id)
    ids = [j.message.msg_id for j in queued]
    rec = Recorder(fail={ids[25]: 2})
    backend.queue.consume(rec, max_batch=16)
    await wait_for(lambda: len(rec.done) >= 40, timeout=10)
    assert rec.done == queued  # each exactly once, in queue order
    assert all(1 <= n <= 16 for n in rec.batches)
    # Every batch, failed or not, is a run of consecutive jobs starting at or before the first
    # job not yet done: delivery resumes at or before a failed batch, nothing overtakes it.
    done, failures, pos = 0, 2, 0
    for n in rec.batches:
        batch, pos = rec.calls[pos : pos + n], pos + n
        start = ids.index(batch[0])
        assert start <= done and batch == ids[start : start + n]
        if ids[25] in batch and failures:
            failures -= 1
        else:
            done = max(done, start + n)
    assert (done, failures, pos) == (40, 0, len(rec.calls))


@pytest_twisted.ensureDeferred
async def test_accepted_jobs_survive_a_restart(backend, jobs, wait_for):
    queued = [jobs.job(client_msg_id=bytes([i + 1]) * 16) for i in range(3)]
    for job in queued:
        await backend.queue.accept(job, job.message.client_msg_id)
    await backend.restart()

    # The dedup key is durable too.
    again = await backend.queue.accept(jobs.job(), queued[0].message.client_msg_id)
    assert again == Accepted(queued[0].message.msg_id, queued[0].message.server_time, True)

    rec = Recorder()
    backend.queue.consume(rec)
    await wait_for(lambda: len(rec.done) >= 3)
    assert rec.done == queued


@pytest_twisted.ensureDeferred
async def test_unfinished_job_is_redelivered_after_restart(backend, jobs, wait_for):
    first, second = jobs.job(client_msg_id=CMID_A), jobs.job(client_msg_id=CMID_B)
    await backend.queue.accept(first, CMID_A)
    await backend.queue.accept(second, CMID_B)
    in_flight: Deferred[None] = Deferred()
    seen: list[int] = []

    def stuck(batch: Sequence[PersistJob]) -> Deferred[None]:
        seen.extend(job.message.msg_id for job in batch)
        return in_flight

    backend.queue.consume(stuck)
    await wait_for(lambda: len(seen) == 1)
    # The process goes down while the handler has not confirmed the job.
    restarted = backend.restart()
    in_flight.errback(RuntimeError("store went away (on purpose)"))
    await restarted
    assert seen == [first.message.msg_id]

    rec = Recorder()
    backend.queue.consume(rec)
    await wait_for(lambda: len(rec.done) >= 2)
    assert rec.done == [first, second]


@pytest_twisted.ensureDeferred
async def test_close_waits_for_the_in_flight_handler(backend, jobs, wait_for):
    job = jobs.job()
    await backend.queue.accept(job, CMID_A)
    in_flight: Deferred[None] = Deferred()
    seen: list[int] = []
    backend.queue.consume(_record_into(seen, in_flight))
    await wait_for(lambda: bool(seen))

    closed = backend.queue.close()
    fired: list[bool] = []
    closed.addCallback(lambda _: fired.append(True))
    assert not fired  # still waiting for the handler
    in_flight.callback(None)
    await closed
    assert fired == [True]

    # The handler succeeded before the close completed, so nothing is redelivered.
    await backend.restart()
    rec = Recorder()
    backend.queue.consume(rec)
    sentinel = jobs.job()
    await backend.queue.accept(sentinel, CMID_B)
    await wait_for(lambda: bool(rec.done))
    assert rec.done == [sentinel]


def _record_into(seen: list[int], result: Deferred[None]) -> BatchHandler:
    def handler(batch: Sequence[PersistJob]) -> Deferred[None]:
        seen.extend(job.message.msg_id for job in batch)
        return result

    return handler


@pytest_twisted.ensureDeferred
async def test_concurrent_accepts_are_each_answered_alone(backend, jobs, wait_for):
    """Accepts made at once (group commit may share one transaction or one script call):
    a resend in the same batch is a duplicate, a job that cannot be encoded fails alone."""
    fresh = [jobs.job(client_msg_id=bytes([i + 1]) * 16) for i in range(12)]
    again = jobs.job(client_msg_id=fresh[3].message.client_msg_id, body=b"resent")
    bad = jobs.job(client_msg_id=b"\xee" * 16, body=b"x" * 70_000)  # over a body's u16 length
    calls = [backend.queue.accept(j, j.message.client_msg_id) for j in (*fresh, again, bad)]
    outcomes = await DeferredList(calls, consumeErrors=True)
    *ok, (again_ok, again_result), (bad_ok, _) = outcomes
    assert all(success for success, _ in ok) and not bad_ok
    assert [r for _, r in ok] == [
        Accepted(j.message.msg_id, j.message.server_time, False) for j in fresh
    ]
    assert again_ok and again_result == Accepted(
        fresh[3].message.msg_id, fresh[3].message.server_time, True
    )
    rec = Recorder()
    backend.queue.consume(rec, max_batch=50)
    await wait_for(lambda: len(rec.done) >= 12)
    assert sorted(rec.done_ids()) == sorted(j.message.msg_id for j in fresh)
    sentinel = jobs.job(client_msg_id=b"\xef" * 16)
    await backend.queue.accept(sentinel, sentinel.message.client_msg_id)
    await wait_for(lambda: len(rec.done) >= 13)
    assert rec.done[-1] == sentinel and len(rec.done) == 13  # nothing else was queued


# --------------------------------------------------------------- state jobs (issue 13)


class Kinds:
    """A handler recording the jobs of both kinds it was handed; the first `failures`
    batches holding a StateJob fail whole."""

    def __init__(self, failures: int = 0) -> None:
        self.done: list[QueuedJob] = []
        self.attempts: list[tuple[list[QueuedJob], bool]] = []  # every batch, and if it passed
        self._failures = failures

    def __call__(self, batch: Sequence[QueuedJob]) -> Deferred[None]:
        failing = self._failures > 0 and any(isinstance(j, StateJob) for j in batch)
        self.attempts.append((list(batch), not failing))
        if failing:
            self._failures -= 1
            return fail(RuntimeError("handler failure (on purpose)"))
        self.done.extend(batch)
        return succeed(None)


def _mark(user: int, peer: int, msg_id: int, device: str = "phone-1") -> StateJob:
    return StateJob(StateJob.MARK, user, ConvKind.USER, peer, msg_id, device)


def _hide(user: int, group: int, msg_id: int) -> StateJob:
    return StateJob(StateJob.HIDE, user, ConvKind.GROUP, group, msg_id)


@pytest_twisted.ensureDeferred
async def test_state_jobs_come_in_queue_order_among_the_messages(backend, jobs, wait_for):
    """A mark accepted after a message (and before the next) of its conversation is handed
    over between them, intact; a state job has no dedup key: the same one twice is queued
    twice (applying it twice changes nothing)."""
    m1 = jobs.job(1, 2, sender=2, conv_id=1, client_msg_id=CMID_A)
    m2 = jobs.job(1, 2, sender=2, conv_id=1, client_msg_id=CMID_B)
    read = _mark(1, 2, m1.message.msg_id)
    queued: list[QueuedJob] = [m1, read, m2, read]
    await backend.queue.accept(m1, CMID_A)
    assert await backend.queue.accept_state(read) is None
    await backend.queue.accept(m2, CMID_B)
    await backend.queue.accept_state(read)
    rec = Kinds()
    backend.queue.consume(rec, max_batch=16)
    await wait_for(lambda: len(rec.done) >= 4)
    assert rec.done == queued
    assert isinstance(rec.done[1], StateJob) and rec.done[1].device_id == "phone-1"


@pytest_twisted.ensureDeferred
async def test_an_idle_consumer_is_woken_by_a_state_job(backend, wait_for):
    rec = Kinds()
    backend.queue.consume(rec)
    hide = _hide(3, 9, 12345)
    started = time.monotonic()
    await backend.queue.accept_state(hide)
    await wait_for(lambda: rec.done == [hide], timeout=0.3)
    assert time.monotonic() - started < 0.3


@pytest_twisted.ensureDeferred
async def test_state_jobs_survive_a_restart_and_a_failed_batch_comes_again(backend, jobs, wait_for):
    group = jobs.job(1, 2, 3, sender=1, conv_kind=ConvKind.GROUP, conv_id=9)
    queued: list[QueuedJob] = [_hide(2, 9, 10), group, _mark(3, 1, 11), _hide(2, 9, 12)]
    for job in queued:
        if isinstance(job, StateJob):
            await backend.queue.accept_state(job)
        else:
            await backend.queue.accept(job, CMID_A)
    await backend.restart()

    rec = Kinds(failures=2)
    backend.queue.consume(rec, max_batch=16)
    await wait_for(lambda: len(rec.done) >= len(queued), timeout=10)
    assert rec.done == queued  # each once, in order, after two failed attempts
    # Every attempt starts at or before the first job not yet done, and runs in order.
    done = 0
    for batch, ok in rec.attempts:
        start = queued.index(batch[0])
        assert start <= done and batch == queued[start : start + len(batch)]
        if ok:
            done = max(done, start + len(batch))
    assert done == len(queued)
    assert [ok for _, ok in rec.attempts].count(False) == 2


@pytest_twisted.ensureDeferred
async def test_timeline_jobs_travel_intact_among_the_others(backend, jobs, wait_for):
    """Issue 14: a large group's message (a timeline job, no receivers) is deduplicated and
    delivered like any job, in order with the small-group jobs of its group."""
    group = {"conv_kind": ConvKind.GROUP, "conv_id": 9}
    sent = [
        jobs.job(1, 2, 3, sender=1, **group),
        PersistJob.for_timeline(jobs.message(sender=2, **group)),
        jobs.job(1, 2, 3, sender=3, **group),
        PersistJob.for_timeline(jobs.message(sender=1, **group)),
    ]
    for i, job in enumerate(sent):
        assert not (await backend.queue.accept(job, bytes([i + 1]) * 16)).duplicate
    dup = await backend.queue.accept(
        PersistJob.for_timeline(jobs.message(sender=2, **group)), bytes([2]) * 16
    )
    assert dup.duplicate and dup.msg_id == sent[1].message.msg_id
    rec = Recorder()
    backend.queue.consume(rec, max_batch=10)
    await wait_for(lambda: len(rec.done) >= 4)
    assert rec.done == sent
    assert [j.timeline for j in rec.done] == [False, True, False, True]
