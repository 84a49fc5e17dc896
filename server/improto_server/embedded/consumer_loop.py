"""The lifecycle the embedded queues share: one in-process consumer loop per queue, started by
`consume`, woken when a job arrives, paused between retries, and stopped by `close` once the
handler call in flight has finished. Each queue writes its own `_run` (how it reads and
removes its jobs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from improto_server.embedded.database import Event

RETRY_DELAY_S = 0.5  # pause before redelivering a batch whose handler failed


class ConsumerLoop:
    """`_run()` is the loop: it waits on `_idle` when there is nothing to do, sleeps with
    `_pause`, returns once `_stopping`, and sets `_stopped` at its end."""

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._handler: Callable[[Any], Deferred[None]] | None = None
        self._max_batch = 1
        self._stopping = False
        self._stopped = Event()
        self._signalled = False  # a job arrived since the loop last looked
        self._idle: Deferred[None] | None = None
        self._sleep: tuple[Deferred[None], IDelayedCall] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def consume(self, handler: Callable[[Any], Deferred[None]], max_batch: int = 1) -> None:
        if self._handler is not None:
            raise RuntimeError("consume() may be called once")
        if self._stopping:
            raise RuntimeError("queue is closed")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._handler = handler
        self._max_batch = max_batch
        Deferred.fromCoroutine(self._run())

    def close(self) -> Deferred[None]:
        """Stop consuming; fires once an in-flight handler call has finished."""
        self._stopping = True
        if self._handler is None:
            self._stopped.set()
        self._wake()
        if self._sleep is not None:
            d, call = self._sleep
            self._sleep = None
            call.cancel()
            d.callback(None)
        return self._stopped.wait()

    def _wake(self, _: object = None) -> None:
        self._signalled = True
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.callback(None)

    async def _pause(self, seconds: float = RETRY_DELAY_S) -> None:
        if self._stopping:
            return
        d: Deferred[None] = Deferred()
        self._sleep = (d, self._reactor.callLater(seconds, d.callback, None))
        try:
            await d
        finally:
            self._sleep = None
