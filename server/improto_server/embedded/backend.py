"""The embedded backend: the storage ports on one local SQLite database.

    queue         SQLiteQueue          jobs and dedup tables, consumed in order by one loop
    inbox         SQLiteInbox          per-user inboxes, cursors and device positions
    history       SQLiteHistory        per-conversation history
    groups        SQLiteGroups         groups and memberships
    conversations SQLiteConversations  per-user conversation lists and read positions
    devices       SQLiteDevices        push registrations and session revocations
    timeline      SQLiteTimeline       large groups' numbered timelines

All share one Database (embedded/database.py): one connection on one thread, one transaction
per call. Inbox entries, history rows and conversation rows (their last message) refer to one
shared `messages` row; timeline rows keep their own stored records.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto_server.config import DAY_MS, Config, InboxCaps
from improto_server.embedded.conversations import SQLiteConversations, expire_conversations
from improto_server.embedded.database import Database, Event, delete_unreferenced
from improto_server.embedded.devices import SQLiteDevices
from improto_server.embedded.groups import SQLiteGroups
from improto_server.embedded.history import SQLiteHistory, expire_history
from improto_server.embedded.inbox import SQLiteInbox, expire_inbox
from improto_server.embedded.memory_queue import MemoryQueue
from improto_server.embedded.notify_queue import SQLiteNotifyQueue
from improto_server.embedded.queue import SQLiteQueue, expire_dedup
from improto_server.embedded.timeline import SQLiteTimeline, expire_timeline
from improto_server.health import Health, probe
from improto_server.hub import LocalRouter
from improto_server.ids import wall_ms
from improto_server.ports import PushRouter
from improto_server.reactor_types import IServerReactor, server_reactor

_log = Logger()


class SQLiteBackend:
    """Owns the database and its thread; exposes the ports as attributes."""

    def __init__(
        self,
        path: str | Path,
        *,
        reactor: IServerReactor | None = None,
        now_ms: Callable[[], int] | None = None,
        inbox_retention_ms: int = 7 * DAY_MS,
        history_retention_ms: int = 180 * DAY_MS,
        inbox_caps: InboxCaps | None = None,
        large_group_threshold: int = Config.large_group_threshold,
    ) -> None:
        """`inbox_caps`: Config.inbox_caps (None: the defaults); `large_group_threshold`:
        Config.large_group_threshold (the groups' large flag)."""
        self._reactor = reactor if reactor is not None else server_reactor()
        self.now_ms = now_ms or wall_ms
        self.inbox_retention_ms = inbox_retention_ms
        self.history_retention_ms = history_retention_ms
        self.db = Database(path, self._reactor, inline=str(path) == ":memory:")
        self._started = False
        self._closed: Event | None = None
        self._shutdown_trigger: Any = None  # what addSystemEventTrigger returned
        # In RAM nothing is durable, so the queue needs no table (memory_queue.py).
        self.queue: SQLiteQueue | MemoryQueue
        if self.db.inline:
            self.queue = MemoryQueue(self._reactor, self.now_ms)
        else:
            self.queue = SQLiteQueue(self.db, self._reactor, self.now_ms)
        self.inbox = SQLiteInbox(self.db, self.now_ms, inbox_retention_ms, caps=inbox_caps)
        self.history = SQLiteHistory(self.db, self.now_ms, history_retention_ms)
        self.groups = SQLiteGroups(self.db, large_threshold=large_group_threshold)
        # Conversation rows are kept as long as the history, counted from their last change.
        self.conversations = SQLiteConversations(self.db, self.now_ms, history_retention_ms)
        self.devices = SQLiteDevices(self.db, self.now_ms)
        self.timeline = SQLiteTimeline(self.db, self.now_ms, history_retention_ms)
        self.notify_queue = SQLiteNotifyQueue(self.db, self._reactor)

    def push_router(self) -> PushRouter:
        """One gateway per database: every device is in the local hub."""
        return LocalRouter()

    def health(self) -> Deferred[Health]:
        """The database answers on its thread (ahead of persister writes); queue_depth is
        the number of jobs the persister has not written yet."""
        depth: list[int] = []

        def count() -> Deferred[None]:
            d: Deferred[int] = self.db.call(_queue_depth)  # (in RAM too: the database answers)
            queue = self.queue
            if isinstance(queue, MemoryQueue):
                d = d.addCallback(lambda _: len(queue))
            return d.addCallback(depth.append)

        d = probe(count, self._reactor)
        return d.addCallback(lambda state: Health({"sqlite": state}, depth[0] if depth else None))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Deferred[None]:
        if self._started or self._closed is not None:
            raise RuntimeError("SQLiteBackend can be started once, before close()")
        self._started = True
        d = self.db.open()
        # The database thread is not a daemon: make sure reactor shutdown releases it. (An
        # inline database has none; closed now, it would fail the owner's last writes.)
        if not self.db.inline:
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "before", "shutdown", self.close
            )
        d.addErrback(self._start_failed)
        return d

    def _start_failed(self, failure: Failure) -> Deferred[Failure]:
        # Release the thread, then report the original error.
        return self.close().addCallback(lambda _: failure)

    def close(self) -> Deferred[None]:
        """Stop the consumer (after its in-flight job), close the database, stop the thread."""
        if self._closed is None:
            self._closed = Event()
            Deferred.fromCoroutine(self._close())
        return self._closed.wait()

    async def _close(self) -> None:
        closed = self._closed
        assert closed is not None
        try:
            if self._started:
                try:
                    await self.queue.close()  # an attribute: a test may have swapped the queue
                    await self.notify_queue.close()
                finally:
                    # Calls already queued on the thread still run before the database closes.
                    await self.db.close()
        except Exception:
            _log.failure("closing the SQLite database failed")
        finally:
            if self._shutdown_trigger is not None:
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
                self._shutdown_trigger = None
            closed.set()

    # ------------------------------------------------------------------ retention

    def sweep(self) -> Deferred[dict[str, int]]:
        """Delete what retention expired; returns how many rows of each kind went."""
        now = self.now_ms()
        inbox_cutoff = now - self.inbox_retention_ms
        d = self.db.call_background(_sweep, inbox_cutoff, now - self.history_retention_ms)
        queue = self.queue
        if isinstance(queue, MemoryQueue):
            d.addCallback(lambda n: {**n, "dedup": n["dedup"] + queue.expire(inbox_cutoff)})
        return d


def _sweep(db: sqlite3.Connection, inbox_cutoff: int, history_cutoff: int) -> dict[str, int]:
    """Inbox entries (and dedup keys) stored before `inbox_cutoff`, history and timeline rows
    sent before `history_cutoff` (ms) and conversation rows not changed since, in one
    transaction; then the messages nothing refers to any more."""
    inbox = expire_inbox(db, inbox_cutoff)
    history = expire_history(db, history_cutoff)
    dedup = expire_dedup(db, inbox_cutoff)
    convs, lasts = expire_conversations(db, history_cutoff)
    timeline = expire_timeline(db, history_cutoff)
    messages = delete_unreferenced(db, {*inbox, *history, *lasts})
    return {
        "inbox": len(inbox),
        "history": len(history),
        "dedup": dedup,
        "conversations": convs,
        "timeline": timeline,
        "messages": messages,
    }


def _queue_depth(db: sqlite3.Connection) -> int:
    # The consumer deletes jobs from the head, in order: the seq range is the count, read
    # from the ends of the key instead of count(*) scanning a backlog.
    (n,) = db.execute("SELECT coalesce(max(seq) - min(seq) + 1, 0) FROM jobs").fetchone()
    return int(n)
