"""The persister over each backend: a crash between its two writes duplicates nothing."""

from __future__ import annotations

from collections.abc import Sequence

import pytest_twisted

from twisted.internet.defer import Deferred

from improto_server.model import ConvKey, PersistJob
from improto_server.persister import Persister
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
        page = await backend.inbox.page(user, 0, 200)
        assert page_ids(page) == ids  # once each, in order
    history = await backend.history.page(ConvKey.direct(1, 2), 0, 100, 0)
    assert page_ids(history) == ids[::-1]
    assert persister.crashed == set(ids)
