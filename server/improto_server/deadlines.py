"""Deadlines of many connections on one reactor timer.

A DelayedCall per connection costs an object, its attribute values, three bound methods and a
heap slot; an entry here is one tuple in a heap (docs/BENCHMARKS.md, idle connections, has the
memory per connection). An entry is never
moved or removed: setting a new deadline adds an entry and leaves the old one stale, to be
skipped when it comes up. Stale entries are compacted away when they pile up, as Twisted does
with cancelled calls.

Entries hold their owner by weak reference: a stale entry must not keep a closed connection
(and whatever it still references) alive until its time comes. A reference without callback
is one object per owner, shared by all its entries (CPython reuses it).
"""

from __future__ import annotations

import heapq
import itertools
import weakref
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

# A timer is never set less than this ahead of now for a deadline still in the future: an
# entry a rounding error ahead of the clock must not make the timer re-fire at once forever.
_MIN_DELAY_S = 0.001
_COMPACT_MIN = 64  # stale entries tolerated before a compaction is considered
# Deadlines served per timer call; the rest that are due wait for the next reactor turn. Two
# thousand connections reaching their login deadline together would otherwise all be closed
# in one call, while every other connection's frames wait behind it.
DUE_PER_TURN = 64


class Timed(Protocol):
    deadline: float | None  # the owner's current deadline (set by Deadlines.set only)

    def deadline_due(self) -> None:
        """The current deadline has come (it is None again when this is called)."""


class Deadlines:
    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, weakref.ref[Timed]]] = []
        self._seq = itertools.count()  # ties: entries never compare owners
        self._timer: IDelayedCall | None = None
        self._timer_at = 0.0
        self._firing = False
        self._stale = 0

    def set(self, owner: Timed, when: float | None) -> None:
        """Make `when` (clock seconds) owner's deadline, replacing any; None: no deadline."""
        if owner.deadline is not None:
            self._stale += 1
        owner.deadline = when
        if when is not None:
            heapq.heappush(self._heap, (when, next(self._seq), weakref.ref(owner)))
            if not self._firing and (self._timer is None or when < self._timer_at):
                self._schedule(when)
        if not self._firing:
            self._collect()

    def __len__(self) -> int:
        """Live deadlines."""
        return len(self._heap) - self._stale

    def _schedule(self, when: float) -> None:
        self._cancel_timer()
        now = self._clock.seconds()
        delay = 0.0 if when <= now else max(when - now, _MIN_DELAY_S)
        self._timer, self._timer_at = self._clock.callLater(delay, self._fire), when

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _fire(self) -> None:
        self._timer = None
        heap = self._heap
        now = self._clock.seconds()
        self._firing = True
        served = 0
        try:
            while heap and heap[0][0] <= now and served < DUE_PER_TURN:
                when, _, ref = heapq.heappop(heap)
                owner = ref()
                if owner is None:  # gone: stale if it cancelled first; never overcount
                    if self._stale:
                        self._stale -= 1
                    continue
                if owner.deadline != when:
                    self._stale -= 1
                    continue
                owner.deadline = None
                served += 1
                try:
                    owner.deadline_due()
                except Exception:
                    log.failure("deadline of {owner} failed", owner=owner)
        finally:
            self._firing = False
        self._collect()
        if self._heap and self._timer is None:
            self._schedule(self._heap[0][0])

    def _collect(self) -> None:
        """Drop stale entries once they are many; with none live, stop the timer as well (a
        server whose connections are all gone leaves no call pending in the reactor)."""
        heap, stale = self._heap, self._stale
        if stale == len(heap):
            heap.clear()
            self._stale = 0
            self._cancel_timer()
        elif stale > _COMPACT_MIN and stale > len(heap) >> 1:
            live: list[tuple[float, int, weakref.ref[Timed]]] = []
            seen: set[int] = set()
            for entry in heap:  # an owner's current entry, once (a deadline set twice alike)
                owner = entry[2]()
                if owner is not None and owner.deadline == entry[0] and id(owner) not in seen:
                    seen.add(id(owner))
                    live.append(entry)
            heapq.heapify(live)
            self._heap = live
            self._stale = 0
