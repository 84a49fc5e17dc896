"""The persister: consumes the queued jobs and writes them to the stores: messages to the
inboxes, the history and the conversation lists, conversation-state changes to the lists."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from twisted.internet.defer import Deferred, DeferredList
from twisted.python.failure import Failure

from improto_server.deferreds import as_deferred
from improto_server.model import ConvKey, PersistJob, QueuedJob, StateJob
from improto_server.ports import ConversationStore, HistoryStore, InboxStore, PersistQueue

# Jobs written per store round: one Redis script per inbox and a few HBase batches per round
# instead of per job. Bounded so one round stays short (ack latency, redelivery on a crash).
MAX_BATCH = 256
# Conversation-list updates (one per receiver) one ConversationStore.record call carries at
# most. The lists are written per batch, not per round: a batch of a busy conversation touches
# each member's row once instead of once per round, and each call stays short (the SQLite
# thread is shared with the accepts, as for MAX_ROWS).
MAX_RECORD_PAIRS = 4096
# Rows one store round writes at most: an inbox entry per receiver plus a history row per job.
# On the embedded backend every store call is a transaction on the one SQLite thread that the
# accepts (every user's SEND) also wait for, so one round must stay short whatever the fan-out:
# a batch is written in rounds of at most this many rows, a job for more receivers than that
# in several (its history row with the first).
MAX_ROWS = 250

_Round = tuple[list[PersistJob], list[tuple[ConvKey, PersistJob]]]


class Persister:
    """Writes each batch of jobs to the stores; the queue removes the batch only after every
    write succeeded.

    Message jobs go to the inboxes, the history and (if given) the conversation lists, round
    by round; then the batch's state jobs (read marks, hides) to the conversation lists, in
    batch order. Every write is idempotent, so a batch redelivered after a crash between them
    (or after all, before the queue's ack) changes nothing the second time. A round's stores
    are written at the same time: nothing orders the inbox against the history or the lists,
    only each store's own order matters (inbox cursors follow the batch order), and a
    conversation row's outcome does not depend on the order of record() and apply().
    Without `conversations` (tests of the other stores) state jobs are skipped.
    """

    def __init__(
        self,
        queue: PersistQueue,
        inbox: InboxStore,
        history: HistoryStore,
        conversations: ConversationStore | None = None,
        *,
        max_batch: int = MAX_BATCH,
        max_rows: int = MAX_ROWS,
    ) -> None:
        if max_rows < 2:
            raise ValueError("max_rows must be at least 2 (an inbox entry and a history row)")
        self.queue = queue
        self.inbox = inbox
        self.history = history
        self.conversations = conversations
        self.max_batch = max_batch
        self.max_rows = max_rows
        self.persisted = 0  # message jobs written
        self.applied = 0  # state jobs written (or skipped, without conversations)
        self.batches = 0
        self.rounds = 0  # store rounds (one inbox, history and conversations call each)

    def start(self) -> None:
        self.queue.consume(self.handle, self.max_batch)

    @as_deferred
    async def handle(self, jobs: Sequence[QueuedJob]) -> None:
        messages = [j for j in jobs if isinstance(j, PersistJob)]
        states = [j for j in jobs if isinstance(j, StateJob)]
        # The conversation lists are written beside the rounds, in chunks of their own.
        lists = self._record(messages, states) if self.conversations is not None else None
        try:
            # Rounds one after the other, in batch order: within an inbox an earlier job's
            # entry is still written first, and work queued on the stores meanwhile (accepts)
            # goes between two rounds instead of after the whole batch.
            for inbox_jobs, history_items in rounds(messages, self.max_rows):
                writes = [self.inbox.append_many(inbox_jobs)]
                if history_items:
                    writes.append(self.history.append_many(history_items))
                await _all(writes)
                self.rounds += 1
        finally:
            if lists is not None:  # waited for even when a round failed: no overlap on retry
                await _all([lists])
        self.persisted += len(messages)
        self.applied += len(states)
        self.batches += 1

    @as_deferred
    async def _record(self, messages: list[PersistJob], states: list[StateJob]) -> None:
        convs = self.conversations
        assert convs is not None
        for chunk in record_chunks(messages, MAX_RECORD_PAIRS):
            await convs.record(chunk)
        if states:
            await convs.apply(states)


def record_chunks(jobs: Sequence[PersistJob], max_pairs: int) -> Iterator[list[PersistJob]]:
    """`jobs` in order as chunks of at most `max_pairs` (job, receiver) pairs; a job with more
    receivers is split by receivers (a part is a job for its receivers only)."""
    chunk: list[PersistJob] = []
    pairs = 0
    for job in jobs:
        users = job.inbox_users
        if pairs and pairs + len(users) > max_pairs:
            yield chunk
            chunk, pairs = [], 0
        if len(users) <= max_pairs:
            chunk.append(job)
            pairs += len(users)
            continue
        for i in range(0, len(users), max_pairs):
            yield [_part(job, users[i : i + max_pairs])]
    if chunk:
        yield chunk


async def _all(writes: list[Deferred[None]]) -> None:
    """Wait for every write, then raise the first failure: a retry never overlaps a write
    still running."""
    for ok, value in await DeferredList(writes, consumeErrors=True):
        if not ok:
            assert isinstance(value, Failure)
            value.raiseException()


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
