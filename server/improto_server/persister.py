"""The persister: consumes accepted messages and writes them to the inboxes and the history."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import DeferredList
from twisted.python.failure import Failure

from improto_server.deferreds import as_deferred
from improto_server.model import PersistJob
from improto_server.ports import HistoryStore, InboxStore, PersistQueue

# Jobs written per store round: one Redis script per inbox and a few HBase batches per round
# instead of per job. Bounded so one round stays short (ack latency, redelivery on a crash).
MAX_BATCH = 256


class Persister:
    """Writes each batch of jobs to both stores; the queue removes the batch only after both
    succeed.

    Both writes are idempotent, so a batch redelivered after a crash between them (or after
    both, before the queue's ack) changes nothing the second time. The two stores are written
    at the same time: nothing orders the inbox against the history, only each store's own
    order matters (inbox cursors follow the batch order).
    """

    def __init__(
        self,
        queue: PersistQueue,
        inbox: InboxStore,
        history: HistoryStore,
        *,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.queue = queue
        self.inbox = inbox
        self.history = history
        self.max_batch = max_batch
        self.persisted = 0
        self.batches = 0

    def start(self) -> None:
        self.queue.consume(self.handle, self.max_batch)

    @as_deferred
    async def handle(self, jobs: Sequence[PersistJob]) -> None:
        writes = [
            self.inbox.append_many(jobs),
            self.history.append_many([(job.history_key, job) for job in jobs]),
        ]
        # Wait for both before failing, so a retry never overlaps a write still running.
        for ok, value in await DeferredList(writes, consumeErrors=True):
            if not ok:
                assert isinstance(value, Failure)
                value.raiseException()
        self.persisted += len(jobs)
        self.batches += 1
