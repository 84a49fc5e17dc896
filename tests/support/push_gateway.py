"""A push gateway stand-in (spec/PUSH_GATEWAY.md) for tests: a real twisted.web server on
127.0.0.1 that records every request and answers as told. For development,
`python -m tests.support.push_gateway [PORT]` runs one that prints each notification it gets
as a JSON line (point `imserver --push-gateway` at the URL it prints).

    gateway = await PushGatewayStandIn.start()
    gateway.fail(2)            # the next 2 requests get a 503 (or `code`)
    gateway.hang(1)            # the next request never gets an answer (after the failures)
    gateway.reject("tok-1")    # answers list these push keys in "rejected"
    ... gateway.bodies / gateway.notifications / gateway.requests ...
    await gateway.stop()
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site


@dataclass
class Received:
    """One request: its JSON body (None if it was not JSON), when it came, what it got."""

    body: Any
    at: float  # time.monotonic()
    answer: str  # "ok", "http <code>", "hang"


class _Notify(Resource):
    isLeaf = True

    def __init__(self, gateway: PushGatewayStandIn) -> None:
        super().__init__()
        self._gateway = gateway

    def render_POST(self, request: Request) -> bytes | int:
        return self._gateway._answer(request)


class _Site(Site):
    """Remembers its connections, so stop() can drop the kept-alive ones."""

    def __init__(self, resource: Resource, connections: set[Protocol]) -> None:
        super().__init__(resource)
        self._connections = connections

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        assert proto is not None
        connections = self._connections
        connections.add(proto)
        lost = proto.connectionLost

        def connection_lost(reason: Any) -> None:
            connections.discard(proto)
            lost(reason)

        proto.connectionLost = connection_lost  # type: ignore[method-assign]
        return proto


class PushGatewayStandIn:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.rejected: set[str] = set()
        self._fail: list[int] = []  # status codes for the next requests
        self._hang = 0
        self._hanging: list[Request] = []
        self._connections: set[Protocol] = set()
        self._port: IListeningPort | None = None
        self.url = ""
        # Called with each request before it is answered (the answer waits for a Deferred).
        self.before_answer: Callable[[Received], object] | None = None

    @classmethod
    async def start(cls, port: int = 0) -> PushGatewayStandIn:
        gateway = cls()
        site = _Site(_Notify(gateway), gateway._connections)
        gateway._port = reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        port = gateway._port.getHost().port  # type: ignore[attr-defined]
        gateway.url = f"http://127.0.0.1:{port}/_improto/push/v1/notify"
        return gateway

    async def stop(self) -> None:
        """Stop listening and drop the connections (again: nothing)."""
        port, self._port = self._port, None
        if port is None:
            return
        await port.stopListening()
        for proto in list(self._connections):
            transport = getattr(proto, "transport", None)
            if transport is not None:
                transport.abortConnection()
        self._hanging.clear()

    # ------------------------------------------------------------------ switches

    def fail(self, times: int, code: int = 503) -> None:
        """The next `times` requests get `code` (after those already told to fail)."""
        self._fail.extend([code] * times)

    def hang(self, times: int) -> None:
        """The next `times` requests are never answered (the failures told are answered
        first)."""
        self._hang += times

    def reject(self, *pushkeys: str) -> None:
        """Answers list these push keys as rejected (when the request carried them)."""
        self.rejected.update(pushkeys)

    # ------------------------------------------------------------------ what came

    @property
    def bodies(self) -> list[Any]:
        return [r.body for r in self.requests]

    @property
    def notifications(self) -> list[dict[str, Any]]:
        """The "notification" objects of the requests answered 200, in order."""
        return [r.body["notification"] for r in self.requests if r.answer == "ok"]

    def wait_for(self, n: int, timeout: float = 5.0) -> Deferred[None]:
        """Fires once `n` requests came (fails after `timeout` s)."""
        from tests.support.waiting import eventually

        return Deferred.fromCoroutine(eventually(lambda: len(self.requests) >= n, timeout=timeout))

    # ------------------------------------------------------------------ answering

    def _answer(self, request: Request) -> bytes | int:
        assert request.content is not None
        raw = request.content.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        now = time.monotonic()
        if self._hang and not self._fail:
            self._hang -= 1
            self.requests.append(Received(body, now, "hang"))
            self._hanging.append(request)
            return NOT_DONE_YET
        if self._fail:
            code = self._fail.pop(0)
            received = Received(body, now, f"http {code}")
            answer = b'{"error": "on purpose"}'
        else:
            code = 200
            received = Received(body, now, "ok")
            keys = [d.get("pushkey") for d in _devices(body)]
            answer = json.dumps({"rejected": [k for k in keys if k in self.rejected]}).encode()
        self.requests.append(received)
        hook = self.before_answer
        if hook is None:
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"application/json")
            return answer

        def write(_: object) -> None:
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"application/json")
            request.write(answer)
            request.finish()

        maybeDeferred(hook, received).addBoth(write)
        return NOT_DONE_YET


def _devices(body: Any) -> list[dict[str, Any]]:
    try:
        devices = body["notification"]["devices"]
    except (KeyError, TypeError):
        return []
    return [d for d in devices if isinstance(d, dict)]


def main(argv: list[str]) -> None:
    from twisted.internet import task

    async def serve(_reactor: Any) -> None:
        gateway = await PushGatewayStandIn.start(int(argv[0]) if argv else 5581)
        print(f"push gateway stand-in on {gateway.url}", flush=True)

        def show(received: Received) -> None:
            print(json.dumps(received.body), flush=True)

        gateway.before_answer = show
        await Deferred()  # until interrupted

    task.react(lambda r: Deferred.fromCoroutine(serve(r)))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
