"""Per-address connection caps: how many connections each peer host has, and how many of
them are not logged in yet; a connection over either cap is refused before anything is read.

One `Admission` per listening factory (not per connection): sessions count themselves in on
connecting (`admit`), move out of the pre-login count on HELLO_OK (`logged_in`) and leave on
disconnecting (`release`). Refusals are counted and logged, at most one line per
`_REFUSAL_LOG_S` so that a flood of refusals does not flood the log.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from improto_server.config import Config

# The namespace these lines have always had (log filters may match it).
log = Logger(namespace="improto_server.session")

_REFUSAL_LOG_S = 10.0  # at most one line per this many seconds about refused connections


class Admission:
    def __init__(self, config: Config, clock: IReactorTime) -> None:
        self.config = config
        self.clock = clock
        self.connections: dict[str, int] = {}  # peer host -> its connections
        self.prelogin: dict[str, int] = {}  # peer host -> its connections not logged in
        self.refused = 0  # connections refused over the per-address caps, ever
        self._refused_logged = 0  # ... of which a log line told
        self._refusal_log_at = float("-inf")

    def admit(self, host: str) -> bool:
        """Count a new connection from `host`, or refuse it over the per-address caps."""
        config = self.config
        n, pre = self.connections.get(host, 0), self.prelogin.get(host, 0)
        if n >= config.max_connections_per_address or pre >= config.max_prelogin_per_address:
            self.refused += 1
            now = self.clock.seconds()
            if now >= self._refusal_log_at:  # a flood of refusals must not flood the log
                self._refusal_log_at = now + _REFUSAL_LOG_S
                log.warn(
                    "refused {n} connection(s) over the per-address caps (last from {host}: "
                    "{conns} connections, {pre} not logged in)",
                    n=self.refused - self._refused_logged,
                    host=host,
                    conns=n,
                    pre=pre,
                )
                self._refused_logged = self.refused
            return False
        self.connections[host] = n + 1
        self.prelogin[host] = pre + 1
        return True

    def logged_in(self, host: str | None) -> None:
        if host is not None:
            _decrement(self.prelogin, host)

    def release(self, host: str, prelogin: bool) -> None:
        _decrement(self.connections, host)
        if prelogin:
            _decrement(self.prelogin, host)


def _decrement(counts: dict[str, int], key: str) -> None:
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)
