"""The persist queue on RabbitMQ (the PersistQueue port), with the dedup keys in Redis.

pika's Twisted adapter (`TwistedProtocolConnection`, deprecated for pika 2.0) is used only
inside `RabbitQueue`, so it can be swapped without touching callers.

Broker layout (P = the prefix):

    P.persist.<i>     durable classic queue, i in 0..partitions-1; arguments
                      x-single-active-consumer (one persister at a time per queue, the others
                      stand by) and x-dead-letter-exchange = P.persist.dlx.
    P.persist.dlx     durable fanout exchange, bound to P.persist.dead: jobs that cannot even
                      be decoded are dead-lettered there and kept for inspection.

Jobs are published to the default exchange (routing key = the queue name) as persistent
messages (delivery_mode 2), mandatory, on one channel in confirm mode. Group commit: the jobs
accepted in one reactor turn for one queue travel in one message (type improto.persist.v2,
body = pack_jobs(): each job behind a u32 length; up to `publish_batch` jobs), and the dedup
scripts of one turn run as one call (split by slot when `redis_cluster`). `accept()` resolves
when the broker confirms the message carrying its job, so any number of accepts are in flight
at once; a message of type improto.persist.v1 (or none) holds one job. pika's
TwistedChannel keeps the Deferred of every delivery tag and settles it on Basic.Ack/Basic.Nack,
including `multiple=True` ones (a nack or a Basic.Return errbacks it). A confirm for a
persistent message in a durable queue means the broker has written it to disk.

Dedup (Redis, one hash per (sender, client_msg_id), TTL `dedup_ttl_ms` from the first accept):

    P:dedup:{s<sender>}:<client_msg_id hex>   (the {s<sender>} hash tag keeps a sender's keys
                                               in one Redis Cluster slot)
        state   pending | failed | confirmed
        msg_id  server_time   the ids of the message accepted for this key (decimal)
        job     PersistJob.to_bytes() of that message (dropped once confirmed)
        owner   unique token of the accept that is publishing it (while pending)
        at      when the current owner claimed it, ms (while pending/failed)

    accept:  CLAIM (one Lua script) -> publish -> wait for the broker confirm -> CONFIRM
    CLAIM    no key:      create it pending, owned by this accept, and publish our job;
             confirmed:   a duplicate: return the stored ids, publish nothing;
             failed, or pending for `stale_pending_ms` (10 s; its publisher died or hangs):
                          take it over and re-publish the STORED job (same msg_id), then
                          return the stored ids with duplicate=True;
             pending and younger: poll until it is confirmed, failed, stale or gone.
    failure  never handed to the broker (no channel within `connect_wait_s`): delete the key
             if it is still pending and ours, so the retry is a fresh accept; handed over but
             not confirmed (nack, return, connection lost, `confirm_timeout_s`): the outcome
             is unknown, so mark it failed (if still pending and ours) and keep the job: the
             retry re-publishes the same message instead of accepting a second msg_id.

"Pending" timestamps come from the Redis server clock (TIME in the script), one clock for
every gateway, unless `now_ms` is given (tests).

What a gateway crash at each step leaves behind (the client did not get its ack unless the
last step completed, and retries with the same client_msg_id):

    before CLAIM                  nothing; the retry is a fresh accept.
    after CLAIM, before publish   a pending key, nothing queued. The retry waits until the key
                                  is stale, re-publishes the stored job, returns its ids.
    after publish, before confirm maybe queued. The retry re-publishes the same job: at worst
                                  two copies of one msg_id are queued.
    after confirm, before CONFIRM queued; key pending. As above (a second copy at worst).
    after CONFIRM, before the ack the retry gets the stored ids, duplicate=True.

So no acknowledged message is lost (the ack waits for the broker confirm), and receivers see
no duplicate: every copy of a message carries the same msg_id and the persister's writes are
idempotent per msg_id (inbox per (user, msg_id), history per msg_id). A client that never
retries after a failed accept was never acknowledged, and the pending key expires with the TTL.
Redis unavailable: accept fails before anything is published. RabbitMQ unavailable: accept
fails within `connect_wait_s`/`confirm_timeout_s`; in-flight accepts errback on a connection
loss and the retry goes through the dedup key as above. What Redis does not persist (a crash
without AOF) loses dedup keys: run it with appendonly yes, appendfsync always.
A takeover re-publish is returned as duplicate=True (the gateway then pushes nothing live for
it: the receivers get it from the offline pull, which is what guarantees delivery anyway).

Consumers: one channel per partition queue, basic_qos(prefetch), jobs handled in batches
(the next delivery plus those already received, up to max_batch), one batch at a time per
queue in queue order; one basic_ack (multiple) only after the handler's Deferred succeeded
(the persister writes both stores first). A failed handler: after `retry_delay_s` the
consumer is cancelled and every outstanding delivery of its channel is nacked with requeue
(basic_nack delivery_tag=0, multiple=True), then it consumes again. RabbitMQ puts requeued
messages back at their original positions, so the failed batch comes back first and the jobs
prefetched behind it keep their order (checked against RabbitMQ 3.10; a plain nack of the one failed
delivery would let the already-prefetched later jobs overtake it). Nothing is ever dropped,
except a message that cannot be decoded: logged and nacked without requeue into the dead-letter
queue. A connection lost while a handler runs: the broker requeues the job for the next active
consumer; the late handler result is dropped, never acked on another channel.

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

Reconnection: the connection is re-established with exponential backoff (0.1 s .. 10 s, with
jitter); every new connection re-declares the topology, re-enables confirms and re-consumes.
An unexpected channel close or consumer cancel (e.g. a queue deleted) resets the connection.
"""

from __future__ import annotations

import functools
import itertools
import random
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pika
from pika.adapters.twisted_connection import TwistedChannel, TwistedProtocolConnection
from pika.exceptions import ConsumerCancelled, UnroutableError

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto_server.model import Accepted, ConvKey, PersistJob
from improto_server.ports import BatchHandler
from improto_server.production.redis_inbox import LuaScript, gather
from improto_server.production.redis_inbox import connect as redis_connect
from improto_server.production.redis_slots import slot_groups
from improto_server.turn_batcher import TurnBatcher

_log = Logger()
_T = TypeVar("_T")

DAY_MS = 86_400_000
DEDUP_TTL_MS = 7 * DAY_MS
STALE_PENDING_MS = 10_000  # a pending dedup key this old: its publisher is presumed dead
PREFETCH = 1024  # >= 2 batches, so the next batch is on hand when one is written
# When a delivery arrives with little behind it, the consumer waits this long for more:
# a handler call (one Redis script, HBase puts, one ack) costs about the same for 1 job as for
# 50, so at low rates this cuts the CPU per job several times. Only the stores lag (<= this).
LINGER_S = 0.02
# The dedup claims of this long (not just of one reactor turn) go out as one script call, and
# so, behind them, the confirms and the publish: ~1 ms more per SEND, 20-25% less CPU per
# message at 1-2k msg/s (bench/relay.py), where turns hold one or two SENDs each.
ACCEPT_WINDOW_S = 0.001
RETRY_DELAY_S = 0.5  # pause before requeueing a job whose handler failed
CONFIRM_TIMEOUT_S = 8.0  # < STALE_PENDING_MS: a live publisher gives up before a takeover
CONNECT_WAIT_S = 5.0  # how long an accept waits for a (re)connection
CONNECT_TIMEOUT_S = 10.0  # TCP connect + AMQP handshake
START_TIMEOUT_S = 30.0
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.1, 10.0
POLL_MIN_S, POLL_MAX_S = 0.02, 0.25  # polling a young pending dedup key
CLOSE_STEP_TIMEOUT_S = 5.0
HEARTBEAT_S = 30
JOB_TYPE = "improto.persist.v1"  # the body is one PersistJob (what older versions sent)
BATCH_TYPE = "improto.persist.v2"  # the body is pack_jobs() of one or more PersistJobs
PUBLISH_BATCH = 128  # jobs coalesced into one AMQP message at most
SCRIPT_BATCH = 256  # dedup keys one claim or confirm script call handles at most


class NotPublished(Exception):
    """The job was never handed to the broker (no usable channel)."""


class DedupBusy(Exception):
    """Another accept of the same (sender, client_msg_id) did not finish in time."""


@dataclass(frozen=True, slots=True)
class QueueNames:
    partitions: tuple[str, ...]
    dead_exchange: str
    dead_queue: str


def queue_names(prefix: str, partitions: int) -> QueueNames:
    """The broker objects `RabbitQueue(prefix=prefix, partitions=partitions)` declares."""
    return QueueNames(
        tuple(f"{prefix}.persist.{i}" for i in range(partitions)),
        f"{prefix}.persist.dlx",
        f"{prefix}.persist.dead",
    )


def partition_of(key: ConvKey | str, partitions: int) -> int:
    """The queue index of a conversation: a hash that is the same in every process."""
    return zlib.crc32(str(key).encode()) % partitions


def pack_jobs(jobs: Sequence[bytes]) -> bytes:
    """A batch message body: each job's bytes behind a big-endian u32 length."""
    return b"".join(len(job).to_bytes(4, "big") + job for job in jobs)


def unpack_jobs(body: bytes) -> list[PersistJob]:
    """The jobs of a pack_jobs() body; ValueError unless it splits exactly."""
    jobs, pos = [], 0
    while pos < len(body):
        if pos + 4 > len(body):
            raise ValueError("truncated job length")
        n = int.from_bytes(body[pos : pos + 4], "big")
        pos += 4
        if n == 0 or pos + n > len(body):
            raise ValueError(f"job of {n} bytes at {pos} does not fit the body")
        jobs.append(PersistJob.from_bytes(body[pos : pos + n]))
        pos += n
    if not jobs:
        raise ValueError("empty batch")
    return jobs


def decode_message(msg_type: str | None, body: bytes) -> list[PersistJob]:
    if msg_type == BATCH_TYPE:
        return unpack_jobs(body)
    return [PersistJob.from_bytes(body)]


# ------------------------------------------------------------------------- Redis scripts

# KEYS: dedup keys. ARGV: stale_ms, ttl_ms, then per key: token, now_ms (< 0: Redis TIME),
# msg_id, server_time, job. One reply per key, in order. Ids stay strings: u64 do not fit Lua's
# doubles. Keys are handled one after the other, so the same key twice behaves as two calls.
_CLAIM = """
local stale, ttl = tonumber(ARGV[1]), ARGV[2]
local clock = nil
local out = {}
for i = 1, #KEYS do
  local a = 2 + 5 * (i - 1)
  local key, token, now = KEYS[i], ARGV[a + 1], tonumber(ARGV[a + 2])
  if now < 0 then
    if not clock then
      local t = redis.call('TIME')
      clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    now = clock
  end
  local cur = redis.call('HMGET', key, 'state', 'at', 'msg_id', 'time', 'job')
  if not cur[1] then
    redis.call('HSET', key, 'state', 'pending', 'owner', token, 'at', now,
               'msg_id', ARGV[a + 3], 'time', ARGV[a + 4], 'job', ARGV[a + 5])
    redis.call('PEXPIRE', key, ttl)
    out[i] = {'new'}
  elseif cur[1] == 'confirmed' then
    out[i] = {'confirmed', cur[3], cur[4]}
  elseif cur[1] == 'failed' or now - tonumber(cur[2] or '0') >= stale then
    redis.call('HSET', key, 'state', 'pending', 'owner', token, 'at', now)
    out[i] = {'takeover', cur[3], cur[4], cur[5]}
  else
    out[i] = {'wait', cur[3], cur[4]}
  end
end
return out
"""

# KEYS[1] dedup key. ARGV: token, "delete" | "fail". Only while pending and ours.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then return 0 end
if ARGV[2] == 'delete' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'state', 'failed')
  redis.call('HDEL', KEYS[1], 'owner')
end
return 1
"""

# KEYS: dedup keys. ARGV: the msg_id of each. The broker confirmed a copy of these messages.
_CONFIRM = """
local out = {}
for i = 1, #KEYS do
  out[i] = 0
  if redis.call('HGET', KEYS[i], 'msg_id') == ARGV[i] then
    redis.call('HSET', KEYS[i], 'state', 'confirmed')
    redis.call('HDEL', KEYS[i], 'owner', 'at', 'job')
    out[i] = 1
  end
end
return out
"""


_SCRIPTS = tuple(LuaScript(s) for s in (_CLAIM, _RELEASE, _CONFIRM))
_claim, _release, _confirm = _SCRIPTS


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ------------------------------------------------------------------------------ helpers


class _InFlight:
    """Counts running operations; `idle()` fires once none is left."""

    def __init__(self) -> None:
        self.count = 0
        self._waiters: list[Deferred[None]] = []

    def track(self, d: Deferred[_T]) -> Deferred[_T]:
        self.count += 1
        d.addBoth(self._done)
        return d

    def _done(self, result: Any) -> Any:
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


class _AMQP(TwistedProtocolConnection):
    """pika's Twisted protocol, plus a Deferred that fires when the TCP connection is gone."""

    def __init__(self, parameters: pika.ConnectionParameters, reactor: Any) -> None:
        super().__init__(parameters, custom_reactor=reactor)
        self.gone = False
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        # pika writes a publish as several small frames; with Nagle on, a frame can wait for
        # the broker's delayed ACK (~40 ms) before it leaves: every SEND_ACK would too.
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
        """Abort the TCP connection (the reconnect loop then starts over)."""
        if not self.gone and self.transport is not None:
            self.transport.abortConnection()


async def _settle(ds: Sequence[Deferred[Any]], reactor: Any, timeout: float) -> None:
    """Wait for all of `ds` (errors ignored), at most `timeout` seconds each."""
    for d in ds:
        try:
            await d.addTimeout(timeout, reactor)
        except Exception:
            pass


# -------------------------------------------------------------------------------- queue


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
        redis: Any = None,
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
        reactor: Any = None,
    ) -> None:
        """`amqp_url` (amqp:// or amqps://, e.g. amqp://guest:guest@127.0.0.1:5672/%2F), or
        `host`/`port` with guest credentials. `redis`: a txredisapi connection or pool made
        with charset=None, owned by the caller; without it one is made to
        `redis_host`:`redis_port` and closed by `close()`. `now_ms`: the clock for the ages
        of pending dedup keys (default: the Redis server's clock)."""
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if partitions < 1 or prefetch < 1:
            raise ValueError("partitions and prefetch must be at least 1")
        self._reactor = reactor
        if amqp_url is None:
            amqp_url = f"amqp://guest:guest@{host}:{port}/%2F"
        self._params = pika.URLParameters(amqp_url)
        if "heartbeat" not in amqp_url:
            self._params.heartbeat = HEARTBEAT_S
        self._tls = amqp_url.startswith("amqps:")
        self._own_redis = redis is None
        if redis is None:
            redis = redis_connect(redis_host, redis_port)
        elif getattr(getattr(redis, "_factory", redis), "charset", None) is not None:
            raise ValueError("the Redis connection must be made with charset=None")
        self._redis = redis
        self.prefix = prefix
        self.partitions = partitions
        self.names = queue_names(prefix, partitions)
        self._prefetch = prefetch
        self._ttl_ms = dedup_ttl_ms
        self._stale_ms = stale_pending_ms
        self._now_ms = now_ms
        self._retry_delay = retry_delay_s
        self._confirm_timeout = confirm_timeout_s
        self._connect_wait = connect_wait_s

        self._started = False
        self._stopping = False  # close() began: no new work
        self._closed: Deferred[None] | None = None
        self._runner: Deferred[None] | None = None
        self._attempt: Deferred[Any] | None = None  # a TCP connect in progress
        self._proto: _AMQP | None = None  # the connection being set up or in use
        self._conn: _AMQP | None = None  # the connection in use (declared, confirms on)
        self._pub: TwistedChannel | None = None
        self._ready_waiters: list[Deferred[None]] = []
        self._pauses: dict[Deferred[None], IDelayedCall] = {}
        self._handler: BatchHandler | None = None
        self._max_batch = 1
        # queue name -> (channel, consumer tag, deliveries) of the current consumer
        self._consumers: dict[str, tuple[TwistedChannel, str, Any]] = {}
        self._consuming_on: _AMQP | None = None
        self._loops = _InFlight()  # consumer loops, each finishing its in-flight job
        self._accepts = _InFlight()
        # queue name -> its group commit of publishes: (msg_id, job) -> None once confirmed
        self._publishers: dict[str, TurnBatcher[tuple[int, bytes], None]] = {}
        self._publish_batch = publish_batch
        self._cluster = redis_cluster
        # Group commit of the dedup scripts: one call per reactor turn (per slot on Cluster).
        self._claims: TurnBatcher[tuple[Any, ...], Any] = TurnBatcher(
            reactor, self._run_claims, SCRIPT_BATCH, ACCEPT_WINDOW_S
        )
        self._confirms: TurnBatcher[tuple[Any, ...], Any] = TurnBatcher(
            reactor, self._run_confirms, SCRIPT_BATCH
        )
        # Claim owner tokens: unique per process (random base) and per accept (counter).
        self._token_base = uuid.uuid4().hex[:16] + "-"
        self._tokens = itertools.count()
        self.connections = 0  # connections set up so far (1 + reconnects)
        self.published = 0  # AMQP messages published (each carries one or more jobs)
        self._hooks: list[Callable[[Any], Any]] = []

    # ------------------------------------------------------------------ public API

    @property
    def connection(self) -> TwistedProtocolConnection | None:
        """The AMQP connection in use, or None while (re)connecting."""
        return self._conn

    def dedup_key(self, sender_id: int, client_msg_id: bytes) -> str:
        return f"{self.prefix}:dedup:{{s{sender_id}}}:{client_msg_id.hex()}"

    def partition(self, job: PersistJob) -> int:
        return partition_of(job.history_key, self.partitions)

    def start(self) -> Deferred[None]:
        """Connect, declare, enable confirms; fires once ready (fails after 30 s, while the
        reconnect loop keeps trying until `close()`)."""
        if self._started:
            raise RuntimeError("RabbitQueue.start() may be called once")
        self._started = True
        self._runner = Deferred.fromCoroutine(self._run())
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        for script in _SCRIPTS:  # also proves Redis answers
            await script.load(self._redis)
        await self.when_ready(START_TIMEOUT_S)

    def when_ready(self, timeout: float | None = None) -> Deferred[None]:
        """Fires when a connection is ready (now or after the next (re)connect)."""
        if self._conn is not None and self._pub is not None and self._pub.is_open:
            return succeed(None)
        if self._stopping:
            return _failed(NotPublished("RabbitQueue is closing"))

        def forget(d: Deferred[None]) -> None:
            if d in self._ready_waiters:
                self._ready_waiters.remove(d)

        d: Deferred[None] = Deferred(forget)
        self._ready_waiters.append(d)
        if timeout is not None:
            d.addTimeout(timeout, self._reactor)
        return d

    def accept(self, job: PersistJob, client_msg_id: bytes) -> Deferred[Accepted]:
        if not self._started or self._stopping:
            return _failed(RuntimeError("RabbitQueue is not running"))
        return self._accepts.track(Deferred.fromCoroutine(self._accept(job, client_msg_id)))

    def consume(self, handler: BatchHandler, max_batch: int = 1) -> None:
        if self._handler is not None:
            raise RuntimeError("consume() may be called once")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._handler = handler
        self._max_batch = max_batch
        if self._conn is not None:
            self._start_consumers(self._conn)

    def on_connected(self, hook: Callable[[TwistedProtocolConnection], Any]) -> None:
        """Call `hook(connection)` after every (re)connection, and now if connected: other
        users of the broker (the push router) share this connection and its reconnects."""
        self._hooks.append(hook)
        if self._conn is not None:
            self._run_hook(hook, self._conn)

    def _run_hook(self, hook: Callable[[Any], Any], proto: _AMQP) -> None:
        d = maybeDeferred(hook, proto)
        d.addErrback(lambda f: None if proto.gone else _log.failure("AMQP hook failed", f))

    def backlog(self) -> Deferred[int]:
        """AMQP messages ready in the partition queues (not counting unacked deliveries);
        each carries one or more jobs."""
        return Deferred.fromCoroutine(self._backlog())

    async def _backlog(self) -> int:
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
        if self._closed is None:
            self._closed = Deferred.fromCoroutine(self._close())
        waiter: Deferred[None] = Deferred()
        self._closed.addBoth(lambda r: (waiter.callback(None), r)[1])
        return waiter

    # ------------------------------------------------------------------ accept

    async def _accept(self, job: PersistJob, client_msg_id: bytes) -> Accepted:
        m = job.message
        data = job.to_bytes()  # validates the message before anything is written
        key = self.dedup_key(m.sender_id, client_msg_id)
        token = f"{self._token_base}{next(self._tokens)}"
        now = -1 if self._now_ms is None else self._now_ms()
        deadline = time.monotonic() + self._stale_ms / 1000 + self._confirm_timeout
        pause = POLL_MIN_S
        while True:
            reply = await self._claims.submit((key, token, now, m.msg_id, m.server_time, data))
            kind = _str(reply[0])
            if kind == "new":
                await self._publish_claimed(key, token, m.msg_id, job.history_key, data, True)
                return Accepted(m.msg_id, m.server_time, duplicate=False)
            msg_id, server_time = int(reply[1]), int(reply[2])
            if kind == "confirmed":
                return Accepted(msg_id, server_time, duplicate=True)
            if kind == "takeover":
                stored = bytes(reply[3])
                conv = PersistJob.from_bytes(stored).history_key
                _log.info(
                    "re-publishing message {msg_id} left unconfirmed under {key}",
                    msg_id=msg_id, key=key,
                )  # fmt: skip
                await self._publish_claimed(key, token, msg_id, conv, stored, False)
                return Accepted(msg_id, server_time, duplicate=True)
            # Another accept of the same key is publishing: wait for its outcome.
            if self._stopping or time.monotonic() > deadline:
                raise DedupBusy(f"{key} is still pending")
            await self._pause(pause)
            pause = min(pause * 2, POLL_MAX_S)
            if self._now_ms is not None:
                now = self._now_ms()

    async def _publish_claimed(
        self, key: str, token: str, msg_id: int, conv: ConvKey, data: bytes, fresh: bool
    ) -> None:
        """Publish the claimed job; settle the dedup key on success or failure."""
        try:
            await self._publish(conv, data, msg_id)
        except NotPublished:
            # Nothing reached the broker. A key this accept created can go; one taken over
            # may have been published by its earlier owner, so it is only marked failed.
            await self._release(key, token, "delete" if fresh else "fail")
            raise
        except BaseException:
            await self._release(key, token, "fail")  # outcome unknown: keep the job
            raise
        try:
            await self._confirms.submit((key, msg_id))
        except Exception:
            # The message is durable; the key stays pending and a resend re-publishes the
            # same msg_id after STALE_PENDING_MS (a harmless second copy).
            _log.failure("marking {key} confirmed failed", key=key)

    def _run_claims(self, items: list[tuple[Any, ...]]) -> Deferred[list[Any]]:
        head = [self._stale_ms, self._ttl_ms]
        return self._multi(_claim, items, head, lambda item: item[1:])

    def _run_confirms(self, items: list[tuple[Any, ...]]) -> Deferred[list[Any]]:
        return self._multi(_confirm, items, [], lambda item: item[1:])

    def _multi(
        self,
        script: LuaScript,
        items: list[tuple[Any, ...]],
        head: list[Any],
        per_item: Callable[[tuple[Any, ...]], Sequence[Any]],
    ) -> Deferred[list[Any]]:
        """Run `script` over items (key first) with as few calls as the slots allow; one
        reply per item, in order."""
        indexed = list(enumerate(items))
        groups = slot_groups(indexed, lambda pair: pair[1][0], self._cluster)
        calls = [
            script(
                self._redis,
                [item[0] for _, item in group],
                head + [arg for _, item in group for arg in per_item(item)],
            )
            for group in groups
        ]

        async def assemble() -> list[Any]:
            out: list[Any] = [None] * len(items)
            for group, replies in zip(groups, await gather(calls), strict=True):
                for (i, _), reply in zip(group, replies, strict=True):
                    out[i] = reply
            return out

        return Deferred.fromCoroutine(assemble())

    async def _release(self, key: str, token: str, how: str) -> None:
        try:
            await _release(self._redis, [key], [token, how])
        except Exception:
            _log.failure("releasing dedup key {key} failed", key=key)

    async def _publish(self, conv: ConvKey, data: bytes, msg_id: int) -> None:
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
        await batcher.submit((msg_id, data))

    def _publish_many(self, queue: str, jobs: list[tuple[int, bytes]]) -> Deferred[list[None]]:
        """One persistent message carrying `jobs`; fires when the broker confirmed it."""
        ch = self._pub
        if ch is None or not ch.is_open:
            return _failed(NotPublished("the AMQP channel closed"))
        props = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type="application/octet-stream",
            type=BATCH_TYPE,
            message_id=f"{jobs[0][0]}+{len(jobs) - 1}",
        )
        try:
            confirmed = ch.basic_publish(
                "", queue, pack_jobs([data for _, data in jobs]), props, mandatory=True
            )
        except Exception as e:  # pika refused to send (channel or connection closing)
            return _failed(NotPublished(f"publish refused: {e!r}"))
        self.published += 1
        confirmed.addTimeout(self._confirm_timeout, self._reactor)
        confirmed.addCallbacks(
            lambda _: [None] * len(jobs), self._publish_failed, errbackArgs=(queue,)
        )
        return confirmed

    def _publish_failed(self, failure: Failure, queue: str) -> Failure:
        if failure.check(UnroutableError):
            _log.error("queue {queue} is missing: declaring it again", queue=queue)
            if self._conn is not None:
                self._conn.drop()  # the reconnect re-declares everything
        return failure

    # ------------------------------------------------------------------ connection

    def _endpoint(self) -> Any:
        host, port = self._params.host, self._params.port
        endpoint = HostnameEndpoint(self._reactor, host, port, timeout=CONNECT_TIMEOUT_S)
        if self._tls:
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint

    async def _run(self) -> None:
        """Connect, set up, wait for the loss, repeat with backoff until close()."""
        failures = 0
        while not self._stopping:
            proto: _AMQP | None = None
            try:
                factory = Factory.forProtocol(lambda: _AMQP(self._params, self._reactor))
                self._attempt = self._endpoint().connect(factory)
                proto = await self._attempt
                self._attempt = None
                self._proto = proto
                await proto.ready.addTimeout(CONNECT_TIMEOUT_S, self._reactor)
                await self._setup(proto)
            except Exception as e:
                self._attempt = None
                if proto is not None:
                    proto.drop()
                    await proto.lost
                self._proto = None
                if self._stopping:
                    break
                failures += 1
                delay = min(RECONNECT_MAX_S, RECONNECT_MIN_S * 2 ** min(failures - 1, 10))
                delay *= random.uniform(0.8, 1.2)
                log = _log.warn if failures & (failures - 1) == 0 else _log.debug  # 1, 2, 4..
                log(
                    "AMQP connection failed ({error!r}); retry {n} in {delay:.1f} s",
                    error=e, n=failures, delay=delay,
                )  # fmt: skip
                await self._pause(delay)
                continue
            failures = 0
            self.connections += 1
            self._conn = proto
            if self._handler is not None:
                self._start_consumers(proto)
            for hook in self._hooks:
                self._run_hook(hook, proto)
            waiters, self._ready_waiters = self._ready_waiters, []
            for w in waiters:
                w.callback(None)
            await proto.lost
            self._conn = self._pub = self._proto = None
            if not self._stopping:
                _log.warn("AMQP connection lost; reconnecting")
        waiters, self._ready_waiters = self._ready_waiters, []
        for w in waiters:
            w.errback(NotPublished("RabbitQueue is closing"))

    async def _setup(self, proto: _AMQP) -> None:
        ch = await proto.channel()
        await ch.exchange_declare(self.names.dead_exchange, exchange_type="fanout", durable=True)
        await ch.queue_declare(self.names.dead_queue, durable=True)
        await ch.queue_bind(self.names.dead_queue, self.names.dead_exchange)
        for name in self.names.partitions:
            await ch.queue_declare(
                name,
                durable=True,
                arguments={
                    "x-dead-letter-exchange": self.names.dead_exchange,
                    "x-single-active-consumer": True,
                },
            )
        await ch.confirm_delivery()
        ch.on_closed.addCallback(self._channel_closed, proto, "publish")
        self._pub = ch

    def _channel_closed(self, reason: Any, proto: _AMQP, what: str) -> None:
        if not self._stopping and not proto.gone:
            _log.error("AMQP {what} channel closed: {reason}", what=what, reason=reason)
            proto.drop()

    # ------------------------------------------------------------------ consumers

    def _start_consumers(self, proto: _AMQP) -> None:
        if self._stopping or self._consuming_on is proto:
            return
        self._consuming_on = proto
        for name in self.names.partitions:
            d = Deferred.fromCoroutine(self._consume_queue(proto, name))
            self._loops.track(d)

    async def _consume_queue(self, proto: _AMQP, name: str) -> None:
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
            if self._consumers.get(name, (None,))[0] is ch:
                del self._consumers[name]
        if unexpected:
            proto.drop()  # the reconnect declares and consumes afresh

    async def _drain(self, ch: TwistedChannel, deliveries: Any) -> bool:
        """Handle deliveries until the consumer ends (False) or a handler fails (True).

        The jobs of the next delivery plus of those already received behind it (never
        waiting for more), while fewer than max_batch, go to the handler in batches of at
        most max_batch; then one basic_ack with multiple=True settles those deliveries."""
        assert self._handler is not None
        while not self._stopping:
            try:
                msgs = [await deliveries.get()]
            except Exception:
                return False  # consumer cancelled, channel or connection closed
            if len(deliveries.pending) < 8:  # a small batch so far: let it fill a little
                await self._pause(LINGER_S)
            jobs: list[PersistJob] = []
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
                    await maybeDeferred(self._handler, batch)
                except Exception:
                    # The deliveries go back whole: jobs of this batch's first delivery
                    # that were in an earlier, successful batch come again (idempotent).
                    _log.failure(
                        "persisting messages {first}..{last} failed; requeued in {delay} s",
                        first=batch[0].message.msg_id, last=batch[-1].message.msg_id,
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
        waiters, self._ready_waiters = self._ready_waiters, []
        for w in waiters:
            w.errback(NotPublished("RabbitQueue is closing"))
        consumers = list(self._consumers.values())
        cancels = [ch.basic_cancel(tag) for ch, tag, _ in consumers if ch.is_open]
        await _settle(cancels, self._reactor, CLOSE_STEP_TIMEOUT_S)
        for _, _, deliveries in consumers:  # in case a Basic.CancelOk never came
            if not deliveries.closed:
                deliveries.close(ConsumerCancelled())
        await self._loops.idle()
        await self._accepts.idle()
        if self._attempt is not None:
            self._attempt.cancel()
        proto = self._proto
        if proto is not None and not proto.gone:
            if proto.is_open:
                closed = proto.close()
                if closed is not None:
                    await _settle([closed], self._reactor, CLOSE_STEP_TIMEOUT_S)
            proto.drop()
            await proto.lost
        if self._runner is not None:
            await self._runner
        if self._own_redis:
            await self._redis.disconnect()


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d
