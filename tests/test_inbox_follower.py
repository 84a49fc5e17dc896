"""InboxFollower (server/improto_server/inbox_follower.py): wire-once notices and the login
watch, on a fake clock with an in-memory inbox built on the InboxStore port's `ids`."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from improto.codec import FrameReader, decode_payload
from improto.frames import InboxNotice, Message
from improto.records import record_of, unpack_record
from improto_server.inbox_follower import (
    ACK_DELAY_S,
    HELD_PER_WINDOW,
    HOLD_S,
    LOGIN_WATCH_S,
    MISSING_PUSH_MAX,
    PUSH_GRACE_S,
    RETRY_FOR_S,
    WATCH_STEPS_S,
    InboxFollower,
)
from improto_server.model import InboxIds, InboxRecords

USER = 7


def _message(msg_id: int) -> Message:
    return Message(msg_id, 1_700_000_000_000, 9, "d", 1, USER, 1, bytes(16), b"hi")


WINDOW = 4


class MemoryInbox:
    """One user's inbox in memory: cursors head + 1, entries removable (a gap)."""

    def __init__(self) -> None:
        self.entries: dict[int, int] = {}  # cursor -> msg_id
        self.head = 0
        self.removed_above = 0  # the highest removed cursor
        self.reads = 0
        self.pages = 0
        self.held: list[Deferred[InboxIds]] | None = None  # reads answered by the test

    def add(self, *msg_ids: int) -> None:
        for m in msg_ids:
            self.head += 1
            self.entries[self.head] = m

    def remove(self, cursor: int) -> None:
        del self.entries[cursor]
        self.removed_above = max(self.removed_above, cursor)

    def page(self, user_id: int, start: int, limit: int, max_bytes: int) -> Deferred[InboxRecords]:
        """Records of the entries after `start`: a real MESSAGE record per msg_id."""
        assert user_id == USER
        self.pages += 1
        got = sorted(c for c in self.entries if c > start)[:limit]
        recs = tuple(record_of(_message(self.entries[c])) for c in got)
        after = [c for c in self.entries if c > start]
        return succeed(InboxRecords(tuple(got), recs, start, len(after) > len(got),
                                    self.removed_above > start))  # fmt: skip

    def ids(self, user_id: int, start: int, limit: int) -> Deferred[InboxIds]:
        assert user_id == USER
        self.reads += 1
        start = min(start, self.head)
        after = sorted(c for c in self.entries if c > start)
        got = after[:limit]
        ids = InboxIds(
            start, tuple(got), tuple(self.entries[c] for c in got), len(after) > limit,
            self.removed_above > start,
        )  # fmt: skip
        if self.held is not None:
            d: Deferred[InboxIds] = Deferred()
            self.held.append(d)
            return d.addCallback(lambda _: ids)
        return succeed(ids)


class Owner:
    """The connection side: what was pushed, and what the follower wrote."""

    def __init__(self) -> None:
        self.user_id = USER
        self.unacked: dict[int, None] | None = {}
        self.out: list[object] = []  # InboxNotice frames and "hint"
        self.stalled = False
        self.window_full = False
        self.done = False
        self._reader = FrameReader()

    def write_notice(self, data: bytes) -> bool:
        if self.stalled:
            return False
        (payload,) = self._reader.feed(data)
        self.out.append(decode_payload(payload))
        return True

    def sync_hint(self) -> None:
        self.out.append("hint")

    def push_missing(self, msg_id: int, data: bytes) -> bool:
        assert self.unacked is not None
        if self.window_full:
            return False
        assert unpack_record(data[4 + 7 :]).msg_id == msg_id  # a whole PUSH frame of it
        self.unacked[msg_id] = None
        self.out.append(f"push {msg_id}")
        return True

    def follower_done(self) -> None:
        self.done = True

    def push(self, follower: InboxFollower, *msg_ids: int, ack: bool = True) -> None:
        assert self.unacked is not None
        for m in msg_ids:
            self.unacked[m] = None
            if ack:
                del self.unacked[m]
                follower.acked(m)

    def ack(self, follower: InboxFollower, msg_id: int) -> None:
        """The client acknowledges a push the follower made (push_missing)."""
        assert self.unacked is not None
        del self.unacked[msg_id]
        follower.acked(msg_id)

    def take(self) -> list[object]:
        out, self.out = self.out, []
        return out


LOGIN_ID = 1000  # the ids below it were accepted before the login, those above after it


def setup(
    wire_once: bool = True, watch: bool = False, login_id: int = LOGIN_ID
) -> tuple[Clock, MemoryInbox, Owner, InboxFollower]:
    clock = Clock()
    clock.advance(1000.0)
    inbox, owner = MemoryInbox(), Owner()
    until = clock.seconds() + LOGIN_WATCH_S if watch else 0.0
    f = InboxFollower(owner, inbox, clock, window=WINDOW, watch_until=until,  # type: ignore[arg-type]
                      wire_once=wire_once, login_id=login_id)  # fmt: skip
    return clock, inbox, owner, f


def synced(f: InboxFollower, cursor: int = 0) -> None:
    """The client's sync loop ended with a final page at `cursor`."""
    f.pull_started()
    f.pull_ended(cursor, has_more=False)


def test_notice_after_acks_covers_the_held_entries() -> None:
    clock, inbox, owner, f = setup()
    inbox.add(100, 101)
    synced(f, 2)
    owner.push(f, 102, 103)
    inbox.add(102, 103)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(2, 4, (102, 103))]
    assert f.cursor == 4 and f.held == 0
    owner.push(f, 104)  # the next one: the notice starts at the last one's `to`
    inbox.add(104)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(4, 5, (104,))]


def test_acks_of_a_burst_share_one_read() -> None:
    clock, inbox, owner, f = setup()
    synced(f)
    inbox.add(1, 2, 3)
    reads = inbox.reads
    owner.push(f, 1, 2, 3)
    clock.advance(ACK_DELAY_S)
    assert inbox.reads == reads + 1 and owner.take() == [InboxNotice(0, 3, (1, 2, 3))]


def test_own_sends_are_held_too() -> None:
    clock, inbox, owner, f = setup()
    synced(f)
    f.sent(50)
    owner.push(f, 51)
    inbox.add(50, 51)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(0, 2, (50, 51))]


def test_no_notice_for_an_unacked_push_until_its_ack() -> None:
    clock, inbox, owner, f = setup()
    synced(f)
    owner.push(f, 1)
    owner.push(f, 2, ack=False)
    owner.push(f, 3)
    inbox.add(1, 2, 3)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(0, 1, (1,))]  # stops before the unacked one
    clock.advance(10.0)
    assert owner.take() == []  # waiting for it: no hint, no notice past it
    assert owner.unacked is not None
    del owner.unacked[2]
    f.acked(2)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(1, 3, (2, 3))]


def test_an_entry_not_held_gets_sync_hint_then_nothing_until_the_next_final_page() -> None:
    clock, inbox, owner, f = setup()
    owner.window_full = True  # so it cannot be pushed from the inbox either
    synced(f)
    owner.push(f, 1)
    inbox.add(1, 99)  # 99 was never pushed here (window full, or accepted before login)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(0, 1, (1,)), "hint"]
    owner.push(f, 2)
    inbox.add(2)
    clock.advance(5.0)
    assert owner.take() == []  # the client is syncing: no notice meanwhile
    synced(f, 3)  # its final page
    owner.push(f, 4)
    inbox.add(4)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(3, 4, (4,))]


def test_a_gap_gets_sync_hint() -> None:
    clock, inbox, owner, f = setup()
    synced(f)
    owner.push(f, 1, 2)
    inbox.add(1, 2)
    inbox.remove(1)  # removed by retention or a cap before the notice
    clock.advance(ACK_DELAY_S)
    assert owner.take() == ["hint"]


def test_held_ids_not_in_the_inbox_yet_are_read_again() -> None:
    clock, inbox, owner, f = setup()
    synced(f)
    owner.push(f, 1)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == []
    clock.advance(0.5)  # persisted late
    inbox.add(1)
    clock.advance(3.0)
    assert owner.take() == [InboxNotice(0, 1, (1,))]


def test_reads_for_held_ids_stop_after_a_while() -> None:
    clock, inbox, owner, f = setup()
    synced(f)
    owner.push(f, 1)  # its entry does not come (a persister far behind)
    reads = inbox.reads
    for _ in range(600):
        clock.advance(0.1)
    assert inbox.reads - reads < 3 * RETRY_FOR_S  # less and less often, then not at all
    assert not clock.getDelayedCalls() and owner.take() == []
    inbox.add(1, 2)  # 1 at last; a later ack reads at once
    owner.push(f, 2)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(0, 2, (1, 2))]


def test_nothing_is_read_while_a_pull_is_in_flight() -> None:
    clock, inbox, owner, f = setup()
    synced(f)
    f.pull_started()  # the client pulls again
    owner.push(f, 1)
    inbox.add(1)
    reads = inbox.reads
    clock.advance(5.0)
    assert owner.take() == [] and inbox.reads == reads
    f.pull_ended(1, has_more=False)  # the page held the entry: nothing to notice
    clock.advance(5.0)
    assert owner.take() == []


def test_a_read_overtaken_by_a_page_is_dropped() -> None:
    clock, inbox, owner, f = setup()
    synced(f)
    inbox.held = []
    owner.push(f, 1)
    inbox.add(1)
    clock.advance(ACK_DELAY_S)
    (read,) = inbox.held
    synced(f, 1)  # a page went out while the read was in flight
    read.callback(None)
    assert owner.take() == []  # a notice from 0 would not match the client's cursor
    inbox.held = None
    owner.push(f, 2)
    inbox.add(2)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(1, 2, (2,))]


def test_no_notice_before_the_sync_loop_ended() -> None:
    clock, inbox, owner, f = setup()
    owner.push(f, 1)
    inbox.add(1)
    clock.advance(5.0)
    assert owner.take() == []  # no page yet: the client's cursor is unknown
    f.pull_started()
    f.pull_ended(0, has_more=True)  # not the last page
    clock.advance(5.0)
    assert owner.take() == []


def test_more_entries_than_one_notice_holds() -> None:
    clock, inbox, owner, f = setup()
    f._max_held = 1000  # type: ignore[attr-defined]  # room for 250
    synced(f)
    ids = list(range(1, 251))
    owner.push(f, *ids)
    inbox.add(*ids)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(0, 200, tuple(ids[:200])),
                            InboxNotice(200, 250, tuple(ids[200:]))]  # fmt: skip


def test_stalled_output_delays_the_notice() -> None:
    clock, inbox, owner, f = setup()
    synced(f)
    owner.stalled = True
    owner.push(f, 1)
    inbox.add(1)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [] and f.cursor == 0
    owner.stalled = False
    clock.advance(1.0)
    assert owner.take() == [InboxNotice(0, 1, (1,))]


def test_login_race_gets_sync_hint() -> None:
    """v1 client: its final page was empty; the entry of a message accepted before its login
    appears 50 ms later, never pushed to it."""
    clock, inbox, owner, f = setup(wire_once=False, watch=True)
    synced(f)
    clock.advance(0.05)
    inbox.add(42)
    clock.advance(WATCH_STEPS_S[2] - 0.05 + 1e-6)  # the read at +70 ms
    assert owner.take() == ["hint"]
    clock.advance(5.0)
    assert owner.take() == [] and owner.done  # watch over: the connection drops it


def test_login_watch_no_hint_when_the_late_entry_was_pushed() -> None:
    clock, inbox, owner, f = setup(wire_once=False, watch=True)
    synced(f)
    owner.push(f, 42)  # acknowledged
    owner.push(f, 43, ack=False)  # pushed, not acknowledged yet: the client has it too
    clock.advance(0.05)
    inbox.add(42, 43)
    clock.advance(WATCH_STEPS_S[-1] + 1.0)
    assert owner.take() == []  # v1: no notices, and nothing to hint
    assert f.cursor == 0 and owner.done  # the client's cursor: its page's


def test_wire_once_enabled_after_the_final_page_notices_what_was_acked() -> None:
    clock, inbox, owner, f = setup(wire_once=False, watch=True)
    synced(f, 0)
    owner.push(f, 42)
    inbox.add(42)
    clock.advance(WATCH_STEPS_S[1])  # the watch read it: pushed, nothing to say
    assert owner.take() == []
    f.set_wire_once(True)
    owner.push(f, 43)
    inbox.add(43)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(0, 2, (42, 43))]  # from the page's cursor


def test_login_watch_reads_at_the_steps_then_stops() -> None:
    clock, inbox, owner, f = setup(wire_once=False, watch=True)
    synced(f)
    for _ in range(400):
        clock.advance(0.01)
    assert inbox.reads == len(WATCH_STEPS_S)  # one read per step, none after
    assert owner.take() == [] and owner.done


def test_login_watch_ignores_pages_after_it() -> None:
    clock, inbox, owner, f = setup(wire_once=False, watch=True)
    clock.advance(LOGIN_WATCH_S)
    assert owner.done  # no page in the watch: nothing kept
    clock, inbox, owner, f = setup(wire_once=False, watch=True)
    clock.advance(LOGIN_WATCH_S - 0.001)
    synced(f)  # the last moment of the watch: its steps still run
    inbox.add(9)
    clock.advance(0.01)
    assert owner.take() == ["hint"]


def test_held_ids_are_bounded_and_forgotten() -> None:
    clock, inbox, owner, f = setup()
    synced(f)
    owner.push(f, *range(1, 10 * WINDOW))
    assert f.held == HELD_PER_WINDOW * WINDOW
    clock.advance(HOLD_S + 5.0)
    assert f.held == 0
    inbox.add(1)  # its entry came after all: not held any more -> pushed again, never noticed
    owner.push(f, 500)
    inbox.add(500)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == ["push 1"]
    owner.ack(f, 1)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(0, 2, (1, 500))]


def test_timers_are_cancelled_on_close() -> None:
    clock, _, owner, f = setup()
    synced(f)
    owner.push(f, 1)
    assert clock.getDelayedCalls()
    f.close()
    assert clock.getDelayedCalls() == [] and f.held == 0
    clock, _, owner, f = setup(wire_once=False, watch=True)
    synced(f)
    assert clock.getDelayedCalls()
    f.close()
    assert clock.getDelayedCalls() == []


def test_no_timer_left_once_everything_was_noticed() -> None:
    clock, inbox, owner, f = setup()
    synced(f)
    owner.push(f, 1)
    inbox.add(1)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(0, 1, (1,))]
    assert clock.getDelayedCalls() == []  # an idle wire-once connection costs no timer


def test_an_entry_accepted_after_login_waits_for_its_push() -> None:
    """The persister may write an entry before the gateway pushes it: a message accepted
    after the login gets PUSH_GRACE_S for its push before it counts as not held."""
    clock, inbox, owner, f = setup()
    synced(f)
    inbox.add(LOGIN_ID + 1)  # written before its push reached this connection
    owner.push(f, LOGIN_ID + 2)
    inbox.add(LOGIN_ID + 2)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == []  # neither a notice past it nor a hint yet
    owner.push(f, LOGIN_ID + 1)  # the push arrives within the grace time
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(0, 2, (LOGIN_ID + 1, LOGIN_ID + 2))]


def test_an_entry_accepted_after_login_never_pushed_is_hinted_after_the_grace() -> None:
    clock, inbox, owner, f = setup()
    synced(f)
    owner.push(f, LOGIN_ID + 1)
    inbox.add(LOGIN_ID + 1, LOGIN_ID + 5)  # + 5: its push was lost (window, a dead route)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(0, 1, (LOGIN_ID + 1,))]
    clock.advance(PUSH_GRACE_S / 2)
    assert owner.take() == []
    clock.advance(PUSH_GRACE_S)
    assert owner.take() == [f"push {LOGIN_ID + 5}"]  # from the inbox: nothing else again
    owner.ack(f, LOGIN_ID + 5)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(1, 2, (LOGIN_ID + 5,))]


def test_an_entry_from_before_the_login_is_hinted_at_once() -> None:
    clock, inbox, owner, f = setup(wire_once=False, watch=True)
    synced(f)
    inbox.add(LOGIN_ID - 1)  # accepted before the login, persisted after the first page
    clock.advance(WATCH_STEPS_S[0])
    assert owner.take() == ["hint"]


def test_entries_never_pushed_here_are_pushed_from_the_inbox_then_noticed() -> None:
    """Own group events, lost pushes, pre-login messages: pushed once from the inbox, so the
    connection's pull does not bring again what it holds."""
    clock, inbox, owner, f = setup()
    synced(f)
    owner.push(f, 1)
    inbox.add(1, 90, 91)  # 90 and 91 were never pushed here
    owner.push(f, 2)
    inbox.add(2)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(0, 1, (1,)), "push 90", "push 91"]
    assert inbox.pages == 1  # their records in one read
    owner.ack(f, 90)
    owner.ack(f, 91)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == [InboxNotice(1, 4, (90, 91, 2))]


def test_a_long_run_never_pushed_gets_sync_hint() -> None:
    clock, inbox, owner, f = setup()
    synced(f)
    inbox.add(*range(100, 101 + MISSING_PUSH_MAX))  # the window overflowed: the client pulls
    owner.push(f, 1)
    inbox.add(1)
    clock.advance(ACK_DELAY_S)
    assert owner.take() == ["hint"]
    assert inbox.pages == 0


def test_without_wire_once_a_missing_entry_is_hinted_not_pushed() -> None:
    clock, inbox, owner, f = setup(wire_once=False, watch=True)
    synced(f)
    inbox.add(LOGIN_ID - 5)
    clock.advance(WATCH_STEPS_S[0])
    assert owner.take() == ["hint"] and inbox.pages == 0
