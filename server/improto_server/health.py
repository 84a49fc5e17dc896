"""Health of the storage services: the probes the backends run, and GET /healthz.

A backend's `health()` probes each service it uses with one cheap call (SQLite: a query on
the database thread; Redis: PING; RabbitMQ: the queue depth; HBase: a one-row scan), each
bounded by PROBE_TIMEOUT_S, all at once, and never fails: a service that does not answer is
reported with what went wrong. /healthz answers 200 when every service is "ok", else 503, so
a load balancer takes a gateway whose storage is down out of rotation. No API key: it says
nothing beyond which services answer (errors are cut to ERROR_TEXT characters).

Probes of concurrent /healthz requests are shared, and a result is reused for CACHE_S, so an
unauthenticated caller cannot make the server hammer its services.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from improto_server import metrics
from improto_server.deferreds import as_deferred

log = Logger()

PROBE_TIMEOUT_S = 2.0
CACHE_S = 1.0
ERROR_TEXT = 200
OK = "ok"


@dataclass(frozen=True, slots=True)
class Health:
    """What a backend's health() found."""

    services: dict[str, str] = field(default_factory=dict)  # name -> "ok" or what failed
    queue_depth: int | None = None  # jobs waiting to be persisted (None: not known)

    @property
    def ok(self) -> bool:
        return all(state == OK for state in self.services.values())

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "services": self.services, "queue_depth": self.queue_depth}


class HealthSource(Protocol):
    def health(self) -> Deferred[Health]:
        """Probe every service (never fails: a failed probe is reported in the result)."""


@as_deferred
async def probe(
    call: Callable[[], Deferred[Any]], clock: IReactorTime, timeout_s: float = PROBE_TIMEOUT_S
) -> str:
    """Run `call`: "ok" if it succeeds within `timeout_s`, else what went wrong."""
    try:
        d = maybeDeferred(call)
        d.addTimeout(timeout_s, clock)
        await d
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:ERROR_TEXT]
    return OK


class HealthResource(Resource):
    """GET /healthz: 200 {"ok": true, "services": {...}, "queue_depth": n}, or 503."""

    isLeaf = True

    def __init__(self, source: HealthSource, clock: IReactorTime) -> None:
        super().__init__()
        self._source = source
        self._clock = clock
        self._running: Deferred[Health] | None = None
        self._waiting: list[Deferred[Health]] = []
        self._last: tuple[float, Health] | None = None

    def check(self) -> Deferred[Health]:
        """The services' health now (a result younger than CACHE_S, or a shared probe)."""
        now = self._clock.seconds()
        if self._last is not None and now - self._last[0] < CACHE_S:
            return succeed(self._last[1])
        d: Deferred[Health] = Deferred()
        self._waiting.append(d)
        if self._running is None:
            self._running = maybeDeferred(self._source.health)
            self._running.addBoth(self._checked)
        return d

    def _checked(self, result: Health | Failure) -> None:
        self._running = None
        if isinstance(result, Failure):  # health() should never fail: report it as such
            log.failure("the health check failed", result)
            result = Health(
                {"backend": f"{type(result.value).__name__}: {result.value}"[:ERROR_TEXT]}
            )
        else:
            self._last = (self._clock.seconds(), result)
            if result.queue_depth is not None:
                metrics.queue_depth(result.queue_depth)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(result)

    def render_GET(self, request: Request) -> int:
        start = self._clock.seconds()
        gone: list[Failure] = []  # the client went away before the answer
        request.notifyFinish().addErrback(gone.append)

        def answer(health: Health) -> None:
            status = 200 if health.ok else 503
            if not gone:
                request.setResponseCode(status)
                request.setHeader(b"content-type", b"application/json")
                request.setHeader(b"cache-control", b"no-store")
                request.write(json.dumps(health.to_json()).encode())
                request.finish()
            metrics.api_request("GET /healthz", status, self._clock.seconds() - start)

        self.check().addCallback(answer).addErrback(
            lambda f: log.failure("answering /healthz failed", f)
        )
        return NOT_DONE_YET
