"""Group commit: the calls made during one reactor turn run as one batch.

Many SENDs are in flight at once, and each needs a Redis script and an AMQP publish. Paying a
round trip and a Python call chain per message bounds a gateway at a few thousand messages a
second; coalescing what arrives in the same turn costs at most one turn of latency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

_T = TypeVar("_T")
_R = TypeVar("_R")


class TurnBatcher(Generic[_T, _R]):
    """`submit(item)` returns a Deferred of that item's result. Items submitted in one reactor
    turn, or within `window` seconds of the first when a window is set (or `max_size` of
    them, whichever comes first) go to `run(items)` together, in
    submission order; `run` returns (a Deferred of) one result per item, in order. If it
    fails, every item of the batch fails with that error.

    `adaptive`: gather only under load. An item submitted when no batch runs and none
    started in the last `window` seconds runs at the end of its turn (an idle server waits
    for no company); otherwise it waits for the running batch to finish and for `window`
    after the last batch started (batches start at most once per window, as without
    `adaptive`), and goes with everything that gathered meanwhile (up to `max_size`).

    Results are handed out in submission order across batches too: a batch that finishes
    early waits until the batches before it were handed out. Callers that act on a result
    (publish the job a claim allowed) therefore act in the order they submitted, whatever
    order the connections of a pool answered in."""

    def __init__(
        self,
        reactor: IReactorTime,
        run: Callable[[list[_T]], Deferred[list[_R]] | Sequence[_R]],
        max_size: int,
        window: float = 0.0,
        *,
        adaptive: bool = False,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._reactor = reactor
        self._run = run
        self.max_size = max_size
        self.window = window  # > 0: also gather the items of the next `window` seconds
        self.adaptive = adaptive
        self._running = 0  # batches whose run has not finished yet
        self._started = float("-inf")  # when the last batch started (adaptive)
        self._items: list[_T] = []
        self._waiters: list[Deferred[_R]] = []
        self._scheduled = False
        self._tail: Deferred[None] | None = None  # fires once the last batch was handed out
        self.batches = 0  # batches run so far (for tests and metrics)

    def submit(self, item: _T) -> Deferred[_R]:
        d: Deferred[_R] = Deferred()
        self._items.append(item)
        self._waiters.append(d)
        if len(self._items) >= self.max_size:
            self.flush()
        elif self.adaptive:
            if not self._running and not self._scheduled:
                self._schedule_adaptive()
        elif not self._scheduled:
            self._scheduled = True
            self._reactor.callLater(self.window, self._on_turn)
        return d

    def _schedule_adaptive(self) -> None:
        self._scheduled = True
        wait = self._started + self.window - self._reactor.seconds()
        self._reactor.callLater(max(0.0, wait), self._on_turn)

    def _on_turn(self) -> None:
        self._scheduled = False
        if self.adaptive and self._running:
            return  # a full batch started meanwhile: the rest goes when it is done
        self.flush()

    def flush(self) -> None:
        """Run what is pending now."""
        if not self._items:
            return
        items, waiters = self._items, self._waiters
        self._items, self._waiters = [], []
        self.batches += 1
        self._running += 1
        self._started = self._reactor.seconds()
        d = maybeDeferred(self._run, items)
        prev, mine = self._tail, Deferred[None]()
        self._tail = mine

        def hand_out(result: Any) -> None:
            if isinstance(result, Failure):
                self._fail(result, waiters)
            else:
                self._deliver(result, waiters)
            mine.callback(None)

        def when_done(result: Any) -> None:
            self._running -= 1
            if prev is None:
                hand_out(result)
            else:
                prev.addCallback(lambda _: hand_out(result))
            # What gathered while this batch ran goes now, or once `window` has passed
            # since this batch started.
            if self.adaptive and self._items and not self._running and not self._scheduled:
                if self._started + self.window <= self._reactor.seconds():
                    self.flush()
                else:
                    self._schedule_adaptive()

        d.addBoth(when_done)

    @staticmethod
    def _deliver(results: Sequence[Any], waiters: list[Deferred[Any]]) -> None:
        if len(results) != len(waiters):
            error = RuntimeError(f"batch of {len(waiters)} got {len(results)} results")
            for w in waiters:
                w.errback(error)
            return
        for w, r in zip(waiters, results, strict=True):
            w.callback(r)

    @staticmethod
    def _fail(failure: Failure, waiters: list[Deferred[Any]]) -> None:
        for w in waiters:
            w.errback(failure)
