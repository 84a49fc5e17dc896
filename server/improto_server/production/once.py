"""`Once`: an action (a close) that many callers may ask for, run on the first request."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred


class Once:
    """Calls `action` on the first call only. Every call gets a Deferred of its own, fired
    (with None) once that run is over, whatever its outcome: no caller can alter the result
    another one sees."""

    def __init__(self, action: Callable[[], Deferred[None]]) -> None:
        self._action = action
        self._run: Deferred[None] | None = None

    @property
    def started(self) -> bool:
        return self._run is not None

    def __call__(self) -> Deferred[None]:
        if self._run is None:
            self._run = self._action()
        d: Deferred[None] = Deferred()

        def notify(result: object) -> object:
            d.callback(None)
            return result

        self._run.addBoth(notify)
        return d
