"""The reactor interfaces the client library uses, as one type.

Twisted's reactor provides each interface separately and typing has no intersection, so the
client takes an `IClientReactor`; the global reactor is cast to it once (`default_reactor()`).
Tests pass `MemoryReactorClock`, which provides both.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import IReactorTCP, IReactorTime


class IClientReactor(IReactorTime, IReactorTCP):
    """Timers (heartbeat, timeouts, backoff) and TCP connections (`clientFromString`)."""


def default_reactor() -> IClientReactor:
    from twisted.internet import reactor

    return cast(IClientReactor, reactor)
