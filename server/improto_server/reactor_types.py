"""The reactor interfaces the server uses, as one type (Synapse's `ISynapseReactor` idea).

Twisted's reactor provides each interface separately; typing has no intersection, so code that
needs several takes an `IServerReactor` and the real reactor is cast to it once, where it is
obtained (`server_reactor()`). Tests pass `MemoryReactorClock`, which provides them too.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
)


class IServerReactor(
    IReactorCore,
    IReactorTCP,
    IReactorTime,
    IReactorThreads,
    IReactorPluggableNameResolver,
    IReactorUNIX,
):
    """What the server's components need of a reactor."""


def server_reactor() -> IServerReactor:
    from twisted.internet import reactor

    return cast(IServerReactor, reactor)
