"""The login watch for large groups' timelines (PROTOCOL.md 20.6): a message accepted before
a login whose timeline record is written after that login's TIMELINE_HEADS answer was never
pushed to the connection and is not in its answer, so nothing would tell the client. For
LOGIN_WATCH_S after HELLO_OK, each TIMELINE_HEADS answer is followed by reads of the user's
heads at WATCH_STEPS_S after it (the inbox follower's steps); a group whose `done` grew past
the answer with a message accepted before the login (msg_id below the login's id: a message
accepted later is pushed here, or its skip is hinted by the push window) gets one SYNC_HINT,
after which the client's sync loop asks for the heads again. A group that grew by more than
a page is hinted without looking further. A hint the client did not need only costs it a
sync loop; one it needed and did not get would leave the message until the next login."""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from improto_server.inbox_follower import WATCH_STEPS_S
from improto_server.model import TimelineHead
from improto_server.ports import TimelineStore

log = Logger()
_MSG_ID = struct.Struct(">Q")  # a MESSAGE record starts with its msg_id

WATCH_PAGE = 200  # records read per grown group and step
WATCH_PAGE_BYTES = 256 * 1024


class TimelineWatch:
    """One connection's watch of its user's timelines after a TIMELINE_HEADS answer."""

    def __init__(
        self,
        hint: Callable[[], None],
        store: TimelineStore,
        heads_of: Callable[[], Deferred[dict[int, TimelineHead]]],
        clock: IReactorTime,
        *,
        login_id: int,
        until: float,
    ) -> None:
        """`hint()`: send the connection a SYNC_HINT; `heads_of()`: the heads of the user's
        groups that have a timeline, read now; `login_id`: a msg_id taken at HELLO_OK;
        `until`: when the login watch ends."""
        self._hint = hint
        self._store = store
        self._heads_of = heads_of
        self._clock = clock
        self._login_id = login_id
        self._until = until
        self._done: dict[int, int] = {}  # group_id -> the done last answered or checked
        self._answered_at = 0.0
        self._step = 0
        self._timer: IDelayedCall | None = None
        self._epoch = 0  # a read that a newer answer or close() overtook is dropped
        self.reads = 0  # head reads made (tests)

    @property
    def active(self) -> bool:
        return self._timer is not None

    def answered(self, done: Mapping[int, int]) -> None:
        """A TIMELINE_HEADS_PAGE with these heads (group_id -> done) went out."""
        self._cancel()
        self._epoch += 1
        self._done = dict(done)
        self._answered_at = self._clock.seconds()
        self._step = 0
        self._schedule()

    def close(self) -> None:
        self._cancel()
        self._epoch += 1
        self._done = {}

    def _cancel(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _schedule(self) -> None:
        self._timer = None  # the watch is over until another answer within it, unless:
        if self._step < len(WATCH_STEPS_S):
            at = self._answered_at + WATCH_STEPS_S[self._step]
            self._step += 1
            if at < self._until:
                delay = max(0.0, at - self._clock.seconds())
                self._timer = self._clock.callLater(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        epoch = self._epoch
        d = Deferred.fromCoroutine(self._check(epoch))
        d.addErrback(lambda f: log.failure("timeline login watch read failed", f))
        d.addBoth(lambda _: self._schedule() if epoch == self._epoch else None)

    async def _check(self, epoch: int) -> None:
        self.reads += 1
        heads = await self._heads_of()
        for gid in sorted(heads):
            if epoch != self._epoch:
                return
            now_done, was = heads[gid].done, self._done.get(gid, 0)
            if now_done <= was:
                continue
            page = await self._store.after(gid, was, WATCH_PAGE, WATCH_PAGE_BYTES)
            if epoch != self._epoch:
                return
            early = any(_MSG_ID.unpack_from(r)[0] < self._login_id for r in page.records)
            if early or page.has_more:
                self._epoch += 1  # nothing more until the client's next TIMELINE_HEADS
                self._step = len(WATCH_STEPS_S)
                self._hint()
                return
            self._done[gid] = max(was, page.first_seq + len(page.records) - 1)
