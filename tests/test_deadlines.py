"""Deadlines: many owners' deadlines on one reactor timer (server/deadlines.py)."""

from __future__ import annotations

import gc
import weakref

from twisted.internet.task import Clock

from improto_server.deadlines import DUE_PER_TURN, Deadlines


class Owner:
    def __init__(self, name: str, log: list[tuple[str, float]], clock: Clock) -> None:
        self.name, self.log, self.clock = name, log, clock
        self.deadline: float | None = None

    def deadline_due(self) -> None:
        assert self.deadline is None
        self.log.append((self.name, self.clock.seconds()))


def _setup() -> tuple[Clock, Deadlines, list[tuple[str, float]]]:
    clock = Clock()
    clock.advance(1_700_000_000.25)  # an epoch-sized time: float rounding is real
    return clock, Deadlines(clock), []


def test_deadlines_fire_in_order_at_their_time_on_one_timer() -> None:
    clock, d, log = _setup()
    now = clock.seconds()
    owners = [Owner(n, log, clock) for n in "abc"]
    for owner, delay in zip(owners, (30.0, 10.0, 20.0), strict=True):
        d.set(owner, now + delay)
    assert len(clock.getDelayedCalls()) == 1 and len(d) == 3
    clock.advance(9.999)
    assert log == []
    clock.pump([0.001, 10, 10])
    assert [n for n, _ in log] == ["b", "c", "a"]
    assert [t - now for _, t in log] == [10.0, 20.0, 30.0]
    assert clock.getDelayedCalls() == [] and len(d) == 0


def test_a_replaced_or_cleared_deadline_does_not_fire() -> None:
    clock, d, log = _setup()
    now = clock.seconds()
    a, b = Owner("a", log, clock), Owner("b", log, clock)
    d.set(a, now + 10)
    d.set(b, now + 10)
    d.set(a, now + 5)  # earlier: the timer moves
    d.set(b, None)
    clock.advance(5)
    assert log == [("a", now + 5)]
    clock.advance(100)
    assert log == [("a", now + 5)] and clock.getDelayedCalls() == []


def test_an_owner_may_set_its_next_deadline_when_called() -> None:
    clock, d, log = _setup()
    now = clock.seconds()

    class Again(Owner):
        def deadline_due(self) -> None:
            super().deadline_due()
            if len(self.log) < 3:
                d.set(self, self.clock.seconds() + 1)

    again = Again("x", log, clock)  # the owner's holder keeps it: entries hold it weakly
    d.set(again, now + 1)
    clock.pump([1, 1, 1, 1])
    assert [t - now for _, t in log] == [1, 2, 3]
    assert clock.getDelayedCalls() == []


def test_no_call_stays_pending_when_every_deadline_is_cleared() -> None:
    clock, d, log = _setup()
    owners = [Owner(str(i), log, clock) for i in range(500)]
    for i, owner in enumerate(owners):
        d.set(owner, clock.seconds() + 60 + i)
    for owner in owners[:400]:
        d.set(owner, None)
    assert len(d) == 100 and len(d._heap) < 500  # stale entries were compacted
    for owner in owners[400:]:
        d.set(owner, None)
    assert len(d) == 0 and d._heap == [] and clock.getDelayedCalls() == []
    clock.advance(1000)
    assert log == []


def test_a_failing_owner_does_not_stop_the_others() -> None:
    clock, d, log = _setup()
    now = clock.seconds()

    class Broken(Owner):
        def deadline_due(self) -> None:
            raise RuntimeError("boom")

    broken, fine = Broken("x", log, clock), Owner("y", log, clock)
    d.set(broken, now + 1)
    d.set(fine, now + 1)
    clock.advance(1)
    assert log == [("y", now + 1)]


def test_an_entry_does_not_keep_its_owner_alive() -> None:
    # A closed connection must be freed by reference counting alone, its stale entry with it.
    clock, d, log = _setup()
    now = clock.seconds()
    kept, dropped, cancelled = (Owner(n, log, clock) for n in "kdc")
    for owner in (kept, dropped, cancelled):
        d.set(owner, now + 10)
    d.set(cancelled, None)
    refs = weakref.ref(dropped), weakref.ref(cancelled)
    gc.disable()
    try:
        del dropped, cancelled, owner  # (the loop variable held the last one)
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()
    clock.advance(10)
    assert log == [("k", now + 10)]
    assert len(d) == 0 and d._heap == [] and clock.getDelayedCalls() == []


def _one_turn(clock: Clock) -> None:
    """Run the calls due now, not those they schedule (Clock.advance would run those too)."""
    due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
    for call in due:
        func, args, kw = call.func, call.args, call.kw
        call.cancel()  # out of the clock (it drops func), then run as the reactor would
        func(*args, **kw)


def test_many_due_at_once_are_served_a_bounded_number_per_turn() -> None:
    clock, d, log = _setup()
    now = clock.seconds()
    n = 2 * DUE_PER_TURN + 5
    owners = [Owner(str(i), log, clock) for i in range(n)]
    for owner in owners:
        d.set(owner, now + 10.0)
    clock.advance(9.0)
    clock.rightNow += 1.0  # due now, nothing run yet
    _one_turn(clock)
    assert len(log) == DUE_PER_TURN  # the rest waits for the next turn
    assert [c.getTime() for c in clock.getDelayedCalls()] == [clock.seconds()]
    _one_turn(clock)
    assert len(log) == 2 * DUE_PER_TURN
    _one_turn(clock)
    assert [name for name, _ in log] == [str(i) for i in range(n)] and len(d) == 0
    assert clock.getDelayedCalls() == []
