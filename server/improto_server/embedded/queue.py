"""The embedded persist queue (the PersistQueue port): a jobs table in the embedded database,
consumed in acceptance order by one in-process loop, and the dedup table of accepted
(sender, client_msg_id) keys. The table holds both kinds of job (model.job_from_bytes tells
them apart): messages, and conversation-state changes (no dedup key)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from improto_server.embedded.consumer_loop import ConsumerLoop
from improto_server.embedded.database import Database, signed, unsigned
from improto_server.model import Accepted, PersistJob, StateJob, job_from_bytes
from improto_server.turn_batcher import TurnBatcher

_log = Logger()

FETCH_BATCH = 256  # jobs read per query by the consumer
# Before reading a batch that would be small, the consumer waits this long for more jobs: a
# read, a handler call and a delete cost about as much for one job as for many, so at low
# rates this saves CPU per job. Only the stores lag (by <= this); the sender's ack and the
# pushes do not wait for the consumer. Measurements: docs/BENCHMARKS.md.
LINGER_S = 0.005
# Group commit, adaptive: an accept commits at the end of its turn when no commit runs and
# none started in the last ACCEPT_SPACING_S; otherwise it joins the next transaction, started
# once the running one is done and the spacing has passed. Idle, a SEND waits for no timer;
# loaded, a file database syncs at most once per spacing (each COMMIT is an fsync). In RAM
# there is no fsync to share: the next transaction starts as soon as the running one ends.
ACCEPT_SPACING_S = 0.001
ACCEPT_BATCH = 256  # accepts one transaction commits at most

# A message job with its client_msg_id, or a state job (None: nothing to deduplicate).
Accept = tuple[PersistJob, bytes] | tuple[StateJob, None]


class SQLiteQueue(ConsumerLoop):
    """PersistQueue on a jobs table, consumed in order by one in-process loop."""

    def __init__(self, db: Database, reactor: IReactorTime, now_ms: Callable[[], int]) -> None:
        super().__init__(reactor)
        self._db = db
        self._now_ms = now_ms
        # Messages (with their client_msg_id) and state jobs (None) share one group commit,
        # so the table keeps the order in which they were accepted.
        self._accepts: TurnBatcher[Accept, Any] = TurnBatcher(
            reactor, self._accept_batch, ACCEPT_BATCH,
            0.0 if db.path == ":memory:" else ACCEPT_SPACING_S, adaptive=True,
        )  # fmt: skip

    def accept(self, job: PersistJob, client_msg_id: bytes) -> Deferred[Accepted]:
        d = self._accepts.submit((job, client_msg_id))
        d.addCallback(self._accepted)
        return d

    def accept_state(self, job: StateJob) -> Deferred[None]:
        d = self._accepts.submit((job, None))
        d.addCallback(self._state_accepted)
        return d

    def _accept_batch(self, items: list[Accept]) -> Deferred[list[Any]]:
        return self._db.call(_accept_many, items, self._now_ms())

    def _accepted(self, outcome: Accepted | Exception) -> Accepted:
        if isinstance(outcome, Exception):
            raise outcome
        if not outcome.duplicate:
            self._wake()
        return outcome

    def _state_accepted(self, outcome: Exception | None) -> None:
        if isinstance(outcome, Exception):
            raise outcome
        self._wake()

    async def _run(self) -> None:
        try:
            while not self._stopping:
                self._signalled = False
                try:
                    batch = await self._db.call_background(_fetch_jobs, FETCH_BATCH)
                except Exception:
                    _log.failure("reading the persist queue failed; retrying")
                    await self._pause()
                    continue
                if not batch and not self._signalled and not self._stopping:
                    self._idle = Deferred()
                    await self._idle  # woken by accept() or close()
                    await self._pause(LINGER_S)  # more jobs join the first one
                    continue
                for i in range(0, len(batch), self._max_batch):
                    rows = batch[i : i + self._max_batch]
                    while not await self._deliver(rows):
                        if self._stopping:
                            return
                        await self._pause()
                    if self._stopping:
                        return
                if 0 < len(batch) < FETCH_BATCH:  # no backlog: let the next batch fill a bit
                    await self._pause(LINGER_S)
        finally:
            self._stopped.set()

    async def _deliver(self, rows: list[tuple[int, bytes]]) -> bool:
        """Hand consecutive jobs to the handler as one batch; True once it succeeded (the
        jobs are then deleted)."""
        assert self._handler is not None
        first, last = rows[0][0], rows[-1][0]
        try:
            await self._handler([job_from_bytes(data) for _, data in rows])
        except Exception:
            _log.failure("persisting queued jobs {first}..{last} failed; will retry",
                         first=first, last=last)  # fmt: skip
            return False
        try:
            await self._db.call_background(_delete_jobs, first, last)
        except Exception:
            # The jobs stay queued and are delivered again: handlers are idempotent.
            _log.failure("removing persisted jobs {first}..{last} failed", first=first, last=last)
        return True


def _accept_many(
    db: sqlite3.Connection, items: list[Accept], now: int
) -> list[Accepted | Exception | None]:
    """Every accept in one transaction, in order; a job that does not encode gets its error
    back and the others go on (a later duplicate of an earlier one in the batch is seen)."""
    out: list[Accepted | Exception | None] = []
    for job, client_msg_id in items:
        try:
            if isinstance(job, StateJob):
                db.execute("INSERT INTO jobs (data) VALUES (?)", (job.to_bytes(),))
                out.append(None)
            else:
                assert client_msg_id is not None
                out.append(_accept(db, job, client_msg_id, now))
        except sqlite3.Error:
            raise  # the database itself failed: the whole batch fails
        except Exception as e:  # this job (validated before any write) is refused alone
            out.append(e)
    return out


def _accept(db: sqlite3.Connection, job: PersistJob, client_msg_id: bytes, now: int) -> Accepted:
    m = job.message
    row = db.execute(
        "SELECT msg_id, server_time FROM dedup WHERE sender_id = ? AND client_msg_id = ?",
        (signed(m.sender_id), client_msg_id),
    ).fetchone()
    if row is not None:
        return Accepted(unsigned(row[0]), unsigned(row[1]), duplicate=True)
    data = job.to_bytes()  # also validates the message before anything is written
    db.execute(
        "INSERT INTO dedup VALUES (?, ?, ?, ?, ?)",
        (signed(m.sender_id), client_msg_id, signed(m.msg_id), signed(m.server_time), now),
    )
    db.execute("INSERT INTO jobs (data) VALUES (?)", (data,))
    return Accepted(m.msg_id, m.server_time, duplicate=False)


def _fetch_jobs(db: sqlite3.Connection, limit: int) -> list[tuple[int, bytes]]:
    return db.execute("SELECT seq, data FROM jobs ORDER BY seq LIMIT ?", (limit,)).fetchall()


def _delete_jobs(db: sqlite3.Connection, first: int, last: int) -> None:
    db.execute("DELETE FROM jobs WHERE seq BETWEEN ? AND ?", (first, last))


def expire_dedup(db: sqlite3.Connection, cutoff: int) -> int:
    """Forget the dedup keys stored before `cutoff` (ms); returns how many went."""
    return db.execute("DELETE FROM dedup WHERE stored_ms < ?", (cutoff,)).rowcount
