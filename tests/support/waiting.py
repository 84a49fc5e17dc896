"""Waiting on the running reactor (pytest-twisted's) for something to happen."""

from __future__ import annotations

import time
from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


async def eventually(check: Callable[[], bool], timeout: float = 10.0, poll: float = 0.005) -> None:
    """Poll `check()` until it holds; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await sleep(poll)
