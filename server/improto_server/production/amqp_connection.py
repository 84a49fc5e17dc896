"""One AMQP connection, kept up: reconnects with backoff, set up again after each reconnect.

pika's Twisted adapter (`TwistedProtocolConnection`, deprecated for pika 2.0) is used only
here, in RabbitQueue and in the push router, so it can be swapped without touching callers.

Twisted's `ClientService` makes the TCP (or TLS) connections and waits between attempts with
an exponential backoff (RECONNECT_MIN_S .. RECONNECT_MAX_S, jitter +-20%). On each new
connection this module runs the AMQP handshake and the owner's `prepare` step (declare the
topology, open the channels it needs); only then is the connection ready: `when_ready()`
fires and the `on_connected` hooks run (re-consume, re-declare their own objects). A
handshake or `prepare` that fails drops the connection, and counts as a failed attempt for
the backoff. A ready connection that is lost is reconnected at once.

(The handshake does not run in ClientService's `prepareConnection`: a connection lost before
that step finished is an input its state machine has no transition for, logged as an
unhandled error.)

A `prepare` that fails with SetupRefused (the broker refuses what this version declares, and
no retry can fix that without an operator: see `declare_queue`) fails the `when_ready()`
waiters at once, so a `start()` fails within a second with the reason instead of after its
timeout; reconnecting goes on, with backoff, until `close()` (a running process picks the
queues up again once an operator has fixed them).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import cast

import pika
from pika.adapters.twisted_connection import TwistedChannel, TwistedProtocolConnection
from pika.exceptions import ChannelClosed

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from improto_server.deferreds import as_deferred
from improto_server.production.once import Once
from improto_server.reactor_types import IServerReactor

_log = Logger()

CONNECT_TIMEOUT_S = 10.0  # TCP connect, and then the AMQP handshake
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.1, 10.0
HEARTBEAT_S = 30
CLOSE_TIMEOUT_S = 5.0  # for the broker's Close-Ok


class AmqpProtocol(TwistedProtocolConnection):
    """pika's Twisted protocol with TCP_NODELAY, and a Deferred that fires when the TCP
    connection is gone."""

    def __init__(self, parameters: pika.Parameters, reactor: IServerReactor) -> None:
        super().__init__(parameters, custom_reactor=reactor)
        self.gone = False
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        # pika writes a publish as several small frames; with Nagle on, a frame can wait for
        # the broker's delayed ACK before it leaves: every SEND_ACK would too.
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        super().connectionMade()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.gone = True
        try:
            if reason is None:
                super().connectionLost()
            else:
                super().connectionLost(reason)
        finally:
            self.lost.callback(None)

    def drop(self) -> None:
        """Abort the TCP connection (a reconnect follows unless the connection is closing)."""
        if not self.gone and self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()


Prepare = Callable[[AmqpProtocol], Deferred[None]]
Hook = Callable[[AmqpProtocol], object]


class ConnectionClosing(Exception):
    """`when_ready()` after `closing()`: no connection will be made any more."""


class SetupRefused(Exception):
    """The broker refuses the set-up in a way only an operator can fix: `when_ready()`
    waiters fail with it at once (see the module doc)."""


class QueueMismatch(SetupRefused):
    """A queue exists with other arguments than this version declares (406
    PRECONDITION_FAILED): most likely a classic queue made by a version before quorum queues."""


# Quorum queues with at-least-once dead-lettering (x-dead-letter-strategy) need 3.10: 3.8 and
# 3.9 dead-letter at most once, and brokers before 3.8 have no quorum queues.
MIN_BROKER_VERSION = (3, 10)
MIGRATE_HINT = (
    "To migrate (docs/SERVICES.md, 'Quorum queues: migrating from classic queues'): stop the "
    "gateways, let the persisters and notifiers drain the prefix's queues to 0 messages "
    "(rabbitmqctl list_queues name type messages messages_unacknowledged), stop every improto "
    "process, delete the queues (rabbitmqctl delete_queue NAME for each PREFIX.persist.<i>, "
    "PREFIX.persist.dead, whose dead-lettered jobs you may want to keep first, and "
    "PREFIX.notify), then start this version: it declares them again as quorum queues."
)


def broker_version(proto: AmqpProtocol) -> tuple[int, ...] | None:
    """The broker's version from its Connection.Start properties (None if it sent none)."""
    impl = getattr(proto, "_impl", None)  # the pika Connection
    props = getattr(impl, "server_properties", None) or {}
    raw = props.get("version")
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str):
        return None
    found = re.match(r"\d+(?:\.\d+)*", raw)  # "4.0.0-rc.2" -> 4.0.0
    return tuple(int(n) for n in found.group().split(".")) if found else None


def check_broker(proto: AmqpProtocol) -> None:
    """SetupRefused unless the broker can hold the quorum queues this version declares."""
    version = broker_version(proto)
    if version is not None and version < MIN_BROKER_VERSION:
        shown = ".".join(map(str, version))
        need = ".".join(map(str, MIN_BROKER_VERSION))
        _log.error(
            "RabbitMQ {version} cannot hold improto's queues: quorum queues with at-least-once "
            "dead-lettering need RabbitMQ {need} or later",
            version=shown, need=need,
        )  # fmt: skip
        raise SetupRefused(f"RabbitMQ {shown} is older than {need} (quorum queues)")


async def declare_queue(ch: TwistedChannel, name: str, arguments: dict[str, object]) -> None:
    """Declare a durable queue with `arguments`. If one of that name exists with other
    arguments, the broker answers 406 PRECONDITION_FAILED and closes the channel: this logs
    what happened and how to migrate, and raises QueueMismatch (the connection's set-up
    fails: `start()` fails at once, see the module doc)."""
    try:
        await ch.queue_declare(name, durable=True, arguments=arguments)
    except ChannelClosed as e:  # ChannelClosedByBroker: (reply_code, reply_text)
        code, reply = [*e.args, None, str(e)][:2]
        if code != 406:
            raise
        _log.error(
            "RabbitMQ refused to declare queue {queue} as a {type} queue: {reply}. The queue "
            "exists with other arguments, most likely as a classic queue made by an earlier "
            "improto version; its messages are untouched. {hint}",
            queue=name, type=arguments.get("x-queue-type", "classic"), reply=reply,
            hint=MIGRATE_HINT,
        )  # fmt: skip
        raise QueueMismatch(
            f"queue {name} exists with other arguments ({reply}). {MIGRATE_HINT}"
        ) from None


@implementer(IStreamClientEndpoint)
class _RecordingEndpoint:
    """An endpoint that remembers why its last connection attempt failed (for the log)."""

    def __init__(self, endpoint: IStreamClientEndpoint, owner: AmqpConnection) -> None:
        self._endpoint = endpoint
        self._owner = owner

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def failed(failure: Failure) -> Failure:
            self._owner.last_error = failure.value
            return failure

        return self._endpoint.connect(protocolFactory).addErrback(failed)


class AmqpConnection:
    """The connection to one broker (`url`: amqp:// or amqps://). `prepare(protocol)` runs on
    every new connection before it counts as ready; `start()`, then `close()`."""

    def __init__(self, url: str, reactor: IServerReactor, prepare: Prepare) -> None:
        self._reactor = reactor
        self._params = pika.URLParameters(url)
        if "heartbeat" not in url:
            self._params.heartbeat = HEARTBEAT_S
        self._tls = url.startswith("amqps:")
        self._prepare = prepare
        self._backoff = backoffPolicy(
            RECONNECT_MIN_S, RECONNECT_MAX_S, factor=2.0, jitter=lambda: 0.0
        )
        self._service = ClientService(
            _RecordingEndpoint(self._endpoint(), self),
            Factory.forProtocol(lambda: AmqpProtocol(self._params, reactor)),
            retryPolicy=self._retry_delay,
            clock=reactor,
            prepareConnection=self._connected,
        )
        self._failures = 0  # failed attempts since the last ready connection
        self._lost_ready = False  # the last connection was ready: reconnect without a pause
        self.last_error: BaseException | None = None
        self._current: AmqpProtocol | None = None  # being set up, or ready
        self._ready: AmqpProtocol | None = None
        self._waiters: list[Deferred[None]] = []
        self._hooks: list[Hook] = []
        self._closing = False
        self._stop_service = Once(self._service.stopService)
        self.connections = 0  # connections made ready so far (1 + reconnects)

    @property
    def connection(self) -> AmqpProtocol | None:
        """The ready connection, or None while (re)connecting."""
        return self._ready

    def start(self) -> None:
        self._service.startService()

    def when_ready(self, timeout: float | None = None) -> Deferred[None]:
        """Fires when a connection is ready (now or after the next (re)connect)."""
        if self._ready is not None:
            return succeed(None)
        if self._closing:
            return fail(ConnectionClosing("the connection is closing"))

        def forget(d: Deferred[None]) -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        d: Deferred[None] = Deferred(forget)
        self._waiters.append(d)
        if timeout is not None:
            d.addTimeout(timeout, self._reactor)
        return d

    def on_connected(self, hook: Hook) -> None:
        """Call `hook(connection)` after every (re)connection, and now if connected: hooks run
        in the order they were added, after `prepare`."""
        self._hooks.append(hook)
        if self._ready is not None:
            self._run_hook(hook, self._ready)

    def closing(self) -> None:
        """Fail the `when_ready()` waiters and make no new connection; the current one stays
        up (in-flight work may need it) until `close()`."""
        self._closing = True
        self._fail_waiters()
        if self._ready is None:
            self._stop_service()

    @as_deferred
    async def close(self) -> None:
        """Close the connection (AMQP Close first, then TCP) and stop reconnecting."""
        self.closing()
        proto = self._current
        if proto is not None and not proto.gone and proto.is_open:
            closed = proto.close()
            if closed is not None:
                try:
                    await closed.addTimeout(CLOSE_TIMEOUT_S, self._reactor)
                except Exception:
                    pass  # dropped below
        if proto is not None:
            proto.drop()
            await proto.lost
        await self._stop_service()

    # ------------------------------------------------------------------ connecting

    def _endpoint(self) -> IStreamClientEndpoint:
        host, port = self._params.host, self._params.port
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, host, port, timeout=CONNECT_TIMEOUT_S
        )
        if self._tls:
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint

    def _retry_delay(self, attempt: int) -> float:
        """ClientService's retry policy: the pause before the next connection attempt."""
        if self._lost_ready:
            self._lost_ready = False
            return 0.0
        self._failures += 1
        n = self._failures
        delay = self._backoff(n - 1) * random.uniform(0.8, 1.2)
        log = _log.warn if n & (n - 1) == 0 else _log.debug  # 1, 2, 4, ...
        log(
            "AMQP connection failed ({error!r}); retry {n} in {delay:.1f} s",
            error=self.last_error, n=n, delay=delay,
        )  # fmt: skip
        return delay

    def _connected(self, _proxy: object) -> None:
        """ClientService's prepareConnection: a new TCP connection. It is set up once
        ClientService counts it as connected (it hands the protocol itself to whenConnected
        waiters, the argument here is a proxy of it)."""
        d = self._service.whenConnected()
        d.addCallbacks(self._set_up_now, _ignore_cancel)

    def _set_up_now(self, proto: IProtocol) -> None:
        assert isinstance(proto, AmqpProtocol)
        self._set_up(proto)

    @as_deferred
    async def _set_up(self, proto: AmqpProtocol) -> None:
        self._current = proto
        proto.lost.addCallback(self._lost, proto)
        if self._closing:
            proto.drop()
            return
        try:
            if proto.ready is not None:  # None: the handshake is done already
                await proto.ready.addTimeout(CONNECT_TIMEOUT_S, self._reactor)
            await self._prepare(proto)
            if proto.gone:
                raise ConnectionError("connection lost during set-up")
        except Exception as e:
            self.last_error = e
            if isinstance(e, SetupRefused):
                self._fail_waiters(e)  # an operator must act: do not let start() wait it out
            proto.drop()  # ClientService waits (see _retry_delay) and connects again
            return
        self._failures = 0
        self.last_error = None
        self.connections += 1
        self._ready = proto
        for hook in self._hooks:
            self._run_hook(hook, proto)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(None)

    def reset(self, proto: AmqpProtocol) -> None:
        """Drop `proto`, which is not ready from now on (a channel of it closed, or the
        broker cancelled a consumer): the reconnect sets everything up afresh."""
        if self._ready is proto:
            self._ready = None
            self._lost_ready = True
        proto.drop()

    def _lost(self, _: None, proto: AmqpProtocol) -> None:
        if self._ready is proto:
            self._ready = None
            self._lost_ready = True
            if not self._closing:
                _log.warn("AMQP connection lost; reconnecting")
        if self._current is proto:
            self._current = None
        if self._closing:
            self._stop_service()

    def _run_hook(self, hook: Hook, proto: AmqpProtocol) -> None:
        d = maybeDeferred(hook, proto)
        d.addErrback(lambda f: None if proto.gone else _log.failure("AMQP hook failed", f))

    def _fail_waiters(self, reason: Exception | None = None) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.errback(reason or ConnectionClosing("the connection is closing"))


def _ignore_cancel(failure: Failure) -> None:
    failure.trap(CancelledError)  # the service stopped before the connection was handed over
