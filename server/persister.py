"""The persister: consumes accepted messages and writes them to the inboxes and the history."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from improto.server.model import PersistJob
from improto.server.ports import HistoryStore, InboxStore, PersistQueue


class Persister:
    """Writes each job to both stores; the queue removes the job only after both succeed.

    Both writes are idempotent, so a job redelivered after a crash between them (or after
    both, before the queue's ack) changes nothing the second time.
    """

    def __init__(self, queue: PersistQueue, inbox: InboxStore, history: HistoryStore) -> None:
        self.queue = queue
        self.inbox = inbox
        self.history = history
        self.persisted = 0

    def start(self) -> None:
        self.queue.consume(self.handle)

    def handle(self, job: PersistJob) -> Deferred[None]:
        return Deferred.fromCoroutine(self._write(job))

    async def _write(self, job: PersistJob) -> None:
        await self.inbox.append(job)
        await self.history.append(job.history_key, job)
        self.persisted += 1
