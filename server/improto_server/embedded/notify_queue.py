"""The embedded notify queue (the NotifyQueue port): the notify_jobs table of the embedded
database, consumed in order by one in-process loop, as the persist queue's jobs table is
(embedded/queue.py) but without dedup keys or group commit: the persister puts a whole
batch's messages in one call, the gateway one DeviceNotifyJob at a time. Rows are the jobs'
bytes (`to_bytes`; model.notify_job_from_bytes tells the two kinds apart)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from improto_server.embedded.consumer_loop import ConsumerLoop
from improto_server.embedded.database import Database
from improto_server.model import NotifyJob, notify_job_from_bytes

_log = Logger()

FETCH_BATCH = 256  # jobs read per query by the consumer


class SQLiteNotifyQueue(ConsumerLoop):
    """NotifyQueue on the notify_jobs table; one consumer loop per process."""

    def __init__(self, db: Database, reactor: IReactorTime) -> None:
        super().__init__(reactor)
        self._db = db

    def put(self, jobs: Sequence[NotifyJob]) -> Deferred[None]:
        if not jobs:
            return succeed(None)
        rows = [(job.to_bytes(),) for job in jobs]
        # Background: the persister waits for it, no client does.
        d = self._db.call_background(_put_jobs, rows)
        d.addCallback(self._wake)
        return d

    async def _run(self) -> None:
        try:
            while not self._stopping:
                self._signalled = False
                try:
                    batch = await self._db.call_background(_fetch_jobs, FETCH_BATCH)
                except Exception:
                    _log.failure("reading the notify queue failed; retrying")
                    await self._pause()
                    continue
                if not batch and not self._signalled and not self._stopping:
                    self._idle = Deferred()
                    await self._idle  # woken by put() or close()
                    continue
                for i in range(0, len(batch), self._max_batch):
                    rows = batch[i : i + self._max_batch]
                    while not await self._deliver(rows):
                        if self._stopping:
                            return
                        await self._pause()
                    if self._stopping:
                        return
        finally:
            self._stopped.set()

    async def _deliver(self, rows: list[tuple[int, bytes]]) -> bool:
        """Hand consecutive jobs to the handler as one batch; True once it succeeded (the
        jobs are then deleted)."""
        assert self._handler is not None
        first, last = rows[0][0], rows[-1][0]
        try:
            jobs = [notify_job_from_bytes(data) for _, data in rows]
        except Exception:
            # Nothing but this module writes the table: a row that does not decode is
            # damage, and keeping it would stop every notification behind it.
            _log.failure("dropping undecodable notify jobs {first}..{last}", first=first, last=last)
            jobs = None
        if jobs is not None:
            try:
                await self._handler(jobs)
            except Exception:
                _log.failure("notify jobs {first}..{last} failed; will retry",
                             first=first, last=last)  # fmt: skip
                return False
        try:
            await self._db.call_background(_delete_jobs, first, last)
        except Exception:
            # The jobs stay queued and are delivered again (a second notification at worst).
            _log.failure("removing notify jobs {first}..{last} failed", first=first, last=last)
        return True


def _put_jobs(db: sqlite3.Connection, rows: list[tuple[bytes]]) -> None:
    db.executemany("INSERT INTO notify_jobs (data) VALUES (?)", rows)


def _fetch_jobs(db: sqlite3.Connection, limit: int) -> list[tuple[int, bytes]]:
    return db.execute("SELECT seq, data FROM notify_jobs ORDER BY seq LIMIT ?", (limit,)).fetchall()


def _delete_jobs(db: sqlite3.Connection, first: int, last: int) -> None:
    db.execute("DELETE FROM notify_jobs WHERE seq BETWEEN ? AND ?", (first, last))
