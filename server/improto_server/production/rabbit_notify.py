"""The notify queue on RabbitMQ (the NotifyQueue port): one durable quorum queue, P.notify.

The persist queue's patterns (rabbit_queue.py, whose module doc explains them), cut down to
what the notifier needs: no dedup keys (a message notified twice after a redelivery is a
repeated notification, not a repeated message) and no partitions.

Publishing: `put(jobs)` publishes the jobs as one persistent message (amqp_jobs.pack_jobs;
BATCH_TYPE for messages alone, DEVICE_BATCH_TYPE with a DeviceNotifyJob among them) to the
default exchange, mandatory, on a channel in confirm mode; it fires when the broker confirmed
it (on disk on a majority of the quorum queue's replicas). A P.notify of an earlier version (a
classic queue) fails `start()` at once with QueueMismatch and a log line saying how to migrate
(amqp_connection.declare_queue).

Consuming: basic_qos(prefetch); the jobs of the next delivery plus those already received go
to the handler in batches of at most max_batch; one basic_ack (multiple) once the handler's
Deferred succeeded. A failed handler: after `retry_delay_s` the consumer is cancelled and
every outstanding delivery nacked with requeue (multiple), which puts them back at their
original positions, in order; then it consumes again. A message that does not decode is
logged and dropped (no dead-letter queue: it would only hold notifications nobody wants
late). The queue has x-single-active-consumer: one notifier at a time consumes it (so one
process paces each user), the others stand by. No delivery limit is declared (see
rabbit_queue.py: on RabbitMQ 4.x its default of 20 would drop a notification whose handler
kept failing, this queue having no dead-letter exchange).

The queue has its own AMQP connection (amqp_connection.AmqpConnection): a notifier process
needs no persist queue, and the persist queue's reconnects do not touch it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pika
from pika.adapters.twisted_connection import ClosableDeferredQueue, TwistedChannel
from pika.exceptions import ConsumerCancelled, UnroutableError

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from improto_server.deferreds import as_deferred
from improto_server.model import DeviceNotifyJob, NotifyJob, PersistJob, notify_job_from_bytes
from improto_server.ports import NotifyHandler
from improto_server.production.amqp_connection import (
    AmqpConnection,
    AmqpProtocol,
    check_broker,
    declare_queue,
)
from improto_server.production.amqp_jobs import (
    BATCH_TYPE,
    NOTIFY_QUEUE_ARGUMENTS,
    pack_jobs,
    split_jobs,
)
from improto_server.production.once import Once
from improto_server.reactor_types import IServerReactor, server_reactor

_log = Logger()

PREFETCH = 512  # deliveries on hand (each a persister batch of messages)
RETRY_DELAY_S = 0.5  # pause before requeueing a batch whose handler failed
CONFIRM_TIMEOUT_S = 8.0
CONNECT_WAIT_S = 5.0  # how long a put waits for a (re)connection
START_TIMEOUT_S = 30.0
CLOSE_STEP_TIMEOUT_S = 5.0
# pack_jobs() of jobs with a DeviceNotifyJob among them. Batches of messages alone keep
# BATCH_TYPE, which notifiers from before device jobs read; such a notifier drops a batch of
# this type as undecodable (a lost hint) rather than misreading it.
DEVICE_BATCH_TYPE = "improto.notify.v1"


def notify_queue_name(prefix: str) -> str:
    return f"{prefix}.notify"


class RabbitNotifyQueue:
    """NotifyQueue on RabbitMQ. `start()` (fires once connected and declared), `put` /
    `consume`, `close()` (idempotent)."""

    def __init__(
        self,
        amqp_url: str,
        *,
        prefix: str = "improto",
        prefetch: int = PREFETCH,
        retry_delay_s: float = RETRY_DELAY_S,
        confirm_timeout_s: float = CONFIRM_TIMEOUT_S,
        connect_wait_s: float = CONNECT_WAIT_S,
        reactor: IServerReactor | None = None,
    ) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self._reactor = reactor = reactor or server_reactor()
        self.name = notify_queue_name(prefix)
        self._amqp = AmqpConnection(amqp_url, reactor, self._declare)
        self._prefetch = prefetch
        self._retry_delay = retry_delay_s
        self._confirm_timeout = confirm_timeout_s
        self._connect_wait = connect_wait_s
        self._started = False
        self._stopping = False
        self._closing = Once(self._close)
        self._pub: TwistedChannel | None = None
        self._handler: NotifyHandler | None = None
        self._max_batch = 1
        self._consuming_on: AmqpProtocol | None = None
        self._consumer: tuple[TwistedChannel, str, ClosableDeferredQueue] | None = None
        self._loop: Deferred[None] | None = None
        self._puts: set[Deferred[None]] = set()
        self._pauses: dict[Deferred[None], IDelayedCall] = {}
        self._amqp.on_connected(self._start_consumer)

    def start(self) -> Deferred[None]:
        if self._started:
            raise RuntimeError("RabbitNotifyQueue.start() may be called once")
        self._started = True
        self._amqp.start()
        return self._amqp.when_ready(START_TIMEOUT_S)

    def put(self, jobs: Sequence[NotifyJob]) -> Deferred[None]:
        if not self._started or self._stopping:
            return fail(RuntimeError("RabbitNotifyQueue is not running"))
        if not jobs:
            return succeed(None)
        msg_type = BATCH_TYPE
        if any(isinstance(j, DeviceNotifyJob) for j in jobs):
            msg_type = DEVICE_BATCH_TYPE
        d = self._put([job.to_bytes() for job in jobs], msg_type)
        self._puts.add(d)
        d.addBoth(self._put_done, d)
        return d

    def _put_done(self, result: object, d: Deferred[None]) -> object:
        self._puts.discard(d)
        return result

    @as_deferred
    async def _put(self, jobs: list[bytes], msg_type: str) -> None:
        if self._pub is None or not self._pub.is_open:
            await self._amqp.when_ready(self._connect_wait)
        ch = self._pub
        if ch is None or not ch.is_open:
            raise ConnectionError("the AMQP channel closed")
        props = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type="application/octet-stream",
            type=msg_type,
        )
        confirmed = ch.basic_publish("", self.name, pack_jobs(jobs), props, mandatory=True)
        try:
            await confirmed.addTimeout(self._confirm_timeout, self._reactor)
        except UnroutableError:
            _log.error("queue {queue} is missing: declaring it again", queue=self.name)
            proto = self._amqp.connection
            if proto is not None:
                self._amqp.reset(proto)  # the reconnect re-declares it
            raise

    def consume(self, handler: NotifyHandler, max_batch: int = 1) -> None:
        if self._handler is not None:
            raise RuntimeError("consume() may be called once")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._handler = handler
        self._max_batch = max_batch
        proto = self._amqp.connection
        if proto is not None:
            self._start_consumer(proto)

    def close(self) -> Deferred[None]:
        """Stop consuming, let an in-flight handler call and the puts finish (a handler
        that succeeds is still acked), then close the connection."""
        return self._closing()

    # ------------------------------------------------------------------ topology

    @as_deferred
    async def _declare(self, proto: AmqpProtocol) -> None:
        check_broker(proto)
        ch = await proto.channel()
        await declare_queue(ch, self.name, NOTIFY_QUEUE_ARGUMENTS)
        await ch.confirm_delivery()
        ch.on_closed.addCallback(self._channel_closed, proto)
        self._pub = ch

    def _channel_closed(self, reason: object, proto: AmqpProtocol) -> None:
        if not self._stopping and not proto.gone:
            _log.error("AMQP channel of {queue} closed: {reason}", queue=self.name, reason=reason)
            self._amqp.reset(proto)

    # ------------------------------------------------------------------ consuming

    def _start_consumer(self, proto: AmqpProtocol) -> None:
        if self._handler is None or self._stopping or self._consuming_on is proto:
            return
        self._consuming_on = proto
        self._loop = self._consume(proto)

    @as_deferred
    async def _consume(self, proto: AmqpProtocol) -> None:
        ch: TwistedChannel | None = None
        try:
            ch = await proto.channel()
            await ch.basic_qos(prefetch_count=self._prefetch)
            while not self._stopping and not proto.gone:
                deliveries, tag = await ch.basic_consume(queue=self.name)
                self._consumer = (ch, tag, deliveries)
                if not await self._drain(ch, deliveries) or self._stopping or proto.gone:
                    break
                # Requeue the failed batch and everything prefetched behind it, in order.
                await self._pause(self._retry_delay)
                if self._stopping or not ch.is_open:
                    break
                await ch.basic_cancel(tag)
                ch.basic_nack(delivery_tag=0, multiple=True, requeue=True)
            unexpected = not self._stopping and not proto.gone
            if unexpected:
                _log.error("consumer of {queue} stopped; resetting the connection", queue=self.name)
        except Exception:
            unexpected = not self._stopping and not proto.gone
            if unexpected:
                _log.failure(
                    "consumer of {queue} failed; resetting the connection", queue=self.name
                )
        finally:
            if self._consumer is not None and self._consumer[0] is ch:
                self._consumer = None
        if unexpected:
            self._amqp.reset(proto)  # the reconnect declares and consumes afresh

    async def _drain(self, ch: TwistedChannel, deliveries: ClosableDeferredQueue) -> bool:
        """Handle deliveries until the consumer ends (False) or a handler fails (True)."""
        handler = self._handler
        assert handler is not None
        while not self._stopping:
            try:
                msgs = [await deliveries.get()]
            except Exception:
                return False  # consumer cancelled, channel or connection closed
            jobs: list[NotifyJob] = []
            last_tag = 0
            while True:
                msg = msgs[-1]
                try:
                    jobs.extend(decode_notify_message(msg.properties.type, msg.body))
                    last_tag = msg.method.delivery_tag
                except Exception:
                    _log.failure("dropping an undecodable notify message ({n} bytes)",
                                 n=len(msg.body))  # fmt: skip
                    if ch.is_open:
                        ch.basic_nack(delivery_tag=msg.method.delivery_tag, requeue=False)
                if len(jobs) >= self._max_batch or not deliveries.pending:
                    break
                msgs.append(deliveries.pending.pop(0))
            if not jobs:
                continue
            for i in range(0, len(jobs), self._max_batch):
                try:
                    await maybeDeferred(handler, jobs[i : i + self._max_batch])
                except Exception:
                    _log.failure("notify jobs failed; requeued in {delay} s",
                                 delay=self._retry_delay)  # fmt: skip
                    return True
                if not ch.is_open:
                    break  # the broker requeued them with the channel
            if ch.is_open:
                ch.basic_ack(delivery_tag=last_tag, multiple=True)
        return False

    def _pause(self, seconds: float) -> Deferred[None]:
        """Sleep; cut short by close()."""
        d: Deferred[None] = Deferred()
        if self._stopping:
            d.callback(None)
            return d

        def wake() -> None:
            self._pauses.pop(d, None)
            d.callback(None)

        self._pauses[d] = self._reactor.callLater(seconds, wake)
        return d

    # ------------------------------------------------------------------ closing

    @as_deferred
    async def _close(self) -> None:
        self._stopping = True
        try:
            for d, call in list(self._pauses.items()):
                call.cancel()
                self._pauses.pop(d, None)
                d.callback(None)
            self._amqp.closing()  # puts waiting for a connection fail now
            consumer = self._consumer
            if consumer is not None:
                ch, tag, deliveries = consumer
                if ch.is_open:
                    try:
                        await ch.basic_cancel(tag).addTimeout(CLOSE_STEP_TIMEOUT_S, self._reactor)
                    except Exception:
                        pass
                if not deliveries.closed:  # in case a Basic.CancelOk never came
                    deliveries.close(ConsumerCancelled())
            running = [self._loop, *self._puts] if self._loop else list(self._puts)
            for work in running:
                await _ended(work)
            await self._amqp.close()
        except Exception:
            _log.failure("closing the RabbitMQ notify queue failed")


def decode_notify_message(msg_type: str | None, body: bytes) -> list[NotifyJob]:
    """The jobs of a notify queue message; ValueError (CorruptRecord included) if malformed."""
    if msg_type in (BATCH_TYPE, DEVICE_BATCH_TYPE):
        return [notify_job_from_bytes(data) for data in split_jobs(body)]
    return [PersistJob.from_bytes(body)]  # JOB_TYPE or none: one PersistJob (decode_message)


def _ended(d: Deferred[None]) -> Deferred[None]:
    """Fires (with None) once `d` has, leaving its result to its own callers."""
    done: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        done.callback(None)
        return result

    d.addBoth(fire)
    return done
