"""The persister over each backend: a crash between its two writes duplicates nothing."""

from __future__ import annotations

from collections.abc import Sequence

import pytest_twisted

from twisted.internet.defer import Deferred

from improto.enums import ConvKind
from improto_server.model import ConvKey, PersistJob
from improto_server.persister import Persister
from tests.contract.pages import ANY_SIZE
from tests.contract.pages import ids as page_ids

PORT = "persister"  # all of queue, inbox and history at once


class DiesAfterInbox(Persister):
    """Writes the inbox, then fails before the history write and the queue ack, once per job:
    what a persister killed at that moment leaves behind."""

    def __init__(self, *args, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kw)
        self.crashed: set[int] = set()

    def handle(self, jobs: Sequence[PersistJob]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._maybe_die(jobs))

    async def _maybe_die(self, jobs: Sequence[PersistJob]) -> None:
        fresh = [j.message.msg_id for j in jobs if j.message.msg_id not in self.crashed]
        if fresh:
            self.crashed.update(fresh)
            await self.inbox.append_many(jobs)
            raise RuntimeError("persister died after the inbox write (on purpose)")
        await super().handle(jobs)


@pytest_twisted.ensureDeferred
async def test_redelivery_after_a_crash_writes_nothing_twice(backend, jobs, wait_for):
    persister = DiesAfterInbox(backend.queue, backend.inbox, backend.history)
    persister.start()
    sent = [jobs.job(1, 2, sender=1, conv_id=2) for _ in range(3)]
    for i, job in enumerate(sent):
        await backend.queue.accept(job, bytes([i]) * 16)
    await wait_for(lambda: persister.persisted == 3, timeout=20)

    ids = [j.message.msg_id for j in sent]
    for user in (1, 2):
        page = await backend.inbox.page(user, 0, 200, ANY_SIZE)
        assert page_ids(page) == ids  # once each, in order
    history = await backend.history.page(ConvKey.direct(1, 2), 0, 100, 0, ANY_SIZE)
    assert page_ids(history) == ids[::-1]
    assert persister.crashed == set(ids)


@pytest_twisted.ensureDeferred
async def test_a_batch_is_written_in_rounds_bounded_by_rows(backend, jobs, wait_for):
    """Issue 12: a store round holds at most max_rows rows, a job for more receivers is split
    by receivers; every inbox still gets each message once, in acceptance order."""
    members = tuple(range(1, 13))
    sent = [
        jobs.job(*members, conv_kind=ConvKind.GROUP, conv_id=7),
        jobs.job(1, 2, sender=1, conv_id=2),
        jobs.job(*members, conv_kind=ConvKind.GROUP, conv_id=7),
    ]
    persister = Persister(backend.queue, backend.inbox, backend.history, max_rows=5)
    persister.start()
    for i, job in enumerate(sent):
        await backend.queue.accept(job, bytes([i]) * 16)
    await wait_for(lambda: persister.persisted == 3, timeout=20)

    assert persister.rounds >= 6  # 13 + 3 + 13 rows, 5 at most per round
    for user, want in ((1, sent), (2, sent), (12, sent[::2])):
        page = await backend.inbox.page(user, 0, 200, ANY_SIZE)
        assert page_ids(page) == [j.message.msg_id for j in want]
    history = await backend.history.page(ConvKey.group(7), 0, 100, 0, ANY_SIZE)
    assert page_ids(history) == [sent[2].message.msg_id, sent[0].message.msg_id]
