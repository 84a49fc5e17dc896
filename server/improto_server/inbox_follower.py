"""What one connection's inbox holds beyond its last page: wire-once notices and the login
watch (PROTOCOL.md section 18).

A connection's sync loop ends with a page whose has_more is 0: the connection's cursor is
that page's cursor. Entries after it appear later, as the persister writes the messages
accepted meanwhile. The follower reads their ids (`InboxStore.ids`, no records) and compares
them with what this connection already holds: messages pushed to it and acknowledged
(PUSH_ACK) or sent by it (its SEND_ACK).

- WIRE_ONCE: a run of held entries right after the cursor becomes one INBOX_NOTICE(from =
  the cursor, to = the run's last cursor, their msg_ids) and the cursor moves to `to`; the
  client moves its cursor without downloading them again.
- Login watch (every client, version 1 too): for LOGIN_WATCH_S after HELLO_OK, each final
  page is followed by reads at WATCH_STEPS_S after it, so that a message accepted before the
  login whose entry appeared after that page, never pushed here, is not left unannounced.

An entry that is neither held nor pushed (a push lost or refused by a full window, accepted
before the login, a group event of one's own change): with WIRE_ONCE, a short run of them
(at most MISSING_PUSH_MAX) is pushed now from the inbox, and the notice goes on once they are
acknowledged, so nothing the connection already holds is sent again. A longer run (the window
overflowed), a gap, a read that does not start where expected, or any such entry without
WIRE_ONCE gets one SYNC_HINT, and nothing more until the next final page: the client's sync
loop catches up.
A pushed entry not yet acknowledged stops a notice there until its PUSH_ACK. An entry of a
message accepted after the login (msg_id above the login's id) that is not pushed yet waits
PUSH_GRACE_S before it counts as not held: the persister can write the entry before the
gateway that accepted it pushes it (a broker delivers to the persister before it confirms to
the publisher; a push routed from another gateway takes a hop more).

Nothing is read while an OFFLINE_PULL is in flight (its page moves the cursor), and a read
that a page overtook is dropped. One timer and one read at a time per connection: acks
arriving together share one read ACK_DELAY_S after the first; held ids whose entries have
not appeared yet are read for again, less and less often, for RETRY_FOR_S. What is held is
bounded (HELD_PER_WINDOW x the push window, the oldest forgotten first) and forgotten after
HOLD_S: an entry forgotten is treated as not held (a SYNC_HINT, never a wrong notice).
"""

from __future__ import annotations

import struct
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto import records
from improto.limits import NOTICE_MAX_IDS
from improto_server.model import InboxIds, InboxRecords
from improto_server.ports import InboxStore

log = Logger()
_MSG_ID = struct.Struct(">Q")

LOGIN_WATCH_S = 3.0  # after HELLO_OK: final pages in this time are watched
# Reads after a final page in the login watch, in seconds after the page: doubling steps, so
# a slow persister (entries appear a few ms after SEND_ACK, more under load) is caught early
# without reading often.
WATCH_STEPS_S = (0.01, 0.03, 0.07, 0.15, 0.31, 0.63, 1.27, 2.55)
ACK_DELAY_S = 0.5  # an ack's read waits this long, so the acks of half a second share one
# notice (a notice is 37 bytes and 8 per id: one per message would add a fifth to a short one)
RETRY_MAX_S = 0.64  # held ids not in the inbox yet: re-read, doubling up to this interval,
RETRY_FOR_S = 10.0  # for this long after the newest of them was held (a persister behind)
HOLD_S = 30.0  # a held id whose entry did not appear in this time is forgotten
STALLED_RETRY_S = 0.1  # a notice the stalled output could not take: tried again after this
HELD_PER_WINDOW = 4  # held ids kept at most, per id of the push window
PUSH_GRACE_S = 0.5  # an entry accepted after the login may wait this long for its push
MISSING_PUSH_MAX = 8  # entries never pushed here that are pushed from the inbox, not hinted


class Followed(Protocol):
    """The connection a follower works for (improto_server.session.Session)."""

    user_id: int
    unacked: dict[int, float] | None  # msg_ids pushed and not yet acknowledged (-> when)

    def write_notice(self, data: bytes) -> bool:
        """Write an INBOX_NOTICE frame now; False if the output is stalled (nothing written)."""

    def push_missing(self, msg_id: int, data: bytes) -> bool:
        """PUSH a message from the inbox now, in the push window; False (nothing written) if
        the window has no room or the output is stalled."""

    def sync_hint(self) -> None:
        """Send SYNC_HINT (once the output drains, if it is stalled)."""

    def follower_done(self) -> None:
        """The follower has nothing left to do: drop it."""


class InboxFollower:
    __slots__ = (
        "_again",
        "_checked",
        "_clock",
        "_closed",
        "_cursor",
        "_epoch",
        "_final",
        "_grace",
        "_held",
        "_inbox",
        "_login_id",
        "_max_held",
        "_owner",
        "_page_at",
        "_pulls",
        "_reading",
        "_retry",
        "_step",
        "_timer",
        "_watch_until",
        "wire_once",
    )

    def __init__(
        self,
        owner: Followed,
        inbox: InboxStore,
        clock: IReactorTime,
        *,
        window: int,
        watch_until: float,
        wire_once: bool = False,
        login_id: int = 0,
    ) -> None:
        self._owner = owner
        self._inbox = inbox
        self._clock = clock
        self._max_held = HELD_PER_WINDOW * window
        self._watch_until = watch_until  # final pages before this are watched
        self.wire_once = wire_once
        # a msg_id taken at HELLO_OK: messages above it were accepted after the login, so
        # they are pushed here (or hinted by the window) unless this connection went away
        self._login_id = login_id
        self._grace: tuple[int, float] | None = None  # (msg_id, first seen) waiting for a push
        self._cursor = 0  # the connection's cursor: its last page's, or the last notice's `to`
        self._checked = 0  # without WIRE_ONCE: the entries up to here are known to be held
        self._final = False  # that page had has_more 0 (and no SYNC_HINT since)
        self._pulls = 0  # OFFLINE_PULLs in flight
        self._epoch = 0  # pulls started and pages sent: a read older than one is dropped
        self._held: dict[int, float] = {}  # msg_id -> when it was held (oldest first)
        self._page_at: float | None = None  # the watched final page: when it went out
        self._step = 0  # the next of WATCH_STEPS_S after it
        self._retry = ACK_DELAY_S  # the wait before re-reading for held ids not seen yet
        self._timer: IDelayedCall | None = None
        self._reading = False  # a read is in flight
        self._again = False  # an ack came during it: read again soon
        self._closed = False
        if not wire_once:
            self._after()  # a login watch alone: done at its end if no page comes

    # ---------------------------------------------------------------- events

    def pull_started(self) -> None:
        self._pulls += 1
        self._epoch += 1

    def pull_ended(self, cursor: int | None, has_more: bool = False) -> None:
        """An OFFLINE_PULL was answered: its page's cursor and has_more, or None (failed)."""
        self._pulls = max(0, self._pulls - 1)
        self._epoch += 1
        if self._closed or cursor is None:
            return
        self._cursor = self._checked = cursor
        self._final = not has_more
        if self._final and self._pulls == 0:
            now = self._clock.seconds()
            if now < self._watch_until:
                self._page_at, self._step = now, 0
            self._retry = ACK_DELAY_S
            if self.wire_once and self._held:
                self._soon(ACK_DELAY_S)
            else:
                self._after()

    def acked(self, msg_id: int) -> None:
        """A message pushed here was acknowledged (PUSH_ACK)."""
        self._hold(msg_id)

    def sent(self, msg_id: int) -> None:
        """This connection sent the message (its SEND_ACK went out)."""
        self._hold(msg_id)

    def hinted(self) -> None:
        """The connection sent a SYNC_HINT of its own: its client runs the sync loop."""
        self._final = False
        self._page_at = None

    def set_wire_once(self, on: bool) -> None:
        """Notices from now on (the cursor is still the last page's: what was acknowledged
        since is held), or no more."""
        self.wire_once = on
        self._checked = self._cursor
        if not on:
            self._after()

    def close(self) -> None:
        self._closed = True
        self._held.clear()
        self._cancel()

    @property
    def held(self) -> int:
        """How many msg_ids are held (tests, memory)."""
        return len(self._held)

    @property
    def cursor(self) -> int:
        return self._cursor

    # ------------------------------------------------------------- holding

    def _hold(self, msg_id: int) -> None:
        if self._closed:
            return
        held = self._held
        now = self._clock.seconds()
        if msg_id not in held:
            held[msg_id] = now
            if len(held) > self._max_held:
                del held[next(iter(held))]  # the oldest: treated as not held from now on
        if self.wire_once:
            self._retry = ACK_DELAY_S
            if self._reading:
                self._again = True
            else:
                self._soon(ACK_DELAY_S)

    def _expire(self, now: float) -> None:
        held = self._held
        while held:
            msg_id, since = next(iter(held.items()))
            if since > now - HOLD_S:
                break
            del held[msg_id]

    # -------------------------------------------------------------- timing

    def _soon(self, delay: float) -> None:
        """Read within `delay` seconds (an earlier timer stays)."""
        self._at(self._clock.seconds() + delay)

    def _at(self, when: float) -> None:
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return
            timer.cancel()
        self._timer = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._fire)

    def _cancel(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _after(self) -> None:
        """Set the timer for whatever comes next: a watch step, a re-read for held ids not
        seen yet, the end of the login watch; or, with nothing left, let the connection drop
        this follower."""
        if self._closed or self._reading:
            return
        now = self._clock.seconds()
        self._expire(now)
        when: float | None = None
        if self._page_at is not None:
            steps = [self._page_at + s for s in WATCH_STEPS_S[self._step :]]
            while steps and steps[0] <= now:
                steps.pop(0)
                self._step += 1
            if steps:
                when = steps[0]
            else:
                self._page_at = None
        if self._grace is not None:
            until = self._grace[1] + PUSH_GRACE_S
            when = min(when, until) if when is not None else until
        if self._again:
            self._again = False
            when = min(when, now + ACK_DELAY_S) if when is not None else now + ACK_DELAY_S
        elif (
            self.wire_once
            and self._final
            and self._held
            and next(reversed(self._held.values())) > now - RETRY_FOR_S
        ):
            retry = now + self._retry
            self._retry = min(self._retry * 2, RETRY_MAX_S)
            when = min(when, retry) if when is not None else retry
        if when is None and not self.wire_once:
            if now < self._watch_until:
                when = self._watch_until  # then, with no page watched, done
            else:
                self.close()
                self._owner.follower_done()
                return
        if when is None:
            self._cancel()
        else:
            self._at(when)

    # ---------------------------------------------------------------- reads

    def _ready(self) -> bool:
        return not self._closed and self._final and self._pulls == 0

    def _fire(self) -> None:
        self._timer = None
        if self._reading:  # one read at a time: the next one once it is back
            self._again = True
            return
        if not self._ready() or (not self.wire_once and self._page_at is None):
            self._after()  # nothing to read (a login watch's end: done)
            return
        self._reading = True
        start = self._start()
        d = self._inbox.ids(self._owner.user_id, start, NOTICE_MAX_IDS)
        d.addCallbacks(self._read, self._read_failed, (self._epoch, start))

    def _start(self) -> int:
        return self._cursor if self.wire_once else self._checked

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        log.failure("reading inbox ids of user {user} failed", failure, user=self._owner.user_id)
        self._after()  # the next step or retry reads again

    def _read(self, ids: InboxIds, epoch: int, start: int) -> None:
        self._reading = False
        if not self._ready() or epoch != self._epoch or start != self._start():
            self._after()  # a page overtook the read: its cursor is the one to follow
            return
        held = self._held
        pushed = self._owner.unacked or {}
        taken: list[int] = []  # held entries right after the cursor, in cursor order
        last = start
        stray = ids.gap or ids.start != start
        waiting = False
        missing: list[tuple[int, int]] = []  # a run of entries never pushed here
        grace, self._grace = self._grace, None
        for cursor, msg_id in zip(ids.cursors, ids.msg_ids, strict=True):
            if stray or cursor != last + 1:
                stray = True  # a removed entry: the client must see the gap itself
                break
            if msg_id in held:
                taken.append(msg_id)
            elif msg_id in pushed:
                if self.wire_once:
                    waiting = True  # its PUSH_ACK triggers the next read
                    break
            elif msg_id > self._login_id and self._pushing(msg_id, grace):
                waiting = True  # its push may still be on its way: read again then
                break
            else:
                stray = True
                if self.wire_once:
                    missing = self._missing_run(ids, cursor)
                break
            last = cursor
        if last > start and self.wire_once:
            if not self._notice(start, last, taken):
                self._soon(STALLED_RETRY_S)  # output stalled: again once it may have drained
                return
            self._cursor = self._checked = last
            for msg_id in taken:
                held.pop(msg_id, None)
        elif last > start:
            self._checked = last  # known; still held, should WIRE_ONCE be enabled now
        if missing:
            self._reading = True  # their records first; one read at a time
            d = self._inbox.page(
                self._owner.user_id, missing[0][0] - 1, len(missing), records.OFFLINE_RECORD_BYTES
            )
            d.addCallbacks(self._push_missing, self._read_failed, (self._epoch, last, missing))
            return
        if stray:
            self._hint()
            return
        if ids.has_more and not waiting and last > start:
            self._soon(0.0)  # more entries than one read returns
            return
        self._after()

    def _hint(self) -> None:
        self._final = False  # no notice until the next final page
        self._page_at = None
        self._owner.sync_hint()
        self._after()

    def _missing_run(self, ids: InboxIds, first: int) -> list[tuple[int, int]]:
        """The entries from cursor `first` on that were never pushed here, consecutive and
        at most MISSING_PUSH_MAX, if the run ends before that (else [], a SYNC_HINT)."""
        held, pushed = self._held, self._owner.unacked or {}
        run: list[tuple[int, int]] = []
        for cursor, msg_id in zip(ids.cursors, ids.msg_ids, strict=True):
            if cursor < first:
                continue
            if cursor != first + len(run) or msg_id in held or msg_id in pushed:
                return run  # a held, pushed or removed entry ends the run
            if len(run) == MISSING_PUSH_MAX:
                return []  # more than a few: the window overflowed, the client pulls
            run.append((cursor, msg_id))
        return run if not ids.has_more else []

    def _push_missing(
        self, page: InboxRecords, epoch: int, start: int, missing: list[tuple[int, int]]
    ) -> None:
        self._reading = False
        if not self._ready() or epoch != self._epoch or start != self._start():
            self._after()
            return
        found = dict(zip(page.cursors, page.records, strict=True))
        for cursor, msg_id in missing:
            record = found.get(cursor)
            if (
                record is None
                or _MSG_ID.unpack_from(record)[0] != msg_id  # a MESSAGE record starts with it
                or not self._owner.push_missing(msg_id, records.push_frame(record))
            ):
                self._hint()  # removed meanwhile, or no room: the client's pull brings it
                return
        self._after()  # their PUSH_ACKs make the next read

    def _pushing(self, msg_id: int, grace: tuple[int, float] | None) -> bool:
        """Whether the not-yet-pushed entry `msg_id` is still in its grace time (first seen
        now, or less than PUSH_GRACE_S ago); the follower then reads again when it ends."""
        now = self._clock.seconds()
        first = grace[1] if grace is not None and grace[0] == msg_id else now
        if now >= first + PUSH_GRACE_S:
            return False
        self._grace = (msg_id, first)
        return True

    def _notice(self, start: int, last: int, taken: list[int]) -> bool:
        # Every entry in (start, last] is held (a pushed one stops the run in wire-once).
        return self._owner.write_notice(records.inbox_notice(start, last, taken))
