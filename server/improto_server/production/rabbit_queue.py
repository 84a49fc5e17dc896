"""The persist queue on RabbitMQ (the PersistQueue port), with the dedup keys in Redis.

The pieces: amqp_jobs (message bodies, queue names, partitions), redis_dedup (the dedup keys
and their protocol: what a crash at each step leaves behind), amqp_connection (the connection
and its reconnects). This module publishes with confirms and consumes.

Publishing: jobs go to the default exchange (routing key = the queue name) as persistent
messages (delivery_mode 2), mandatory, on one channel in confirm mode. Group commit: the jobs
accepted in one reactor turn for one queue travel in one message (BATCH_TYPE; up to
`publish_batch` jobs). `accept()` resolves when the broker confirms the message carrying its
job, so any number of accepts are in flight at once. pika's TwistedChannel keeps the Deferred
of every delivery tag and settles it on Basic.Ack/Basic.Nack, including `multiple=True` ones
(a nack or a Basic.Return errbacks it). The queues are quorum queues (amqp_jobs): a confirm
means that a majority of the queue's replicas (on a single broker, the one node) has written
the message to disk.

Conversation-state changes (`accept_state`, StateJob) are published the same way, to the
partition of their conversation, so they keep their place among its messages; they have no
dedup key (applying one twice changes nothing), so a failed or unconfirmed one is simply
retried by the caller, and Redis plays no part. A batch that carries one, or a large group's
message (a timeline job, which older persisters cannot read and dead-letter), is typed MIXED_TYPE
(amqp_jobs).

Failures: Redis unavailable: accept fails before anything is published. RabbitMQ
unavailable: accept fails within `connect_wait_s` (no channel: the job was never handed to the
broker) or `confirm_timeout_s` (handed over, not confirmed); in-flight accepts errback on a
connection loss and the retry goes through the dedup key. A takeover re-publish is returned as
duplicate=True (the gateway then pushes nothing live for it: the receivers get it from the
offline pull, which is what guarantees delivery anyway).

Consumers: one channel per partition queue, basic_qos(prefetch), jobs handled in batches
(the next delivery plus those already received, up to max_batch), one batch at a time per
queue in queue order; one basic_ack (multiple) only after the handler's Deferred succeeded
(the persister writes both stores first). A failed handler: after `retry_delay_s` the
consumer is cancelled and every outstanding delivery of its channel is nacked with requeue
(basic_nack delivery_tag=0, multiple=True), then it consumes again. A quorum queue delivers
returned messages before the rest of the queue, in their order (as a classic queue puts them
back at their original positions), so the failed batch comes back first and the jobs
prefetched behind it keep their order (checked against RabbitMQ 3.10.8 with hundreds of
deliveries outstanding; a plain nack of the one failed delivery would let the already-
prefetched later jobs overtake it). Nothing is ever dropped, except a message that cannot be
decoded: logged and nacked without requeue into the dead-letter queue (at-least-once
dead-lettering: it leaves its queue once the dead-letter queue has confirmed it). No delivery
limit is declared: on RabbitMQ 3.x a job whose handler keeps failing is redelivered forever;
4.x dead-letters it after 20 deliveries unless a policy raises the limit (docs/SERVICES.md,
"Quorum queues"). A connection lost while a handler runs: the broker requeues the job for the
next active consumer; the late handler result is dropped, never acked on another channel.

Partitioning (`partitions`, default 1). Jobs go to queue crc32(str(job.history_key)) % N, so
one conversation's jobs stay in one queue, in acceptance order. Inbox cursors are assigned at
write time, atomically, by the inbox store, so parallel persisters cannot leave a gap a reader
could skip. What N > 1 gives up: jobs of different conversations are written in an order that
may differ from acceptance order, so one user's inbox may list a later msg_id before an
earlier one from another conversation (no gap, no loss; history is ordered by msg_id anyway).
N = 1 keeps the embedded queue's single global order and one batch at a time, which is also
the throughput ceiling of the persist path; raise N when persisters fall behind. Changing N
re-routes conversations: drain the queues first. Across persister processes, single active
consumer keeps one writer per queue; on a failover (or a handler failure while another
persister stands by) the next consumer may get up to `prefetch` later jobs before the
requeued ones: bounded reordering across the switch, still no gap and no loss.

Reconnection (amqp_connection): every new connection re-declares the topology, re-enables
confirms and re-consumes. An unexpected channel close or consumer cancel (e.g. a queue
deleted) resets the connection. A queue that exists with other arguments (a classic queue
made by a version before quorum queues) fails the set-up: `start()` fails at once with
QueueMismatch, after an error log line that says how to migrate (amqp_connection.declare_queue;
nothing is deleted or changed). So does a broker older than 3.10.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pika
import txredisapi
from pika.adapters.twisted_connection import ClosableDeferredQueue, TwistedChannel
from pika.exceptions import ConsumerCancelled, UnroutableError

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto_server.deferreds import as_deferred
from improto_server.model import (
    TIMELINE_JOB_FORMAT,
    Accepted,
    ConvKey,
    PersistJob,
    QueuedJob,
    StateJob,
)
from improto_server.ports import BatchHandler
from improto_server.production.amqp_connection import (
    AmqpConnection,
    AmqpProtocol,
    Hook,
    check_broker,
    declare_queue,
)
from improto_server.production.amqp_jobs import (
    BATCH_TYPE,
    DEAD_QUEUE_ARGUMENTS,
    MIXED_TYPE,
    decode_message,
    pack_jobs,
    partition_of,
    persist_queue_arguments,
    queue_names,
)
from improto_server.production.once import Once
from improto_server.production.redis_connection import RedisClient, check_binary
from improto_server.production.redis_connection import connect as redis_connect
from improto_server.production.redis_dedup import (
    DEDUP_TTL_MS,
    SERVER_CLOCK,
    STALE_PENDING_MS,
    DedupKeys,
)
from improto_server.reactor_types import IServerReactor, server_reactor
from improto_server.turn_batcher import TurnBatcher

_log = Logger()
_T = TypeVar("_T")

# Two batches: the next is on hand while one is written. Also what a persister holds in
# memory per partition queue: up to PREFETCH of the largest messages.
PREFETCH = 512
# When a delivery arrives with little behind it, the consumer waits this long for more: a
# handler call (one Redis script, HBase puts, one ack) costs about as much for one job as for
# a batch, so at low rates this cuts the CPU per job. Only the stores lag (<= this).
LINGER_S = 0.02
LINGER_BELOW = 8  # deliveries on hand below which the consumer lingers
RETRY_DELAY_S = 0.5  # pause before requeueing a job whose handler failed
CONFIRM_TIMEOUT_S = 8.0  # < STALE_PENDING_MS: a live publisher gives up before a takeover
CONNECT_WAIT_S = 5.0  # how long an accept waits for a (re)connection
START_TIMEOUT_S = 30.0
POLL_MIN_S, POLL_MAX_S = 0.02, 0.25  # polling a young pending dedup key
CLOSE_STEP_TIMEOUT_S = 5.0
PUBLISH_BATCH = 128  # jobs coalesced into one AMQP message at most


class NotPublished(Exception):
    """The job was never handed to the broker (no usable channel)."""


class DedupBusy(Exception):
    """Another accept of the same (sender, client_msg_id) did not finish in time."""


class _InFlight:
    """Counts running operations; `idle()` fires once none is left."""

    def __init__(self) -> None:
        self.count = 0
        self._waiters: list[Deferred[None]] = []

    def track(self, d: Deferred[_T]) -> Deferred[_T]:
        self.count += 1
        d.addBoth(self._done)
        return d

    def _done(self, result: _T) -> _T:
        self.count -= 1
        if self.count == 0:
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                w.callback(None)
        return result

    def idle(self) -> Deferred[None]:
        if self.count == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d


def _server_clock() -> int:
    """The `now` of a claim that leaves the time to the Redis server's clock."""
    return SERVER_CLOCK


async def _settle(ds: Sequence[Deferred[Any]], reactor: IServerReactor, timeout: float) -> None:
    """Wait for all of `ds` (errors ignored), at most `timeout` seconds each."""
    for d in ds:
        try:
            await d.addTimeout(timeout, reactor)
        except Exception:
            pass


def _msg_id(job: QueuedJob) -> int:
    return job.msg_id if isinstance(job, StateJob) else job.message.msg_id


# (channel, consumer tag, deliveries) of a partition queue's current consumer
_Consumer = tuple[TwistedChannel, str, ClosableDeferredQueue]


class RabbitQueue:
    """PersistQueue on RabbitMQ (durable, confirmed) with Redis dedup. See the module doc.

    Lifecycle: `start()` (fires once connected and declared), `accept`/`consume`, `close()`.
    """

    def __init__(
        self,
        amqp_url: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 5672,
        redis: RedisClient | None = None,
        redis_host: str = "127.0.0.1",
        redis_port: int = 6379,
        prefix: str = "improto",
        partitions: int = 1,
        prefetch: int = PREFETCH,
        publish_batch: int = PUBLISH_BATCH,
        redis_cluster: bool = False,
        dedup_ttl_ms: int = DEDUP_TTL_MS,
        stale_pending_ms: int = STALE_PENDING_MS,
        now_ms: Callable[[], int] | None = None,
        retry_delay_s: float = RETRY_DELAY_S,
        confirm_timeout_s: float = CONFIRM_TIMEOUT_S,
        connect_wait_s: float = CONNECT_WAIT_S,
        reactor: IServerReactor | None = None,
    ) -> None:
        """`amqp_url` (amqp:// or amqps://, e.g. amqp://guest:guest@127.0.0.1:5672/%2F), or
        `host`/`port` with guest credentials. `redis`: a txredisapi connection or pool made
        with charset=None, owned by the caller; without it one is made to
        `redis_host`:`redis_port` and closed by `close()`. `now_ms`: the clock for the ages
        of pending dedup keys (default: the Redis server's clock)."""
        reactor = reactor or server_reactor()
        if partitions < 1 or prefetch < 1:
            raise ValueError("partitions and prefetch must be at least 1")
        self._reactor = reactor
        if amqp_url is None:
            amqp_url = f"amqp://guest:guest@{host}:{port}/%2F"
        self._amqp = AmqpConnection(amqp_url, reactor, self._declare)
        self._own_redis: txredisapi.ConnectionHandler | None = None
        if redis is None:
            redis = self._own_redis = redis_connect(redis_host, redis_port)
        check_binary(redis)
        self._dedup = DedupKeys(
            redis, prefix, reactor, ttl_ms=dedup_ttl_ms, stale_ms=stale_pending_ms,
            cluster=redis_cluster,
        )  # fmt: skip
        self.prefix = prefix
        self.partitions = partitions
        self.names = queue_names(prefix, partitions)
        self._prefetch = prefetch
        self._clock: Callable[[], int] = now_ms or _server_clock
        self._retry_delay = retry_delay_s
        self._confirm_timeout = confirm_timeout_s
        self._connect_wait = connect_wait_s

        self._started = False
        self._stopping = False  # close() began: no new work
        self._closing = Once(self._close)
        self._pub: TwistedChannel | None = None
        self._pauses: dict[Deferred[None], IDelayedCall] = {}
        self._handler: BatchHandler | None = None
        self._max_batch = 1
        self._consumers: dict[str, _Consumer] = {}  # by queue name
        self._consuming_on: AmqpProtocol | None = None
        self._loops = _InFlight()  # consumer loops, each finishing its in-flight job
        self._accepts = _InFlight()
        # queue name -> its group commit of publishes: (msg_id, job bytes, is a StateJob) ->
        # None once confirmed
        self._publishers: dict[str, TurnBatcher[tuple[int, bytes, bool], None]] = {}
        self._publish_batch = publish_batch
        self.published = 0  # AMQP messages published (each carries one or more jobs)
        self._amqp.on_connected(self._start_consumers)

    # ------------------------------------------------------------------ public API

    @property
    def connection(self) -> AmqpProtocol | None:
        """The AMQP connection in use, or None while (re)connecting."""
        return self._amqp.connection

    @property
    def connections(self) -> int:
        """Connections set up so far (1 + reconnects)."""
        return self._amqp.connections

    def dedup_key(self, sender_id: int, client_msg_id: bytes) -> str:
        return self._dedup.key(sender_id, client_msg_id)

    def partition(self, job: QueuedJob) -> int:
        return partition_of(job.history_key, self.partitions)

    def start(self) -> Deferred[None]:
        """Connect, declare, enable confirms; fires once ready (fails after 30 s, while the
        connection keeps trying until `close()`)."""
        if self._started:
            raise RuntimeError("RabbitQueue.start() may be called once")
        self._started = True
        self._amqp.start()
        return self._start()

    @as_deferred
    async def _start(self) -> None:
        await self._dedup.load()
        await self.when_ready(START_TIMEOUT_S)

    def when_ready(self, timeout: float | None = None) -> Deferred[None]:
        """Fires when a connection is ready (now or after the next (re)connect)."""
        return self._amqp.when_ready(timeout)

    def accept(self, job: PersistJob, client_msg_id: bytes) -> Deferred[Accepted]:
        if not self._started or self._stopping:
            return fail(RuntimeError("RabbitQueue is not running"))
        return self._accepts.track(self._accept(job, client_msg_id))

    def accept_state(self, job: StateJob) -> Deferred[None]:
        if not self._started or self._stopping:
            return fail(RuntimeError("RabbitQueue is not running"))
        return self._accepts.track(self._accept_state(job))

    def consume(self, handler: BatchHandler, max_batch: int = 1) -> None:
        if self._handler is not None:
            raise RuntimeError("consume() may be called once")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._handler = handler
        self._max_batch = max_batch
        if self.connection is not None:
            self._start_consumers(self.connection)

    def on_connected(self, hook: Hook) -> None:
        """Call `hook(connection)` after every (re)connection, and now if connected: other
        users of the broker (the push router) share this connection and its reconnects."""
        self._amqp.on_connected(hook)

    @as_deferred
    async def backlog(self) -> int:
        """AMQP messages ready in the partition queues (not counting unacked deliveries);
        each carries one or more jobs."""
        await self.when_ready(self._connect_wait)
        assert self._pub is not None
        total = 0
        for name in self.names.partitions:
            frame = await self._pub.queue_declare(queue=name, passive=True)
            total += frame.method.message_count
        return total

    def close(self) -> Deferred[None]:
        """Stop consuming, let in-flight handlers and accepts finish (a handler that
        succeeds is still acked), then close the channels and the connection."""
        return self._closing()

    # ------------------------------------------------------------------ accept

    @as_deferred
    async def _accept(self, job: PersistJob, client_msg_id: bytes) -> Accepted:
        m = job.message
        data = job.to_bytes()  # validates the message before anything is written
        key = self._dedup.key(m.sender_id, client_msg_id)
        token = self._dedup.token()
        deadline = time.monotonic() + self._dedup.stale_ms / 1000 + self._confirm_timeout
        pause = POLL_MIN_S
        while True:
            now = self._clock()
            claim = await self._dedup.claim(key, token, now, m.msg_id, m.server_time, data)
            if claim.kind == "new":
                await self._publish_claimed(key, token, m.msg_id, job.history_key, data, True)
                return Accepted(m.msg_id, m.server_time, duplicate=False)
            if claim.kind == "confirmed":
                return Accepted(claim.msg_id, claim.server_time, duplicate=True)
            if claim.kind == "takeover":
                conv = PersistJob.from_bytes(claim.job).history_key
                _log.info(
                    "re-publishing message {msg_id} left unconfirmed under {key}",
                    msg_id=claim.msg_id, key=key,
                )  # fmt: skip
                await self._publish_claimed(key, token, claim.msg_id, conv, claim.job, False)
                return Accepted(claim.msg_id, claim.server_time, duplicate=True)
            # Another accept of the same key is publishing: wait for its outcome.
            if self._stopping or time.monotonic() > deadline:
                raise DedupBusy(f"{key} is still pending")
            await self._pause(pause)
            pause = min(pause * 2, POLL_MAX_S)

    @as_deferred
    async def _accept_state(self, job: StateJob) -> None:
        await self._publish(job.history_key, job.to_bytes(), job.msg_id, state=True)

    async def _publish_claimed(
        self, key: str, token: str, msg_id: int, conv: ConvKey, data: bytes, fresh: bool
    ) -> None:
        """Publish the claimed job; settle the dedup key on success or failure."""
        try:
            # A timeline job travels as MIXED_TYPE too: newer than what BATCH_TYPE readers know
            await self._publish(conv, data, msg_id, state=data[0] == TIMELINE_JOB_FORMAT)
        except NotPublished:
            # Nothing reached the broker. A key this accept created can go; one taken over
            # may have been published by its earlier owner, so it is only marked failed.
            await self._dedup.release(key, token, delete=fresh)
            raise
        except BaseException:
            await self._dedup.release(key, token, delete=False)  # outcome unknown: keep the job
            raise
        try:
            await self._dedup.confirm(key, msg_id)
        except Exception:
            # The message is durable; the key stays pending and a resend re-publishes the
            # same msg_id once the key is stale (a harmless second copy).
            _log.failure("marking {key} confirmed failed", key=key)

    async def _publish(
        self, conv: ConvKey, data: bytes, msg_id: int, *, state: bool = False
    ) -> None:
        """Hand the job to the broker, coalesced with the other jobs for the same queue
        accepted in this reactor turn (group commit: one message, one confirm for all)."""
        if self._pub is None or not self._pub.is_open:
            try:
                await self.when_ready(self._connect_wait)
            except Exception as e:
                raise NotPublished(f"no AMQP connection: {e!r}") from e
        queue = self.names.partitions[partition_of(conv, self.partitions)]
        batcher = self._publishers.get(queue)
        if batcher is None:
            run = functools.partial(self._publish_many, queue)
            batcher = self._publishers[queue] = TurnBatcher(self._reactor, run, self._publish_batch)
        await batcher.submit((msg_id, data, state))

    def _publish_many(
        self, queue: str, jobs: list[tuple[int, bytes, bool]]
    ) -> Deferred[list[None]]:
        """One persistent message carrying `jobs`; fires when the broker confirmed it."""
        ch = self._pub
        if ch is None or not ch.is_open:
            return fail(NotPublished("the AMQP channel closed"))
        props = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type="application/octet-stream",
            type=MIXED_TYPE if any(state for _, _, state in jobs) else BATCH_TYPE,
            message_id=f"{jobs[0][0]}+{len(jobs) - 1}",
        )
        try:
            confirmed = ch.basic_publish(
                "", queue, pack_jobs([data for _, data, _ in jobs]), props, mandatory=True
            )
        except Exception as e:  # pika refused to send (channel or connection closing)
            return fail(NotPublished(f"publish refused: {e!r}"))
        self.published += 1
        confirmed.addTimeout(self._confirm_timeout, self._reactor)
        return confirmed.addCallbacks(
            lambda _: [None] * len(jobs), self._publish_failed, errbackArgs=(queue,)
        )

    def _publish_failed(self, failure: Failure, queue: str) -> Failure:
        if failure.check(UnroutableError):
            _log.error("queue {queue} is missing: declaring it again", queue=queue)
            proto = self.connection
            if proto is not None:
                self._amqp.reset(proto)  # the reconnect re-declares everything
        return failure

    # ------------------------------------------------------------------ topology

    @as_deferred
    async def _declare(self, proto: AmqpProtocol) -> None:
        """The connection's set-up: the queues and the publishing channel, in confirm mode."""
        check_broker(proto)
        ch = await proto.channel()
        await ch.exchange_declare(self.names.dead_exchange, exchange_type="fanout", durable=True)
        await declare_queue(ch, self.names.dead_queue, DEAD_QUEUE_ARGUMENTS)
        await ch.queue_bind(self.names.dead_queue, self.names.dead_exchange)
        arguments = persist_queue_arguments(self.names.dead_exchange)
        for name in self.names.partitions:
            await declare_queue(ch, name, arguments)
        await ch.confirm_delivery()
        ch.on_closed.addCallback(self._channel_closed, proto, "publish")
        self._pub = ch

    def _channel_closed(self, reason: object, proto: AmqpProtocol, what: str) -> None:
        if not self._stopping and not proto.gone:
            _log.error("AMQP {what} channel closed: {reason}", what=what, reason=reason)
            self._amqp.reset(proto)

    # ------------------------------------------------------------------ consumers

    def _start_consumers(self, proto: AmqpProtocol) -> None:
        if self._handler is None or self._stopping or self._consuming_on is proto:
            return
        self._consuming_on = proto
        for name in self.names.partitions:
            self._loops.track(self._consume_queue(proto, name))

    @as_deferred
    async def _consume_queue(self, proto: AmqpProtocol, name: str) -> None:
        """Deliver the queue's jobs to the handler, a batch at a time, until the consumer stops
        (close) or the connection goes."""
        ch: TwistedChannel | None = None
        try:
            ch = await proto.channel()
            await ch.basic_qos(prefetch_count=self._prefetch)
            while not self._stopping and not proto.gone:
                deliveries, tag = await ch.basic_consume(queue=name)
                self._consumers[name] = (ch, tag, deliveries)
                failed = await self._drain(ch, deliveries)
                if not failed or self._stopping or proto.gone:
                    break
                # Requeue the failed job and everything prefetched behind it, in order.
                await self._pause(self._retry_delay)
                if self._stopping or not ch.is_open:
                    break
                await ch.basic_cancel(tag)
                ch.basic_nack(delivery_tag=0, multiple=True, requeue=True)
            unexpected = not self._stopping and not proto.gone
            if unexpected:  # cancelled by the broker (queue deleted?) or the channel closed
                _log.error("consumer of {queue} stopped; resetting the connection", queue=name)
        except Exception:
            unexpected = not self._stopping and not proto.gone
            if unexpected:
                _log.failure("consumer of {queue} failed; resetting the connection", queue=name)
        finally:
            current = self._consumers.get(name)
            if current is not None and current[0] is ch:
                del self._consumers[name]
        if unexpected:
            self._amqp.reset(proto)  # the reconnect declares and consumes afresh

    async def _drain(self, ch: TwistedChannel, deliveries: ClosableDeferredQueue) -> bool:
        """Handle deliveries until the consumer ends (False) or a handler fails (True).

        The jobs of the next delivery plus of those already received behind it (never
        waiting for more), while fewer than max_batch, go to the handler in batches of at
        most max_batch; then one basic_ack with multiple=True settles those deliveries."""
        handler = self._handler
        assert handler is not None
        while not self._stopping:
            try:
                msgs = [await deliveries.get()]
            except Exception:
                return False  # consumer cancelled, channel or connection closed
            if len(deliveries.pending) < LINGER_BELOW:  # a small batch so far: let it fill
                await self._pause(LINGER_S)
            jobs: list[QueuedJob] = []
            last_tag = 0
            while True:
                msg = msgs[-1]
                try:
                    jobs.extend(decode_message(msg.properties.type, msg.body))
                    last_tag = msg.method.delivery_tag
                except Exception:
                    _log.failure(
                        "undecodable job (message_id {mid}, {n} bytes) moved to {dlq}",
                        mid=msg.properties.message_id, n=len(msg.body),
                        dlq=self.names.dead_queue,
                    )  # fmt: skip
                    if ch.is_open:
                        ch.basic_nack(delivery_tag=msg.method.delivery_tag, requeue=False)
                if len(jobs) >= self._max_batch or not deliveries.pending:
                    break
                msgs.append(deliveries.pending.pop(0))
            if not jobs:
                continue
            for i in range(0, len(jobs), self._max_batch):
                batch = jobs[i : i + self._max_batch]
                try:
                    await maybeDeferred(handler, batch)
                except Exception:
                    # The deliveries go back whole: jobs of this batch's first delivery
                    # that were in an earlier, successful batch come again (idempotent).
                    _log.failure(
                        "persisting jobs of msg ids {first}..{last} failed; requeued in {delay} s",
                        first=_msg_id(batch[0]), last=_msg_id(batch[-1]),
                        delay=self._retry_delay,
                    )  # fmt: skip
                    return True
                if not ch.is_open:
                    break  # the broker requeued the rest already: no point writing it now
            if ch.is_open:
                # Every delivery up to this tag is in this batch or settled before it (the
                # undecodable ones were nacked), so one ack settles the whole batch.
                ch.basic_ack(delivery_tag=last_tag, multiple=True)
            # else: the broker already requeued them with the channel; the redelivery is
            # written again idempotently.
        return False

    # ------------------------------------------------------------------ closing

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

    @as_deferred
    async def _close(self) -> None:
        try:
            await self._shutdown()
        except Exception:
            _log.failure("closing the RabbitMQ queue failed")

    async def _shutdown(self) -> None:
        self._stopping = True
        for d, call in list(self._pauses.items()):
            call.cancel()
            self._pauses.pop(d, None)
            d.callback(None)
        self._amqp.closing()  # accepts waiting for a connection fail now
        consumers = list(self._consumers.values())
        cancels = [ch.basic_cancel(tag) for ch, tag, _ in consumers if ch.is_open]
        await _settle(cancels, self._reactor, CLOSE_STEP_TIMEOUT_S)
        for _, _, deliveries in consumers:  # in case a Basic.CancelOk never came
            if not deliveries.closed:
                deliveries.close(ConsumerCancelled())
        await self._loops.idle()
        await self._accepts.idle()
        await self._amqp.close()
        if self._own_redis is not None:
            await self._own_redis.disconnect()
