"""The persister: consumes the queued jobs and writes them to the stores: messages to the
inboxes and the history, conversation-state changes (read marks, hides) to the lists; then
folds the inboxes it wrote into the users' conversation lists, coalesced."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto.enums import ConvKind
from improto_server import metrics
from improto_server.deferreds import as_deferred
from improto_server.ids import wall_ms
from improto_server.model import ConvKey, PersistJob, QueuedJob, StateJob
from improto_server.ports import (
    ConversationStore,
    HistoryStore,
    InboxStore,
    NotifyQueue,
    PersistQueue,
    TimelineStore,
)

log = Logger()

# Jobs written per store round: one Redis script per inbox and a few HBase batches per round
# instead of per job. Bounded so one round stays short (ack latency, redelivery on a crash).
MAX_BATCH = 256
# Rows one store round writes at most: an inbox entry per receiver plus a history row per job.
# On the embedded backend every store call is a transaction on the one SQLite thread that the
# accepts (every user's SEND) also wait for, so one round must stay short whatever the fan-out:
# a batch is written in rounds of at most this many rows, a job for more receivers than that
# in several (its history row with the first).
MAX_ROWS = 250
# On a store that says so (`ROUND_ROW_UNIT_BYTES`: the embedded one, whose one thread the
# accepts share), a row counts as one more row per that many bytes of its record, so a round
# of large messages stays as short as one of small ones: there the rows' bytes, not their
# number, are what a round writes and syncs. Redis and HBase take a round's writes
# pipelined, and smaller rounds there only slow the persister down.
ROW_UNIT_BYTES = 4096
# Folding the inboxes into the conversation lists: a user's rows are written once per fold
# for all the entries since the last one, so the longer the delay the fewer row writes (a
# busy conversation's messages share one). Readers never wait for it: a list request folds
# its user first. The delay bounds what a fold after a restart (behind()) has to catch up.
FOLD_DELAY_S = 5.0
# Users one ConversationStore.fold call brings up to date: each call stays short (the SQLite
# thread is shared with the accepts, as for MAX_ROWS).
FOLD_USERS = 256
# Pending users that start a fold at once instead of after the delay; twice as many make new
# batches wait for the running fold: the set stays bounded under any load.
FOLD_PENDING = 20_000

_Round = tuple[list[PersistJob], list[tuple[ConvKey, PersistJob]]]


class Persister:
    """Writes each batch of jobs to the stores; the queue removes the batch only after every
    write succeeded.

    Message jobs go to the inboxes and the history, round by round; the batch's state jobs
    (read marks, hides) to the conversation lists beside them. Every write is idempotent, so
    a batch redelivered after a crash between them (or after all, before the queue's ack)
    changes nothing the second time. A round's stores are written at the same time: nothing
    orders the inbox against the history, only each store's own order matters (inbox cursors
    follow the batch order).

    The conversation lists follow the inboxes (ConversationStore.fold): the users whose
    inboxes a batch wrote are pending, and FOLD_DELAY_S after the first of them, one fold
    brings them all up to date. Pending users live in memory only: a crash loses them, and
    the next start folds ConversationStore.behind(), which the stores keep durably. A fold
    never blocks the queue (except past 2 * FOLD_PENDING users pending) and its failure only
    delays it. Without `conversations` (tests of the other stores) state jobs are skipped.
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
        clock: IReactorTime | None = None,
        fold_delay_s: float = FOLD_DELAY_S,
        notify: NotifyQueue | None = None,
        timeline: TimelineStore | None = None,
        replicated: Callable[[], Deferred[None]] | None = None,
    ) -> None:
        """`notify`: where the persisted messages go for the notifier (push notifications
        configured), after their inbox entries and before the batch's ack. `timeline`: where
        large groups' messages (timeline jobs) go; without it such a batch fails (and is
        retried: never dropped). `replicated`: awaited after a batch's writes, before its
        notifications and its ack (Redis Cluster WAIT: a failure retries the batch)."""
        if max_rows < 2:
            raise ValueError("max_rows must be at least 2 (an inbox entry and a history row)")
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self.queue = queue
        self.inbox = inbox
        self.history = history
        self.conversations = conversations
        self.max_batch = max_batch
        self.max_rows = max_rows
        self.row_unit_bytes: int | None = getattr(inbox, "ROUND_ROW_UNIT_BYTES", None)
        self.clock = clock
        self.fold_delay_s = fold_delay_s
        self.notify = notify
        self.timeline = timeline
        self.replicated = replicated
        self.persisted = 0  # message jobs written
        self.applied = 0  # state jobs written (or skipped, without conversations)
        self.batches = 0
        self.rounds = 0  # store rounds (one inbox, history and conversations call each)
        self.folds = 0  # ConversationStore.fold calls that succeeded
        self._pending: set[int] = set()  # users whose lists may be behind their inboxes
        self._timer: IDelayedCall | None = None
        self._folding: Deferred[None] | None = None
        self.fold_error: Failure | None = None  # the last fold's failure (fold_now raises it)

    def start(self) -> None:
        if self.conversations is not None:
            self.conversations.behind().addCallbacks(self._recovered, self._fold_failed)
        self.queue.consume(self.handle, self.max_batch)

    @property
    def lists_pending(self) -> int:
        """Users whose lists this persister has still to fold (a fold running counts)."""
        return len(self._pending) + (self._folding is not None)

    @as_deferred
    async def handle(self, jobs: Sequence[QueuedJob]) -> None:
        started = self.clock.seconds()
        messages = [j for j in jobs if isinstance(j, PersistJob)]
        states = [j for j in jobs if isinstance(j, StateJob)]
        convs = self.conversations
        marks = None
        if convs is not None and states:
            marks = metrics.counting_errors(convs.apply(states), convs)
        try:
            # Rounds one after the other, in batch order: within an inbox an earlier job's
            # entry is still written first, and work queued on the stores meanwhile (accepts)
            # goes between two rounds instead of after the whole batch.
            for round_jobs, history_items in rounds(messages, self.max_rows, self.row_unit_bytes):
                inbox_jobs = [j for j in round_jobs if not j.timeline]
                writes = []
                if inbox_jobs:
                    writes.append(metrics.counting_errors(
                        self.inbox.append_many(inbox_jobs), self.inbox
                    ))  # fmt: skip
                if len(inbox_jobs) < len(round_jobs):
                    writes.append(self._timeline([j for j in round_jobs if j.timeline]))
                if history_items:
                    written = self.history.append_many(history_items)
                    writes.append(metrics.counting_errors(written, self.history))
                await _all(writes)
                self.rounds += 1
        finally:
            if marks is not None:  # waited for even when a round failed: no overlap on retry
                await _all([marks])
        if convs is not None:
            own = _own_reads(messages)
            if own:  # a sender has read its large group up to its own message
                await metrics.counting_errors(convs.apply(own), convs)
        if self.replicated is not None:
            await self.replicated()
        notified = [j for j in messages if not j.timeline]
        if self.notify is not None and notified:
            # After the inboxes (a notification for a message a device cannot pull yet would
            # wake the app for nothing), before the ack (a crash notifies again, never not).
            # Large groups' messages notify nobody (docs/GUARANTEES.md).
            await self.notify.put(notified)
        if convs is not None and messages:
            for job in messages:
                self._pending.update(job.inbox_users)
            if len(self._pending) >= 2 * FOLD_PENDING and self._folding is not None:
                await self._waiter()  # the lists keep up with any load
            self._schedule()
        self.persisted += len(messages)
        self.applied += len(states)
        self.batches += 1
        oldest = min((j.message.server_time for j in messages), default=None)
        lag_s = None if oldest is None else (wall_ms() - oldest) / 1000
        metrics.persist_batch(len(jobs), self.clock.seconds() - started, lag_s)

    def _timeline(self, jobs: list[PersistJob]) -> Deferred[None]:
        """Number and store a round's large-group messages (TimelineStore.append)."""
        if self.timeline is None:
            return fail(RuntimeError("a large group's message, and no timeline store"))
        d = metrics.counting_errors(self.timeline.append(jobs), self.timeline)
        return d.addCallback(lambda _: None)

    # ------------------------------------------------------------------ folds

    @as_deferred
    async def fold_now(self) -> None:
        """Fold every user pending now (after a fold already running): tests, the benchmark,
        a clean stop. Raises if a fold failed (its users stay pending)."""
        self.stop()
        while self._pending or self._folding is not None:
            self.fold_error = None
            if self._folding is None:
                self._start_fold()
            if self._folding is not None:
                await self._waiter()
            if self.fold_error is not None:
                self.fold_error.raiseException()

    def stop(self) -> None:
        """Cancel the next fold (the pending users are folded after the next start)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _waiter(self) -> Deferred[None]:
        """Fires when the running fold ends (it never fails: see _fold_pending)."""
        d: Deferred[None] = Deferred()
        assert self._folding is not None

        def fire(result: object) -> object:
            d.callback(None)
            return result

        self._folding.addBoth(fire)
        return d

    def _recovered(self, users: list[int]) -> None:
        if users:
            log.info("folding {n} users' lists left behind", n=len(users))
            self._pending.update(users)
            self._schedule(0)

    def _schedule(self, delay: float | None = None) -> None:
        if not self._pending or self._folding is not None:
            return
        if len(self._pending) >= FOLD_PENDING:
            delay = 0
        if self._timer is not None and self._timer.active():
            if delay == 0:
                self._timer.reset(0)
            return
        self._timer = self.clock.callLater(
            self.fold_delay_s if delay is None else delay, self._fold_due
        )

    def _fold_due(self) -> None:
        self._timer = None
        if self._folding is None and self._pending:
            self._start_fold()

    def _start_fold(self) -> None:
        d = self._fold_pending()
        if not d.called:  # (a store answering at once has finished already)
            self._folding = d

    @as_deferred
    async def _fold_pending(self) -> None:
        convs = self.conversations
        assert convs is not None
        users = sorted(self._pending)
        self._pending = set()
        done = 0
        try:
            for done in range(0, len(users), FOLD_USERS):
                again = await convs.fold(users[done : done + FOLD_USERS])
                self.folds += 1
                self._pending.update(again)
        except Exception:
            metrics.storage_error(metrics.service_of(convs))
            self._pending.update(users[done:])  # folded again later: folds are idempotent
            self.fold_error = Failure()
            self._fold_failed(self.fold_error)
        finally:
            self._folding = None
            self._schedule()

    def _fold_failed(self, failure: Failure) -> None:
        log.failure("folding conversation lists failed; retried later", failure)


async def _all(writes: list[Deferred[None]]) -> None:
    """Wait for every write, then raise the first failure: a retry never overlaps a write
    still running."""
    for ok, value in await DeferredList(writes, consumeErrors=True):
        if not ok:
            assert isinstance(value, Failure)
            value.raiseException()


def _own_reads(jobs: Sequence[PersistJob]) -> list[StateJob]:
    """The read marks that the large-group messages of a batch imply: each sender has read
    its group up to its newest own message there (as ConversationStore.record does for
    the inbox-written messages)."""
    newest: dict[tuple[int, int], int] = {}
    for job in jobs:
        if job.timeline:
            m = job.message
            key = (m.sender_id, m.conv_id)
            newest[key] = max(newest.get(key, 0), m.msg_id)
    return [
        StateJob(StateJob.MARK, user, ConvKind.GROUP, group, msg_id)
        for (user, group), msg_id in newest.items()
    ]


def rounds(
    jobs: Sequence[PersistJob], max_rows: int, row_unit_bytes: int | None = None
) -> Iterator[_Round]:
    """`jobs` as store rounds of at most `max_rows` rows (len(inbox_users) + 1 per job, + 1
    more for a timeline job's timeline row; with `row_unit_bytes`, each row weighing
    `row_weight`), in order; a job
    with more receivers is split by receivers (both stores' writes are idempotent per
    receiver and per message, so a part is a job of its own)."""
    inbox: list[PersistJob] = []
    history: list[tuple[ConvKey, PersistJob]] = []
    rows = 0
    for job in jobs:
        weight = row_weight(job, row_unit_bytes) if row_unit_bytes else 1
        need = (len(job.inbox_users) + 1 + job.timeline) * weight
        if rows and rows + need > max_rows:
            yield inbox, history
            inbox, history, rows = [], [], 0
        if need <= max_rows:
            inbox.append(job)
            history.append((job.history_key, job))
            rows += need
            continue
        users = job.inbox_users
        per = max(1, max_rows // weight)  # receivers per round
        first = max(1, per - 1)  # room for the history row
        yield [_part(job, users[:first])], [(job.history_key, job)]
        for i in range(first, len(users), per):
            part = _part(job, users[i : i + per])
            if i + per >= len(users):  # the last part: later jobs may join its round
                inbox, rows = [part], len(part.inbox_users) * weight
            else:
                yield [part], []
    if inbox or history:
        yield inbox, history


def row_weight(job: PersistJob, row_unit_bytes: int = ROW_UNIT_BYTES) -> int:
    return 1 + len(job.record) // row_unit_bytes


def _part(job: PersistJob, users: tuple[int, ...]) -> PersistJob:
    return PersistJob(job.message, users, job.record, job.timeline)
