"""The persister: consumes accepted messages and writes them to the inboxes and the history."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from twisted.internet.defer import DeferredList
from twisted.python.failure import Failure

from improto_server.deferreds import as_deferred
from improto_server.model import ConvKey, PersistJob
from improto_server.ports import HistoryStore, InboxStore, PersistQueue

# Jobs written per store round: one Redis script per inbox and a few HBase batches per round
# instead of per job. Bounded so one round stays short (ack latency, redelivery on a crash).
MAX_BATCH = 256
# Rows one store round writes at most: an inbox entry per receiver plus a history row per job.
# On the embedded backend every store call is a transaction on the one SQLite thread that the
# accepts (every user's SEND) also wait for, so one round must stay short whatever the fan-out:
# a batch is written in rounds of at most this many rows, a job for more receivers than that
# in several (its history row with the first).
MAX_ROWS = 250

_Round = tuple[list[PersistJob], list[tuple[ConvKey, PersistJob]]]


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
        max_rows: int = MAX_ROWS,
    ) -> None:
        if max_rows < 2:
            raise ValueError("max_rows must be at least 2 (an inbox entry and a history row)")
        self.queue = queue
        self.inbox = inbox
        self.history = history
        self.max_batch = max_batch
        self.max_rows = max_rows
        self.persisted = 0
        self.batches = 0
        self.rounds = 0  # store rounds (one inbox and one history call each)

    def start(self) -> None:
        self.queue.consume(self.handle, self.max_batch)

    @as_deferred
    async def handle(self, jobs: Sequence[PersistJob]) -> None:
        # Rounds one after the other, in batch order: within an inbox an earlier job's entry
        # is still written first, and work queued on the stores meanwhile (accepts) goes
        # between two rounds instead of after the whole batch.
        for inbox_jobs, history_items in rounds(jobs, self.max_rows):
            writes = [self.inbox.append_many(inbox_jobs)]
            if history_items:
                writes.append(self.history.append_many(history_items))
            # Wait for both before failing, so a retry never overlaps a write still running.
            for ok, value in await DeferredList(writes, consumeErrors=True):
                if not ok:
                    assert isinstance(value, Failure)
                    value.raiseException()
            self.rounds += 1
        self.persisted += len(jobs)
        self.batches += 1


def rounds(jobs: Sequence[PersistJob], max_rows: int) -> Iterator[_Round]:
    """`jobs` as store rounds of at most `max_rows` rows (len(inbox_users) + 1 per job), in
    order; a job with more receivers is split by receivers (both stores' writes are idempotent
    per receiver and per message, so a part is a job of its own)."""
    inbox: list[PersistJob] = []
    history: list[tuple[ConvKey, PersistJob]] = []
    rows = 0
    for job in jobs:
        need = len(job.inbox_users) + 1
        if rows and rows + need > max_rows:
            yield inbox, history
            inbox, history, rows = [], [], 0
        if need <= max_rows:
            inbox.append(job)
            history.append((job.history_key, job))
            rows += need
            continue
        users = job.inbox_users
        first = max_rows - 1  # room for the history row
        yield [_part(job, users[:first])], [(job.history_key, job)]
        for i in range(first, len(users), max_rows):
            part = _part(job, users[i : i + max_rows])
            if i + max_rows >= len(users):  # the last part: later jobs may join its round
                inbox, rows = [part], len(part.inbox_users)
            else:
                yield [part], []
    if inbox or history:
        yield inbox, history


def _part(job: PersistJob, users: tuple[int, ...]) -> PersistJob:
    return PersistJob(job.message, users, job.record)
