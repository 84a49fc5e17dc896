"""Group events the persistence queue refused, accepted later (PROTOCOL.md 12.2: each change
of a member list produces one event message).

A GROUP_CREATE / GROUP_ADD / GROUP_REMOVE writes the membership first and then queues its
event; if the queue refuses the event (RabbitMQ or Redis down, say) the change still stands
and is answered OK, so the event must not be lost with the refusal. `EventDelivery` keeps it
in memory and accepts it again in the background, with backoff, until the queue takes it,
while the gateway process lives (a `kill -9` loses what is still pending; a clean stop makes
one last attempt and logs what remains).

The events of one group are accepted in the order of their changes: while one of them is
pending, the group's later events wait behind it instead of overtaking it. An event is pushed
to the online members when it is accepted (as a SEND is), not before.

Retrying is idempotent. Every attempt hands the queue the same job (same msg_id) with the
same client_msg_id (the event's own random one, spec 12.3, and the removed users' inbox copy's
own random one: nobody else's key). The queue's accept is atomic per (sender, client_msg_id)
and answers a repeat as a duplicate (ports.PersistQueue.accept; on RabbitMQ a key left pending
by a lost confirm is taken over and the same msg_id published again, a harmless second copy),
and the persister's writes are idempotent per msg_id (inbox entries per (user, msg_id), history
per msg_id, a redelivered timeline message keeps its seq). So an attempt that did reach the
queue but whose answer was lost makes no second message when it is retried.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto_server import metrics
from improto_server.model import Accepted, PersistJob

log = Logger()

MAX_PENDING = 10_000  # events held (in flight or waiting); beyond: dropped, logged, counted
FIRST_DELAY_S = 0.25  # the first retry after a refusal; doubling up to MAX_DELAY_S
MAX_DELAY_S = 5.0
SHOWN_IDS = 50  # msg_ids listed by the log line of what a stop leaves behind

EVENTS_PENDING = Gauge(
    "improto_group_events_pending",
    "Group events waiting for the persistence queue to accept them (refused, or behind a "
    "refused event of their group).",
    registry=metrics.REGISTRY,
)
EVENTS_REFUSED = Counter(
    "improto_group_events_refused",
    "Group events the persistence queue refused at least once (then retried).",
    registry=metrics.REGISTRY,
)
EVENTS_DROPPED = Counter(
    "improto_group_events_dropped",
    "Group events dropped because too many were pending (their membership changes stand).",
    registry=metrics.REGISTRY,
)

Accept = Callable[[PersistJob, bytes], Deferred[Accepted]]


def _nothing() -> None:
    return None


@dataclass(eq=False)
class GroupEvent:
    """One group event to accept: its job and, for a large group's removal, the removed
    users' inbox copy (its own dedup key); `on_accepted` (the push) runs once the job is."""

    group_id: int
    job: PersistJob
    client_msg_id: bytes
    copy: PersistJob | None = None
    copy_msg_id: bytes = b""  # the copy's client_msg_id
    on_accepted: Callable[[], None] = _nothing
    accepted: bool = False  # the job is (the copy may still be pending)
    attempts: int = 0
    refused: bool = False  # its refusal was logged (once per event)
    settled: Deferred[None] = field(default_factory=Deferred, repr=False)

    @property
    def msg_id(self) -> int:
        return self.job.message.msg_id

    def settle(self) -> None:
        if not self.settled.called:
            self.settled.callback(None)


class EventDelivery:
    """Accepts group events in their groups' order, retrying refused ones in the background.

    `accept`: the persistence queue's accept; `clock`: the reactor (a task.Clock in tests)."""

    def __init__(
        self,
        accept: Accept,
        clock: IReactorTime,
        *,
        max_pending: int = MAX_PENDING,
        first_delay_s: float = FIRST_DELAY_S,
        max_delay_s: float = MAX_DELAY_S,
    ) -> None:
        self._accept = accept
        self._clock = clock
        self.max_pending = max_pending
        self._first_delay = first_delay_s
        self._max_delay = max_delay_s
        self._delay = first_delay_s
        self._queues: dict[int, deque[GroupEvent]] = {}  # per group, in change order
        self._pending = 0  # events in _queues
        self._active: set[int] = set()  # groups being drained now
        self._behind: set[int] = set()  # groups with a refused event still queued
        self._waiting: set[int] = set()  # groups whose drain stopped on a refusal
        self._runs: set[Deferred[None]] = set()
        self._timer: IDelayedCall | None = None
        self._closed = False
        self.dropped = 0

    @property
    def pending(self) -> int:
        return self._pending

    def pending_ids(self) -> list[int]:
        return [ev.msg_id for q in self._queues.values() for ev in q]

    def deliver(self, ev: GroupEvent) -> Deferred[None]:
        """Accept the event now, or behind its group's events still pending. The Deferred
        fires (it never fails) once the event is accepted, or once it is left to the
        background retry (refused, or queued behind a refused event), or dropped."""
        if self._pending >= self.max_pending:
            self.dropped += 1
            EVENTS_DROPPED.inc()
            log.error(
                "group event {msg_id} of group {group} dropped: {n} events already wait for "
                "the persistence queue (its membership change stands without it)",
                msg_id=ev.msg_id, group=ev.group_id, n=self._pending,
            )  # fmt: skip
            return succeed(None)
        gid = ev.group_id
        self._queues.setdefault(gid, deque()).append(ev)
        self._pending += 1
        EVENTS_PENDING.set(self._pending)
        if gid in self._behind:
            ev.settle()  # the retry takes it, after the group's earlier events
        elif gid not in self._active:
            self._start(gid)
        return ev.settled

    def _start(self, gid: int) -> None:
        self._active.add(gid)
        d = Deferred.fromCoroutine(self._drain(gid))
        if not d.called:
            self._runs.add(d)
            d.addBoth(lambda _: self._runs.discard(d))

    async def _drain(self, gid: int) -> None:
        """Accept the group's events in order until one is refused or none is left."""
        try:
            q = self._queues[gid]
            while q:
                ev = q[0]
                try:
                    await self._attempt(ev)
                except Exception:
                    self._refused(ev, Failure())
                    self._behind.add(gid)
                    self._waiting.add(gid)
                    for e in q:
                        e.settle()
                    self._schedule()
                    return
                q.popleft()
                self._pending -= 1
                EVENTS_PENDING.set(self._pending)
                if ev.refused:
                    log.info("group event {msg_id} accepted after {n} attempts",
                             msg_id=ev.msg_id, n=ev.attempts)  # fmt: skip
                ev.settle()
            del self._queues[gid]
            self._behind.discard(gid)
            if not self._behind:
                self._delay = self._first_delay  # the queue takes events again
        finally:
            self._active.discard(gid)

    async def _attempt(self, ev: GroupEvent) -> None:
        ev.attempts += 1
        if not ev.accepted:
            # A duplicate answer means an earlier attempt reached the queue (module
            # docstring): nobody was pushed the event then, so it is pushed now either way.
            await maybeDeferred(self._accept, ev.job, ev.client_msg_id)
            ev.accepted = True
            try:
                ev.on_accepted()
            except Exception:
                log.failure("pushing group event {msg_id} failed", msg_id=ev.msg_id)
        if ev.copy is not None:
            await maybeDeferred(self._accept, ev.copy, ev.copy_msg_id)
            ev.copy = None

    def _refused(self, ev: GroupEvent, failure: Failure) -> None:
        if ev.refused:
            return  # logged at its first refusal
        ev.refused = True
        EVENTS_REFUSED.inc()
        what = "its removed users' inbox copy" if ev.accepted else "the event"
        log.failure(
            "persistence queue refused message {msg_id} (group {group}: {what}); retrying in "
            "the background",
            failure, msg_id=ev.msg_id, group=ev.group_id, what=what,
        )  # fmt: skip

    def _schedule(self) -> None:
        if self._closed or self._timer is not None:
            return
        self._timer = self._clock.callLater(self._delay, self._round)
        self._delay = min(self._delay * 2, self._max_delay)

    def _round(self) -> None:
        self._timer = None
        self._retry_waiting()

    def _retry_waiting(self) -> None:
        groups, self._waiting = self._waiting, set()
        for gid in sorted(groups):
            if gid not in self._active and gid in self._queues:
                self._start(gid)

    async def close(self) -> None:
        """At the service's stop: one last attempt of what is pending (the drains under way
        finish), no retry after it; logs the events that remain unaccepted."""
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._retry_waiting()
        await DeferredList(list(self._runs), consumeErrors=True)
        if self._pending:
            ids = self.pending_ids()
            log.error(
                "stopping with {n} group events not accepted by the persistence queue (their "
                "membership changes stand without them): msg_ids {ids}{more}",
                n=len(ids), ids=ids[:SHOWN_IDS], more=" ..." if len(ids) > SHOWN_IDS else "",
            )  # fmt: skip
