"""Live pushes across gateways: presence in Redis, routing over a RabbitMQ exchange.

Each gateway binds its own queue P.push.<gateway id> (exclusive, auto-delete, not durable) to
the direct exchange P.push with its gateway id as the routing key. To push a message, the
sending gateway writes to its own devices through its Hub, looks up the receivers' presence,
and publishes one message per other gateway holding one of their devices, carrying the
encoded PUSH frame once plus the list of target sessions.

Routed pushes are best effort, like every push (spec section 9): not persistent, no confirm,
dropped when the target gateway is gone (its queue went with its connection, so the exchange
has no binding) or holds no such session any more, and expired after ROUTED_TTL_MS in its
queue. Delivery is guaranteed by the offline inbox, which every device syncs on reconnect.
These per-gateway queues stay classic queues while the persist and notify queues are quorum
queues (amqp_jobs): a quorum queue cannot be exclusive, auto-delete or non-durable, and a
replicated copy of a push that is useless once its gateway has gone (its sessions went with
it) would cost a Raft round trip per push for nothing. On a RabbitMQ cluster the queue lives
on the node the gateway is connected to; losing that node drops the connection, and the
reconnect declares it afresh wherever the gateway lands.

A device that logs in on one gateway while it has a session on another replaces it: the new
gateway sends a kick, and the old one closes that session with CLOSE REPLACED.

A notification (READ_UPDATE, spec 18) is routed like a push, to every device of its users on
other gateways; the receiving gateway writes it to those whose connection enabled its feature.

`kick` (the server API: an operator closes a user's sessions) looks up the user's presence,
closes the sessions held here and sends a close to each other gateway holding one, which
closes those sessions with the given CLOSE reason (KICKED). Like a push it names the
sessions, so a newer session of the device (a login after the kick) stays open.

Body of a routed message (big-endian):
    u8 kind (1 push, 2 kick, 3 notify, 4 close) | u64 msg_id (0 for a kick; the feature for a
    notify; the CloseReason for a close) | u16 n | n x (u64 user | u8 len, device id | u8 len,
    session) | the frame (push, notify) or the CLOSE text in UTF-8 (close)
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import pika
from pika.adapters.twisted_connection import ClosableDeferredQueue, TwistedChannel

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from improto.enums import CloseReason
from improto.limits import MAX_TEXT
from improto_server.deferreds import as_deferred
from improto_server.hub import Hub, Pushable, kick_text
from improto_server.production.amqp_connection import AmqpProtocol
from improto_server.production.presence import Presence, gateway_of
from improto_server.production.rabbit_queue import RabbitQueue
from improto_server.reactor_types import server_reactor
from improto_server.turn_batcher import TurnBatcher

_log = Logger()

PUSH, KICK, NOTIFY, CLOSE = 1, 2, 3, 4
ROUTED_TTL_MS = 10_000  # a routed push older than this is useless: the device synced by then
ROUTED_MAX = 100_000  # messages a gateway's push queue holds at most (oldest dropped)
ROUTE_BATCH = 256  # pushes whose receivers one presence lookup covers at most

Target = tuple[int, str, str]  # user, device, session


def pack_routed(kind: int, msg_id: int, targets: list[Target], data: bytes = b"") -> bytes:
    parts = [struct.pack(">BQH", kind, msg_id, len(targets))]
    for user, device, session in targets:
        d, s = device.encode(), session.encode()
        parts.append(struct.pack(">QB", user, len(d)) + d + bytes((len(s),)) + s)
    parts.append(data)
    return b"".join(parts)


def unpack_routed(body: bytes) -> tuple[int, int, list[Target], bytes]:
    kind, msg_id, n = struct.unpack_from(">BQH", body)
    pos = 11
    targets: list[Target] = []
    for _ in range(n):
        user, dlen = struct.unpack_from(">QB", body, pos)
        pos += 9
        device = body[pos : pos + dlen].decode()
        pos += dlen
        slen = body[pos]
        session = body[pos + 1 : pos + 1 + slen].decode()
        pos += 1 + slen
        targets.append((user, device, session))
    if pos > len(body) or kind not in (PUSH, KICK, NOTIFY, CLOSE):
        raise ValueError("malformed routed message")
    return kind, msg_id, targets, body[pos:]


class AmqpPushRouter:
    """PushRouter over Presence (Redis) and the queue's AMQP connection."""

    def __init__(
        self,
        queue: RabbitQueue,
        presence: Presence,
        prefix: str,
        reactor: IReactorTime | None = None,
    ) -> None:
        self.exchange = f"{prefix}.push"
        self.gateway_id = presence.gateway_id
        self.queue_name = f"{prefix}.push.{self.gateway_id}"
        self._queue = queue
        self.presence = presence
        self._hub: Hub | None = None
        self._channel: TwistedChannel | None = None
        self.routed_out = 0  # messages published to other gateways
        # (kind, users, msg_id or feature, frame): the routes of one turn, one presence lookup
        self._routes: TurnBatcher[tuple[int, list[int], int, bytes], None] = TurnBatcher(
            reactor or server_reactor(), self._route_batch, ROUTE_BATCH
        )
        self.delivered_in = 0  # pushes written to local sessions from other gateways

    @property
    def node(self) -> int | None:
        return self.presence.node

    @as_deferred
    async def start(self, hub: Hub) -> None:
        self._hub = hub
        self.presence.on_revived = self._reannounce
        await self.presence.start()
        ready: Deferred[None] = Deferred()

        def set_up(_: None) -> None:
            if not ready.called:
                ready.callback(None)

        def connected(proto: AmqpProtocol) -> Deferred[None]:
            return self._setup(proto).addCallback(set_up)

        self._queue.on_connected(connected)
        await ready

    @as_deferred
    async def _setup(self, proto: AmqpProtocol) -> None:
        ch = await proto.channel()
        await ch.exchange_declare(self.exchange, exchange_type="direct", durable=True)
        await ch.queue_declare(
            self.queue_name,
            exclusive=True,
            auto_delete=True,
            arguments={"x-message-ttl": ROUTED_TTL_MS, "x-max-length": ROUTED_MAX},
        )
        await ch.queue_bind(self.queue_name, self.exchange, routing_key=self.gateway_id)
        deliveries, _tag = await ch.basic_consume(queue=self.queue_name, auto_ack=True)
        self._channel = ch
        self._receive(deliveries)

    @as_deferred
    async def _receive(self, deliveries: ClosableDeferredQueue) -> None:
        while True:
            try:
                msg = await deliveries.get()
            except Exception:
                return  # the channel or connection closed; a reconnect sets up again
            try:
                self._deliver(*unpack_routed(msg.body))
            except Exception:
                _log.failure("dropping a malformed routed push")

    def _deliver(self, kind: int, msg_id: int, targets: list[Target], data: bytes) -> None:
        assert self._hub is not None
        for user, device, session in targets:
            conn = self._hub.device(user, device)
            if conn is None or getattr(conn, "presence", None) != session:
                continue  # that session is gone (or replaced here): the inbox has it
            if kind == PUSH:
                conn.push(msg_id, data)
                self.delivered_in += 1
            elif kind == NOTIFY:
                conn.notify(data, msg_id)  # msg_id carries the feature
            elif kind == CLOSE:  # msg_id carries the reason
                conn.close(CloseReason(msg_id), data[:MAX_TEXT].decode(errors="ignore"))
            else:
                conn.close(CloseReason.REPLACED, f"device {device} logged in elsewhere")

    def close(self) -> Deferred[None]:
        return self.presence.close()

    # ------------------------------------------------------------- sessions

    def online(self, conn: Pushable) -> Deferred[None]:
        session = self.presence.new_session()
        conn.presence = session  # type: ignore[attr-defined]
        return self._claim(conn, session)

    @as_deferred
    async def _claim(self, conn: Pushable, session: str) -> None:
        old = await self.presence.claim(conn.user_id, conn.device_id, session)
        if old is not None and gateway_of(old) != self.gateway_id:
            self._publish(
                gateway_of(old), pack_routed(KICK, 0, [(conn.user_id, conn.device_id, old)])
            )

    def offline(self, conn: Pushable) -> Deferred[None]:
        session = getattr(conn, "presence", None)
        if not session:
            return succeed(None)
        return self.presence.release(conn.user_id, conn.device_id, session)

    def _reannounce(self) -> None:
        assert self._hub is not None
        for conn in self._hub.all():
            session = getattr(conn, "presence", None)
            if session:
                d = self.presence.claim(conn.user_id, conn.device_id, session)
                d.addErrback(lambda f: _log.failure("re-announcing a session failed", f))

    # ---------------------------------------------------------------- pushes

    def route(self, users: Iterable[int], msg_id: int, data: bytes) -> Deferred[None]:
        """Push to the users' devices held by other gateways (this one's own devices were
        written through the Hub already). The routes of one reactor turn share one presence
        lookup."""
        return self._routes.submit((PUSH, list(users), msg_id, data))

    def notify(self, users: Iterable[int], data: bytes, feature: int) -> Deferred[None]:
        """`data` (READ_UPDATE) to the users' devices held by other gateways, which write it
        to the connections that enabled `feature`."""
        return self._routes.submit((NOTIFY, list(users), feature, data))

    @as_deferred
    async def _route_batch(self, pushes: list[tuple[int, list[int], int, bytes]]) -> list[None]:
        found = await self.presence.lookup(u for _, users, _, _ in pushes for u in users)
        for kind, users, msg_id, data in pushes:
            by_gateway: dict[str, list[Target]] = {}
            for user in users:
                for device, session in found.get(user, {}).items():
                    gid = gateway_of(session)
                    if gid != self.gateway_id:
                        by_gateway.setdefault(gid, []).append((user, device, session))
            for gid, targets in by_gateway.items():
                self._publish(gid, pack_routed(kind, msg_id, targets, data))
        return [None] * len(pushes)

    def _publish(self, gateway_id: str, body: bytes) -> bool:
        """Send `body` to the gateway's queue; False if it could not be handed over."""
        ch = self._channel
        if ch is None or not ch.is_open:
            return False  # best effort: the receivers sync from their inboxes
        try:
            ch.basic_publish(
                self.exchange, gateway_id, body,
                pika.BasicProperties(delivery_mode=pika.DeliveryMode.Transient),
            )  # fmt: skip
        except Exception:
            _log.failure("routing a push to gateway {gid} failed", gid=gateway_id)
            return False
        self.routed_out += 1
        return True

    # ------------------------------------------------------- presence, kicks

    @as_deferred
    async def online_devices(self, user_ids: Sequence[int]) -> dict[int, set[str]]:
        """Presence, plus this gateway's own devices (their claims may still be on the way)."""
        assert self._hub is not None
        found = await self.presence.lookup(user_ids)
        out = {user: set(devices) for user, devices in found.items() if devices}
        for user, devices in self._hub.online_devices(user_ids).items():
            out.setdefault(user, set()).update(devices)
        return out

    @as_deferred
    async def kick(self, user_id: int, device_id: str | None, reason: int) -> int:
        """Close the sessions of the device (None: of every device of the user): those held
        here at once, those of other gateways by a routed close. Counts the sessions closed
        here plus those a close was sent for (a gateway that died a moment ago, not yet
        cleaned from presence, is counted but closes nothing: its sessions are gone too)."""
        assert self._hub is not None
        why = CloseReason(reason)
        found = (await self.presence.lookup([user_id])).get(user_id, {})
        by_gateway: dict[str, list[Target]] = {}
        for device, session in found.items():
            gid = gateway_of(session)
            if gid != self.gateway_id and device_id in (None, device):
                by_gateway.setdefault(gid, []).append((user_id, device, session))
        text = kick_text(why).encode()
        sent = sum(
            len(targets)
            for gid, targets in by_gateway.items()
            if self._publish(gid, pack_routed(CLOSE, why, targets, text))
        )
        return sent + self._hub.kick(user_id, device_id, why)
