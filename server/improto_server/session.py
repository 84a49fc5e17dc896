"""One client connection: framing, the session state machine, timers and flow control.

UNAUTHENTICATED --HELLO ok--> AUTHENTICATED --> closed (PROTOCOL.md section 8). Requests are
handed to ChatService; this module only speaks frames.

Memory per connection is bounded whatever the peer does (PROTOCOL.md 9.3, 16). The session is
a push producer registered with its transport: when the transport says its buffer is full,
the queued bytes are watched; above `output_high_water_bytes` pushes stop (the inbox keeps
them: SYNC_HINT once drained) and requests are no longer read; above
`output_hard_limit_bytes`, or above the high-water mark for `slow_reader_timeout_s`, the
connection is dropped. At most `max_requests_in_flight` requests await their reply: frames
after that wait, and reading stops, until one finishes. Before HELLO_OK a frame may be no
longer than the largest HELLO.

One peer cannot hold the one reactor thread for long (fair reading): a connection serves at
most `FRAMES_PER_TURN` frames, about `BYTES_PER_TURN` bytes, per reactor turn
(`PRELOGIN_FRAMES_PER_TURN` before HELLO_OK, and then no more than `PRELOGIN_BURST` at once
and `PRELOGIN_RATE` per second); the rest of
what it read waits, its transport paused, until the next turn, so the other connections'
frames are served in between. A request refused RATE_LIMITED pauses reading for its
retry-after (at most `MAX_RATE_HOLD_S`): a pipelining flooder costs one refusal per pause.
Nothing is refused or reordered for any of this: frames wait, in order.

Post-v1 features (PROTOCOL.md sections 18, 19) are enabled per connection with FEATURES after
HELLO_OK; until then the connection is exactly a version-1 one: the post-v1 request types are
UNKNOWN_FRAME_TYPE, checked on the header's type before the body, as for any unknown type.
With a device store, HELLO reads the user's revocation time before the login goes on (spec
8.2): a token issued before it is refused.
What the inbox holds beyond the connection's last page is followed by an InboxFollower
(wire-once notices, the login watch), made on first use.

With notifications on (SessionFactory.ack_wait_s, push_ack_wait_s), a PUSH still
unacknowledged that long means the app may be suspended (the OS keeps its socket, the app reads
nothing): the service is asked to notify the device as if offline (spec 19.4), once per stall,
with the newest pushed message.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto import records
from improto.codec import FrameReader, check_header, decode_payload, encode
from improto.enums import (
    POST_V1_REQUESTS,
    REQUEST_FEATURES,
    CloseReason,
    ContentType,
    Feature,
    FrameType,
)
from improto.errors import ErrorCode, FrameTooLarge, ProtocolError, UnknownFrameType
from improto.frames import (
    Close,
    Error,
    Features,
    FeaturesOk,
    Frame,
    Hello,
    HelloOk,
    OfflinePull,
    Ping,
    Pong,
    PushAck,
    Send,
    SendAck,
    SyncHint,
    TimelineHeadsPage,
)
from improto.limits import HEADER_SIZE, LENGTH_PREFIX_SIZE, MAX_FRAME_LENGTH, MAX_HELLO_FRAME
from improto.tokens import Identity, TokenError, verify
from improto_server import metrics
from improto_server.admission import Admission
from improto_server.config import Config
from improto_server.deadlines import Deadlines
from improto_server.eager_write import eagerly_writable, write_eagerly
from improto_server.hub import Hub, LocalRouter
from improto_server.inbox_follower import LOGIN_WATCH_S, InboxFollower
from improto_server.ports import InboxStore, PushRouter
from improto_server.service import Caller, ChatService, RequestError
from improto_server.timeline_watch import TimelineWatch
from improto_server.transport_buffer import abort_transport, queued_bytes

log = Logger()

_SYNC_HINT = encode(SyncHint())

# Fair reading. One reactor thread serves every connection, and one read brings up to 64 KiB:
# ~6,000 PINGs or ~500 small SENDs, tens of milliseconds of decoding and replies that every
# other connection would wait behind. So a connection serves at most this many frames per
# reactor turn; the rest waits (reading paused) for the next turn (callLater(0): the timed
# calls run after every ready connection's read of this turn). 32 covers a normal client's
# pipelines (a reconnect's pulls, a burst of PUSH_ACKs) in a few turns at ~0.5 ms each.
FRAMES_PER_TURN = 32
# ...and frames of at most this many bytes in all (the one that crosses it is served): 32
# frames of 64 KiB are tens of milliseconds of decoding, storing and pushing.
BYTES_PER_TURN = 256 * 1024
# Page requests and group requests awaiting their reply per connection before reading
# pauses: a page builds up to 128 KiB from storage, a group change is a write transaction
# (and a listing reads up to 500 rows), and a client's sync loop needs one at a time
# (history paging of several conversations, two). Every client's store calls share one
# queue (embedded: one database thread), so a pipelining peer would put its whole window
# of them ahead of everyone else's next SEND.
MAX_PULLS_IN_FLIGHT = 2
_PAGE_REQUESTS = frozenset(
    {
        FrameType.OFFLINE_PULL, FrameType.HISTORY_PULL, FrameType.CONV_LIST,
        FrameType.CONV_CHANGES, FrameType.TIMELINE_HEADS, FrameType.TIMELINE_PULL,
        FrameType.GROUP_CREATE, FrameType.GROUP_ADD, FrameType.GROUP_REMOVE,
        FrameType.GROUP_MEMBERS, FrameType.MY_GROUPS,
    }
)  # fmt: skip
# Before HELLO_OK a client sends a HELLO and perhaps a PING or a few requests (spec 8.1:
# PONG, NOT_AUTHENTICATED): fewer frames per turn, and a budget of PRELOGIN_BURST frames at
# once refilled at PRELOGIN_RATE per second (GCRA in one float, `_budget_at`). Past it the
# frames wait and reading pauses until the budget has one again; none is refused.
PRELOGIN_FRAMES_PER_TURN = 4
PRELOGIN_BURST = 16
PRELOGIN_RATE = 4.0  # frames per second
# A request refused RATE_LIMITED (spec 9.4) pauses reading that connection for its
# retry-after, at most this long: the client may not retry sooner anyway, and a pipelining
# flooder costs one refusal per pause instead of one per frame it manages to write.
MAX_RATE_HOLD_S = 1.0

# Requests answered by ChatService, by the name of the method that answers them (SEND:
# `send_now`, dispatched on its own, with its reply).
_HANDLERS: dict[FrameType, str] = {
    FrameType.OFFLINE_PULL: "offline_pull",
    FrameType.OFFLINE_ACK: "offline_ack",
    FrameType.HISTORY_PULL: "history_pull",
    FrameType.GROUP_CREATE: "group_create",
    FrameType.GROUP_ADD: "group_add",
    FrameType.GROUP_REMOVE: "group_remove",
    FrameType.GROUP_MEMBERS: "group_members",
    FrameType.MY_GROUPS: "my_groups",
}
# Post-v1 requests (CONVERSATIONS), answered by the service's ConversationService.
_CONV_HANDLERS: dict[FrameType, str] = {
    FrameType.CONV_LIST: "conv_list",
    FrameType.CONV_CHANGES: "conv_changes",
    FrameType.READ_MARK: "read_mark",
    FrameType.CONV_HIDE: "conv_hide",
}
# Post-v1 requests (PUSH), answered by the service's PushService.
_PUSH_HANDLERS: dict[FrameType, str] = {
    FrameType.PUSH_REGISTER: "register",
    FrameType.PUSH_UNREGISTER: "unregister",
}
# Post-v1 requests (LARGE_GROUPS), answered by the service's TimelineService.
_TIMELINE_HANDLERS: dict[FrameType, str] = {
    FrameType.TIMELINE_HEADS: "heads",
    FrameType.TIMELINE_PULL: "pull",
}
# Server-to-client types added after version 1: a connection without features gets the
# version-1 answer for them (unknown type), one with features the server-to-client one.
_POST_V1_REPLIES = frozenset(
    {
        FrameType.FEATURES_OK, FrameType.CONV_PAGE, FrameType.CONV_CHANGES_PAGE,
        FrameType.READ_MARK_OK, FrameType.CONV_HIDE_OK, FrameType.INBOX_NOTICE,
        FrameType.READ_UPDATE, FrameType.PUSH_REGISTER_OK, FrameType.PUSH_UNREGISTER_OK,
        FrameType.TIMELINE_HEADS_PAGE, FrameType.TIMELINE_PAGE,
    }
)  # fmt: skip
_CONVERSATIONS = 1 << Feature.CONVERSATIONS
# OFFLINE_PAGE frame bytes (length prefix included): the cursor u64 and has_more u8
_PAGE_CURSOR = slice(11, 19)
_PAGE_HAS_MORE = 19
# PUSH frame bytes before its MESSAGE record (records: the record is the PUSH body)
_PUSH_RECORD = LENGTH_PREFIX_SIZE + HEADER_SIZE


def feature_bits(features: tuple[int, ...]) -> int:
    """A connection's feature set as a bitmask (bit n: feature n)."""
    bits = 0
    for n in features:
        bits |= 1 << n
    return bits


class Session(Protocol):
    # Memory per idle connection (bench/idle.py): slots, containers made on first use, and one
    # deadline for the login, the idle timeout, the token expiry and a stalled output together,
    # kept in the factory's Deadlines instead of a DelayedCall per timer.
    __slots__ = (
        "_ack_noticed",
        "_ack_watch",
        "_addr",
        "_authing",
        "_budget_at",
        "_eager",
        "_early",
        "_early_bytes",
        "_expires_at",
        "_in_flight",
        "_last_push",
        "_last_rx",
        "_login_id",
        "_mstate",
        "_pending",
        "_prelogin",
        "_pulls",
        "_rx_paused",
        "_serving",
        "_since",
        "_since_pause",
        "_stalled_since",
        "_timeline_watch",
        "_tx_paused",
        "_wake",
        "caller",
        "closing",
        "connected",
        "deadline",
        "device_id",
        "factory",
        "features",
        "follower",
        "hint_pending",
        "presence",
        "reader",
        "registered",
        "transport",
        "unacked",
        "user_id",
    )

    def __init__(self, factory: SessionFactory) -> None:
        self.factory = factory
        self.transport: ITransport | None = None  # set by makeConnection (slots hide
        # Protocol's defaults)
        self.connected = 0
        self.reader = FrameReader(MAX_HELLO_FRAME)  # MAX_FRAME_LENGTH once logged in
        self.user_id = 0
        self.device_id = ""
        self.caller: Caller | None = None
        self.presence = ""  # this session's presence value (set by the push router)
        self.registered = False  # in the hub (from a valid HELLO until the connection ends)
        self._authing = False  # a valid HELLO's revocation check is under way
        self._early: list[tuple[int, bytes]] | None = None  # pushes that came before HELLO_OK
        self._early_bytes = 0
        self.closing = False
        # msg_id -> when it was pushed (0.0 without the ack trigger), not yet acknowledged;
        # insertion order is push order
        self.unacked: dict[int, float] | None = None
        # The ack trigger: pushes sent up to _ack_noticed are covered by a notice already;
        # _ack_watch is the send time of the oldest unacknowledged push after them (None: no
        # watch); _last_push the newest PUSH frame written while a watch is on (the notice's
        # message: the frame every receiver shares, not a copy).
        self._ack_noticed = -math.inf
        self._ack_watch: float | None = None
        self._last_push: bytes | None = None
        self.hint_pending = False
        self._eager = False  # plain TCP: frames are sent at once when nothing is queued
        self._last_rx = 0.0  # when the last whole frame arrived
        # when the connection was made (the login deadline counts from it); once logged in,
        # when HELLO_OK went out (the login watch counts from it); 0.0 once that watch is over
        self._since = 0.0
        self._timeline_watch: TimelineWatch | None = None  # made on first use (20.6)
        self._login_id = 0  # a msg_id taken at HELLO_OK (the inbox follower)
        self._addr: str | None = None  # the peer's host, counted in the factory's caps
        self._prelogin = False  # counted among the address's connections not logged in
        self._in_flight = 0  # requests awaiting their reply
        self._pulls = 0  # of them, page and group requests (_PAGE_REQUESTS)
        self._pending: deque[bytes | FrameTooLarge] | None = None  # read, not yet served
        self._serving = False  # serving frames now (a reply finishing does not serve more)
        self._rx_paused = False  # transport.pauseProducing() called: not reading
        self._tx_paused = False  # the transport said its buffer is full (pauseProducing)
        self._since_pause = 0  # bytes written since then (the count where it tells none)
        self._stalled_since: float | None = None  # queued output above the high-water mark
        self._expires_at: float | None = None  # the token's expiry, once logged in
        self.deadline: float | None = None  # when the timer calls deadline_due (Deadlines)
        # reading held until the next turn or a retry-after: the call that resumes it
        self._wake: IDelayedCall | None = None
        self._budget_at = 0.0  # before HELLO_OK: when the frame budget is whole again
        self.features = 0  # enabled post-v1 features, bit n for Feature n (FEATURES)
        self.follower: InboxFollower | None = None  # made on first use (_follower)
        self._mstate: str | None = None  # the state counted in metrics.connection_state

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:  # not connected yet or any more: nothing to write to
            return
        metrics.frame_out(data[5])  # after the length prefix and the version
        if self._eager:
            write_eagerly(transport, data)  # whatever the socket does not take is queued
        else:
            transport.write(data)
        if self._tx_paused:  # the transport's buffer is full: watch what it holds
            self._since_pause += len(data)
            self._check_output()

    @property
    def clock(self) -> IReactorTime:
        return self.factory.clock

    # ------------------------------------------------------------ connection

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        self._eager = eagerly_writable(transport)  # frames leave now, not next turn
        self._last_rx = self._since = self.clock.seconds()
        peer = transport.getPeer()
        if isinstance(peer, IPv4Address | IPv6Address):  # unix sockets: no address to cap
            if not self.factory.admission.admit(peer.host):
                self.closing = True  # refused: nothing was read, nothing is sent
                abort_transport(transport)
                return
            self._addr, self._prelogin = peer.host, True
        self._count_state("prelogin")
        # IConsumer: pauseProducing when its buffer is full, resumeProducing once drained
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        # PINGs keep a connection alive but do not log it in: HELLO must succeed in time too.
        # Until it does, the deadline is that login deadline (no frame can come due earlier).
        self.factory.deadlines.set(self, self._login_at())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._count_state(None)
        self.closing = True
        self._cancel_deadline()
        wake, self._wake = self._wake, None
        if wake is not None and wake.active():
            wake.cancel()  # the reactor's reference to this session goes with it
        self._gone()
        self._uncount()
        follower, self.follower = self.follower, None
        if follower is not None:
            follower.close()  # its timer goes with it
        watch, self._timeline_watch = self._timeline_watch, None
        if watch is not None:
            watch.close()
        # Let go of everything at once: a request still running may hold this session a
        # little longer, and nothing must keep the unsent bytes (the transport's buffer),
        # the push window or the frames read but not served. Caller.connection is this
        # session: dropping the caller breaks that cycle, so reference counting frees it.
        self.transport = None
        self.caller = None
        self.unacked = None
        self._ack_watch = self._last_push = None
        self._early = None
        self._pending = None
        self.reader = _CLOSED_READER

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        items: list[bytes | FrameTooLarge]
        try:
            payloads = self.reader.feed(data)
            items = list(payloads)
        except FrameTooLarge as e:  # serve the whole frames that came before it, then refuse
            payloads = e.frames
            items = [*payloads, e]
        if payloads:  # the timer reads this when it fires: no reschedule per frame
            self._last_rx = self.clock.seconds()
        if not items:
            return
        if self._pending:  # reading is paused; what a read brought waits its turn
            self._pending.extend(items)
            return
        self._serve(deque(items))

    def _serve(self, items: deque[bytes | FrameTooLarge]) -> None:
        """Serve frames from the left of `items`, in order, until none is left, the session
        closes, reading is blocked, or this turn's share is served; the rest wait in
        `_pending` (no more than one read brought: reading is paused meanwhile)."""
        self._serving = True
        try:
            served = spent = 0
            share = FRAMES_PER_TURN if self.caller is not None else PRELOGIN_FRAMES_PER_TURN
            while items:
                if self.closing:
                    return
                if self._rx_blocked():
                    break
                if served >= share or spent >= BYTES_PER_TURN:
                    self._hold(0.0)  # the rest next turn: other connections' frames first
                    break
                if self.caller is None and (wait := self._prelogin_wait()) > 0.0:
                    self._hold(wait)
                    break
                item = items.popleft()
                served += 1
                if isinstance(item, FrameTooLarge):
                    self._fatal(item.code, str(item), 0)
                    return
                spent += len(item)
                self._frame_received(item)
        finally:
            self._serving = False
        if items and not self.closing:
            self._pending = items

    def _prelogin_wait(self) -> float:
        """Before HELLO_OK: take one frame from the budget and return 0.0, or return the
        seconds until the budget has one (taking nothing)."""
        now = self.clock.seconds()
        full_at = max(self._budget_at, now)
        wait = full_at - now - (PRELOGIN_BURST - 1) / PRELOGIN_RATE
        if wait > 0.0:
            return wait
        self._budget_at = full_at + 1.0 / PRELOGIN_RATE
        return 0.0

    def _rx_blocked(self) -> bool:
        return (
            self._stalled_since is not None
            or self._wake is not None
            or self._in_flight >= self.factory.config.max_requests_in_flight
            or self._pulls >= MAX_PULLS_IN_FLIGHT
        )

    def _update_reading(self) -> None:
        """Serve the frames that waited once allowed, then pause or resume reading: paused
        while blocked or while frames wait (no more is read than one read brought)."""
        if self.closing or self.transport is None:
            return
        if self._pending and not self._serving and not self._rx_blocked():
            pending, self._pending = self._pending, None
            self._serve(pending)
        transport = self.transport
        if self.closing or transport is None:
            return
        paused = self._rx_blocked() or bool(self._pending)
        if paused != self._rx_paused:
            self._rx_paused = paused
            if paused:
                transport.pauseProducing()  # type: ignore[attr-defined]
            else:
                transport.resumeProducing()  # type: ignore[attr-defined]

    def _hold(self, seconds: float) -> None:
        """Serve and read nothing more for `seconds` (0.0: until the next reactor turn).
        One pending call per session at most: the later wake-up wins."""
        if self.closing:
            return
        clock = self.clock
        wake = self._wake
        if wake is not None:
            if wake.getTime() >= clock.seconds() + seconds:
                return  # held at least that long already
            wake.cancel()
        self._wake = clock.callLater(seconds, self._woken)
        self._update_reading()

    def _woken(self) -> None:
        self._wake = None
        self._update_reading()

    def _frame_received(self, payload: bytes) -> None:
        metrics.frame_in(payload[1] if len(payload) > 1 else -1)  # -1: too short for a type
        # PUSH_ACK, one per delivered message, is read without the codec. Anything unusual
        # (not logged in, msg_id 0, not a PUSH_ACK) takes the full path.
        if self.caller is not None and (msg_id := records.push_ack_msg_id(payload)):
            self._push_acked(msg_id)
            return
        try:
            cls, request_id = check_header(payload)
            if cls.TYPE in POST_V1_REQUESTS or cls.TYPE in _POST_V1_REPLIES:
                self._check_enabled(cls.TYPE, request_id)
            if not cls.TYPE.client_to_server:  # spec 13.2: the type is checked before the body
                self.send(Error(ErrorCode.UNKNOWN_FRAME_TYPE, "server-to-client frame type",
                                request_id=request_id))  # fmt: skip
                return
            frame = decode_payload(payload)
        except ProtocolError as e:
            rid = e.request_id or 0
            log.info("bad frame from {peer}: {error}", peer=self._peer(), error=e)
            if e.fatal:
                self._fatal(e.code, e.message, rid)
            else:
                self.send(Error(e.code, e.message[:1024], request_id=rid))
            return
        self._dispatch(frame)

    def _check_enabled(self, kind: FrameType, request_id: int) -> None:
        """A post-v1 type on a connection that has not enabled it is an unknown type, with
        the very error a version-1 server sends (a request: its feature; a server-to-client
        type: any feature)."""
        feature = REQUEST_FEATURES.get(kind)
        enabled = self.features if feature is None else self.features >> feature & 1
        if not enabled:
            raise UnknownFrameType(f"unknown frame type 0x{kind:02x}", request_id)

    # -------------------------------------------------------------- dispatch

    def _dispatch(self, f: Frame) -> None:
        if isinstance(f, Ping):
            self.send(Pong(self._now_ms(), request_id=f.request_id))
        elif isinstance(f, Hello):
            self._hello(f)
        elif self.caller is None:
            self.send(Error(ErrorCode.NOT_AUTHENTICATED, "send HELLO first",
                            request_id=f.request_id))  # fmt: skip
        elif isinstance(f, PushAck):
            self._push_acked(f.msg_id)
        elif isinstance(f, Features):
            self._negotiate(f)
        elif isinstance(f, OfflinePull):
            follower = self._follower()
            if follower is not None:
                follower.pull_started()
            work = self.factory.service.offline_pull(
                self.caller, f, read_positions=bool(self.features & _CONVERSATIONS)
            )
            self._run(f.request_id, work, True, self._paged, self._page_failed)
        elif f.TYPE in _CONV_HANDLERS:
            method = getattr(self.factory.service.convs, _CONV_HANDLERS[f.TYPE])
            self._run(f.request_id, method(self.caller, f), f.TYPE in _PAGE_REQUESTS)
        elif f.TYPE in _TIMELINE_HANDLERS:
            method = getattr(self.factory.service.timelines, _TIMELINE_HANDLERS[f.TYPE])
            heads = f.TYPE is FrameType.TIMELINE_HEADS
            self._run(f.request_id, method(self.caller, f), True,
                      self._heads_answered if heads else None)  # fmt: skip
        elif f.TYPE in _PUSH_HANDLERS:
            method = getattr(self.factory.service.push, _PUSH_HANDLERS[f.TYPE])
            self._run(f.request_id, method(self.caller, f))
        elif isinstance(f, Send):  # a Deferred chain, no coroutine, in the common case
            self._run(
                f.request_id, self.factory.service.send_now(self.caller, f), False, self._sent
            )
        else:
            method = getattr(self.factory.service, _HANDLERS[f.TYPE])
            self._run(f.request_id, method(self.caller, f), f.TYPE in _PAGE_REQUESTS)

    def _run(
        self,
        request_id: int,
        work: Coroutine[Any, Any, Any] | Deferred[Any],
        pull: bool = False,
        reply: Callable[[Any], None] | None = None,
        failed: Callable[[Failure, int], None] | None = None,
    ) -> None:
        self._in_flight += 1
        self._pulls += pull
        d = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
        d.addCallbacks(reply or self.send, failed or self._request_failed,
                       errbackArgs=(request_id,))  # fmt: skip
        d.addBoth(self._pull_done if pull else self._request_done)
        if self._rx_blocked():
            self._update_reading()  # a cap: read no more until one finishes

    def _sent(self, ack: SendAck) -> None:
        self.send(ack)
        follower = self._follower()
        if follower is not None:
            follower.sent(ack.msg_id)

    def _heads_answered(self, page: bytes) -> None:
        """A TIMELINE_HEADS_PAGE: sent; in the login watch, its heads are watched (20.6)."""
        self.send(page)
        if not self._since or self.closing or self.caller is None:
            return
        if self.clock.seconds() >= self._since + LOGIN_WATCH_S:
            return
        watch = self._timeline_watch
        if watch is None:
            timelines = self.factory.service.timelines
            assert timelines is not None
            user = self.caller.user_id
            watch = self._timeline_watch = TimelineWatch(
                self._timeline_hint, timelines.store,
                lambda: Deferred.fromCoroutine(timelines.heads_of(user)), self.clock,
                login_id=self._login_id, until=self._since + LOGIN_WATCH_S,
            )  # fmt: skip
        answer = decode_payload(page[4:])
        assert isinstance(answer, TimelineHeadsPage)
        watch.answered({h.group_id: h.done for h in answer.heads})

    def _timeline_hint(self) -> None:
        follower = self.follower
        if follower is not None:
            follower.hinted()  # the client's sync loop pages the inbox again too
        self.sync_hint()

    def _paged(self, page: bytes) -> None:
        self.send(page)
        follower = self.follower
        if follower is not None:
            cursor = int.from_bytes(page[_PAGE_CURSOR], "big")
            follower.pull_ended(cursor, bool(page[_PAGE_HAS_MORE]))

    def _page_failed(self, failure: Failure, request_id: int) -> None:
        self._request_failed(failure, request_id)
        follower = self.follower
        if follower is not None:
            follower.pull_ended(None)

    def _pull_done(self, result: object) -> None:
        self._pulls -= 1
        self._request_done(result)

    def _request_done(self, result: object) -> None:
        if isinstance(result, Failure):
            log.failure("writing the reply failed", result)
        self._in_flight -= 1
        if self._rx_paused or self._pending:
            self._update_reading()

    def _request_failed(self, failure: Failure, request_id: int) -> None:
        err = failure.value
        if isinstance(err, RequestError):
            self.send(Error(err.code, err.text[:1024], request_id=request_id))
            if err.code == ErrorCode.RATE_LIMITED and err.retry_after_s > 0.0:
                # the peer may not retry sooner: read its next frames no sooner either
                self._hold(min(err.retry_after_s, MAX_RATE_HOLD_S))
        else:
            log.failure("request {rid} failed", failure, rid=request_id)
            self.send(Error(ErrorCode.INTERNAL, "internal error", request_id=request_id))

    # ------------------------------------------------------------------ auth

    def _hello(self, f: Hello) -> None:
        if self.caller is not None or self.registered or self._authing:
            self.send(Error(ErrorCode.ALREADY_AUTHENTICATED, "already logged in",
                            request_id=f.request_id))  # fmt: skip
            return
        try:
            ident = verify(self.factory.secret, f.token, f.device_id, now=self.clock.seconds())
        except TokenError as e:
            code = ErrorCode.TOKEN_EXPIRED if e.expired else ErrorCode.AUTH_FAILED
            log.info("login refused from {peer}: {why}", peer=self._peer(), why=e)
            self._fatal(code, str(e), f.request_id)
            return
        devices = getattr(self.factory.service, "devices", None)  # None: no revocations
        if devices is None:
            self._admit(f, ident)
            return
        # Before the hub: a revoked token must not replace the device's live connection.
        self._authing = True
        d = maybeDeferred(devices.revoked_before, ident.user_id)
        d.addCallbacks(self._revocation_read, self._revocation_failed,
                       callbackArgs=(f, ident), errbackArgs=(f,))  # fmt: skip
        d.addErrback(lambda e: log.failure("login of {peer} failed", e, peer=self._peer()))

    def _revocation_read(self, before_ms: int, f: Hello, ident: Identity) -> None:
        self._authing = False
        if self.closing:
            return
        # iat has whole seconds: a token without one counts as issued before any revocation
        issued = ident.issued_at
        if before_ms > 0 and (issued is None or issued * 1000 < before_ms):
            log.info("login refused from {peer}: token of user {user} revoked",
                     peer=self._peer(), user=ident.user_id)  # fmt: skip
            self._fatal(ErrorCode.AUTH_FAILED, "token revoked", f.request_id)
            return
        self._admit(f, ident)

    def _revocation_failed(self, failure: Failure, f: Hello) -> None:
        """The store is down: not fatal (spec 8.2), the client retries the HELLO later."""
        self._authing = False
        if self.closing:
            return
        log.failure("reading the revocations of {peer} failed", failure, peer=self._peer())
        self.send(Error(ErrorCode.UNAVAILABLE, "storage unavailable; retry",
                        request_id=f.request_id))  # fmt: skip

    def _admit(self, f: Hello, ident: Identity) -> None:
        """A HELLO whose token is good: the device cap, then the hub and the presence map."""
        hub, most = self.factory.hub, self.factory.config.max_devices_per_user
        if hub.device(ident.user_id, ident.device_id) is None and (
            hub.device_count(ident.user_id) >= most
        ):  # not fatal (spec 8.3): a HELLO may succeed once one of them has gone
            log.info("login refused from {peer}: user {user} has {n} devices online",
                     peer=self._peer(), user=ident.user_id, n=most)  # fmt: skip
            self.send(Error(ErrorCode.LIMIT_EXCEEDED, f"{most} devices online already",
                            request_id=f.request_id))  # fmt: skip
            return
        self.user_id, self.device_id = ident.user_id, ident.device_id
        old = self.factory.hub.register(self)
        self.registered = True
        if old is not None and isinstance(old, Session):
            old.close(CloseReason.REPLACED, f"device {self.device_id} logged in again")
        # HELLO_OK only once the presence map names this session (at once with one gateway):
        # a message accepted after HELLO_OK is then pushed here from any gateway.
        d = self.factory.router.online(self)
        d.addErrback(lambda e: log.failure("announcing {peer} failed", e, peer=self._peer()))
        d.addCallback(lambda _: self._logged_in(f, ident))

    def _logged_in(self, f: Hello, ident: Identity) -> None:
        if self.closing:  # gone while its presence was written: withdraw it again
            d = self.factory.router.offline(self)
            d.addErrback(lambda e: log.failure("withdrawing presence failed", e))
            return
        config = self.factory.config
        self.caller = Caller(ident.user_id, ident.device_id, self)
        self._expires_at = ident.expires_at
        self.reader.max_length = MAX_FRAME_LENGTH
        self._budget_at = 0.0  # no budget once logged in (and no float kept per connection)
        if self._prelogin:
            self._prelogin = False
            self.factory.admission.logged_in(self._addr)
        self._count_state("online")
        now = self.clock.seconds()
        self._since = now  # the login watch counts from HELLO_OK
        # messages with a higher id were accepted after this login: they are pushed here
        ids = getattr(self.factory.service, "ids", None)  # None: session tests, no service
        self._login_id = ids.next()[0] if ids is not None else 0
        self._rearm(now)  # the login deadline is over: idle and expiry now
        ok = HelloOk(
            ident.user_id,
            self._now_ms(),
            config.heartbeat,
            config.idle_timeout,
            MAX_FRAME_LENGTH,
            request_id=f.request_id,
        )
        self.send(ok)
        early, self._early = self._early, None
        for msg_id, data in early or ():  # pushed while the login was being announced
            self.push(msg_id, data)

    # ----------------------------------------------------------------- pushes

    def push(self, msg_id: int, data: bytes) -> None:
        if self.closing:
            return
        if self.caller is None:  # no PUSH before HELLO_OK: kept until it is sent
            config = self.factory.config
            if self._early is None:
                self._early = []
            if (
                len(self._early) < config.max_unacked_pushes
                and self._early_bytes + len(data) <= config.output_high_water_bytes
            ):
                self._early.append((msg_id, data))
                self._early_bytes += len(data)
            else:
                self.hint_pending = True
            return
        unacked = self.unacked
        if unacked is None:
            unacked = self.unacked = {}
        if (
            len(unacked) >= self.factory.config.max_unacked_pushes
            or self._stalled_since is not None
        ):  # the message waits in the inbox: hint once acks resume and the output drained
            if not self.hint_pending:
                metrics.push_window_stall()
            self.hint_pending = True
            return
        self._pushed(unacked, msg_id, data)

    def push_missing(self, msg_id: int, data: bytes) -> bool:
        """A PUSH from the inbox for the follower (a message this connection never got):
        written if the window has room and the output flows, else nothing (False)."""
        unacked = self.unacked
        if unacked is None:
            unacked = self.unacked = {}
        if (
            self.closing
            or self.caller is None
            or self._stalled_since is not None
            or len(unacked) >= self.factory.config.max_unacked_pushes
        ):
            return False
        self._pushed(unacked, msg_id, data)
        return True

    def _pushed(self, unacked: dict[int, float], msg_id: int, data: bytes) -> None:
        """Into the push window, then out. With the ack trigger on, the send time (the one
        clock read per push) and the frame are kept, and a watch starts if none is on."""
        factory = self.factory
        wait = factory.ack_wait_s
        if wait:
            now = self.clock.seconds()
            unacked[msg_id] = now
            # Only a message that notifies the user may be the notice's (not their own from
            # another device, nor a group event): an older one stays the newest such. Every
            # receiver of a message is pushed the same bytes: read once per message.
            if data is not factory.last_frame:
                sender, ctype = records.sender_and_type(data, _PUSH_RECORD)
                factory.last_frame = data
                factory.last_notifier = 0 if ctype == ContentType.GROUP_EVENT else sender
            if factory.last_notifier not in (0, self.user_id):
                self._last_push = data
            if self._ack_watch is None:
                self._ack_watch = now
                self._arm(now + wait)
        else:
            unacked[msg_id] = 0.0
        self._write(data)

    def _ack_overdue(self, now: float) -> None:
        """The watched push was sent push_ack_wait_s ago. If a push since the last notice is
        that old and still unacknowledged, ask for a notification of the newest push, which
        covers every push so far; then watch the oldest unacknowledged push after those.
        Pushes acknowledged in the meantime need no bookkeeping of their own (no work per
        PUSH_ACK): they are simply no longer in the window this scan reads."""
        wait, noticed = self.factory.ack_wait_s, self._ack_noticed
        overdue, newest, watch = False, noticed, None
        for t in (self.unacked or {}).values():  # at most max_unacked_pushes
            if t > noticed:
                # as deadline_due compares (not t <= now - wait): the watched push, due there,
                # is due here too, whatever the rounding, so no due deadline is set again
                overdue = overdue or t + wait <= now
                newest = max(newest, t)
                watch = t if watch is None else min(watch, t)
        data = self._last_push
        if overdue:
            self._ack_noticed, watch = newest, None
            if data is not None:
                record = data[_PUSH_RECORD:]
                self.factory.service.ack_overdue(self.user_id, self.device_id, record)
        self._ack_watch = watch
        if watch is None:
            self._last_push = None  # the next watch starts with a newer push

    def _push_acked(self, msg_id: int) -> None:
        unacked = self.unacked
        if unacked is None:
            return  # nothing pushed since login: no window to reopen
        if msg_id in unacked:
            del unacked[msg_id]
            follower = self._follower()
            if follower is not None:
                follower.acked(msg_id)
        if self.hint_pending:
            self._maybe_hint()

    def _maybe_hint(self) -> None:
        """SYNC_HINT for the pushes skipped, once the window has room and output flows."""
        unacked = self.unacked
        if (
            self.hint_pending
            and self.caller is not None
            and self._stalled_since is None
            and (unacked is None or len(unacked) < self.factory.config.max_unacked_pushes)
        ):
            self.hint_pending = False
            self._write(_SYNC_HINT)
            metrics.sync_hint()
            if self.follower is not None:
                self.follower.hinted()

    # ---------------------------------------------- features and the inbox follower

    def _negotiate(self, f: Features) -> None:
        """FEATURES: the connection's features are now those asked for that this server
        supports; FEATURES_OK lists them."""
        asked = set(f.features)
        enabled = {Feature.WIRE_ONCE} & asked
        service = self.factory.service
        if Feature.CONVERSATIONS in asked and getattr(service, "convs", None) is not None:
            enabled.add(Feature.CONVERSATIONS)
            if Feature.READ_RECEIPTS in asked and service.read_receipts:
                enabled.add(Feature.READ_RECEIPTS)
        if Feature.PUSH in asked and getattr(service, "push", None) is not None:
            enabled.add(Feature.PUSH)
        if Feature.LARGE_GROUPS in asked and getattr(service, "timelines", None) is not None:
            enabled.add(Feature.LARGE_GROUPS)
        self.features = feature_bits(tuple(enabled))
        wire_once = Feature.WIRE_ONCE in enabled
        follower = self.follower
        if follower is not None:
            follower.set_wire_once(wire_once)
        elif wire_once and self._inbox() is not None:
            self.follower = self._new_follower(wire_once=True)
        self.send(FeaturesOk(tuple(sorted(enabled)), request_id=f.request_id))

    def _follower(self) -> InboxFollower | None:
        """The follower, made on first use in the login watch (with WIRE_ONCE it is made
        when the feature is enabled). Called only once logged in."""
        follower = self.follower
        if follower is None and self._since:
            if self._inbox() is None:  # no storage (session tests): nothing to follow
                self._since = 0.0
            elif self.clock.seconds() < self._since + LOGIN_WATCH_S:
                follower = self.follower = self._new_follower(wire_once=False)
            else:
                self._since = 0.0  # the watch is over: no clock read per ack from now on
        return follower

    def _inbox(self) -> InboxStore | None:
        return getattr(self.factory.service, "inbox", None)

    def _new_follower(self, wire_once: bool) -> InboxFollower:
        inbox = self._inbox()
        assert inbox is not None
        return InboxFollower(
            self, inbox, self.clock,
            window=self.factory.config.max_unacked_pushes,
            watch_until=self._since + LOGIN_WATCH_S if self._since else 0.0,
            wire_once=wire_once,
            login_id=self._login_id,
        )  # fmt: skip

    def write_notice(self, data: bytes) -> bool:
        """INBOX_NOTICE from the follower: written unless the output is stalled."""
        if self.closing or self._stalled_since is not None:
            return False
        self._write(data)
        return True

    def sync_hint(self) -> None:
        """SYNC_HINT from the follower: now, or once the output drains."""
        if self.closing:
            return
        if self._stalled_since is not None:
            self.hint_pending = True
        else:
            self._write(_SYNC_HINT)
            metrics.sync_hint()

    def follower_done(self) -> None:
        self.follower = None

    def notify(self, data: bytes, feature: int) -> bool:
        """A frame outside the push window (READ_UPDATE) if this connection enabled
        `feature`; True if it was written."""
        if self.closing or self.caller is None or not self.features >> feature & 1:
            return False
        self._write(data)
        return True

    # ------------------------------------------------------- output flow control

    def pauseProducing(self) -> None:
        """The transport's buffer is full (IPushProducer): from now on watch its size."""
        if self.closing or self._tx_paused:
            return
        self._tx_paused = True
        self._since_pause = 0
        self._check_output()

    def resumeProducing(self) -> None:
        """The transport's buffer is empty again: push, read and hint as before."""
        if self.closing:
            return
        self._tx_paused = False
        self._since_pause = 0
        if self._stalled_since is not None:
            self._stalled_since = None  # the deadline, when it fires, finds no stall
            self._maybe_hint()
            self._update_reading()

    def stopProducing(self) -> None:
        """The transport is going away; connectionLost follows and releases everything."""
        self.closing = True

    def _check_output(self) -> None:
        config = self.factory.config
        queued = queued_bytes(self.transport)
        if queued is None:  # the transport's own threshold, unknown here, has been passed
            over, queued = True, self._since_pause
        else:
            over = queued > config.output_high_water_bytes
        if queued > config.output_hard_limit_bytes:
            self._drop(f"{queued} bytes of output queued, over the hard limit")
        elif over and self._stalled_since is None:
            now = self.clock.seconds()
            self._stalled_since = now  # stop pushing and reading until it drains
            self._arm(now + config.slow_reader_timeout_s)
            self._update_reading()

    # ----------------------------------------------------------------- output

    def send(self, frame: Frame | bytes) -> None:
        """Write a frame; bytes are a whole frame already encoded (the service's pages)."""
        if not self.closing:
            data = frame if isinstance(frame, bytes) else encode(frame)
            self._write(data)

    def close(self, reason: CloseReason, text: str) -> None:
        """Send CLOSE, then close the connection (PROTOCOL.md CLOSE)."""
        if not self.closing:
            metrics.connection_closed(reason.name)
        self.send(Close(reason, text))
        self._shut()

    def _fatal(self, code: ErrorCode, text: str, request_id: int) -> None:
        if not self.closing:
            metrics.connection_closed("error")
        self.send(Error(code, text[:1024], request_id=request_id))
        self._shut()

    def _shut(self, abort: bool = False) -> None:
        if not self.closing:
            self._count_state("closing")
            self.closing = True
            self._ack_watch = self._last_push = None  # no notice from a closing session
            self._gone()
            transport = self.transport
            if transport is not None:
                # A registered producer keeps a TCP transport from closing once it drained.
                transport.unregisterProducer()  # type: ignore[attr-defined]
                if abort or self._tx_paused:  # a peer that does not read would hold it open
                    abort_transport(transport)
                else:
                    transport.loseConnection()

    def _drop(self, why: str) -> None:
        """Close without CLOSE: the peer does not read it (no accepted message is lost: acks
        follow durability, pushes are backed by inboxes)."""
        log.info("dropping {peer}: {why}", peer=self._peer(), why=why)
        if not self.closing:
            metrics.connection_closed("dropped")
        self._shut(abort=True)

    def _count_state(self, new: str | None) -> None:
        """metrics.connection_state, from the state this connection was counted in."""
        if new != self._mstate:
            metrics.connection_state(self._mstate, new)
            self._mstate = new

    def _uncount(self) -> None:
        """Leave the factory's per-address counts (once)."""
        addr, self._addr = self._addr, None
        if addr is not None:
            self.factory.admission.release(addr, self._prelogin)
            self._prelogin = False

    def _gone(self) -> None:
        """Leave the hub and the presence map (once)."""
        if self.registered and self.factory.hub.device(self.user_id, self.device_id) is self:
            self.factory.hub.unregister(self)
            d = self.factory.router.offline(self)
            d.addErrback(lambda f: log.failure("withdrawing presence failed", f))

    # ---------------------------------------------------------------- timer

    def deadline_due(self) -> None:
        """The deadline came: close for the one that has passed, or set the next one.

        Until HELLO_OK it is the login deadline (`_login_at`); after, the
        earlier of the idle timeout (the last frame + idle_timeout) and the token's expiry;
        while the output is above its high-water mark, slow_reader_timeout_s after that; and,
        while an ack watch is on, push_ack_wait_s after the watched push was sent.
        """
        if self.closing:
            return
        now = self.clock.seconds()
        config = self.factory.config
        stalled = self._stalled_since
        if stalled is not None and now >= stalled + config.slow_reader_timeout_s:
            queued = queued_bytes(self.transport)
            if queued is None or queued > config.output_high_water_bytes:
                self._drop(f"output above the high-water mark for {config.slow_reader_timeout_s}s")
                return
            self._stalled_since = None  # it reads, if slowly: push and read again
            self._maybe_hint()
            self._update_reading()
            if self.closing:
                return
        if self.caller is None:
            if now >= self._login_at():
                log.info("closing {peer}: no login in time", peer=self._peer())
                self.close(CloseReason.IDLE_TIMEOUT, "no login in time")
                return
        else:
            expires_at = self._expires_at
            if expires_at is not None and now >= expires_at:
                self.close(CloseReason.AUTH_EXPIRED, "token expired")
                return
            if now >= self._last_rx + config.idle_timeout:
                log.info("closing idle connection {peer}", peer=self._peer())
                self.close(CloseReason.IDLE_TIMEOUT, "no frame received in time")
                return
            watch = self._ack_watch
            if watch is not None and now >= watch + self.factory.ack_wait_s:
                self._ack_overdue(now)
        self._rearm(now)

    def _rearm(self, now: float) -> None:
        """Set the deadline to the earliest one that applies now."""
        config = self.factory.config
        if self.caller is None:
            at = self._login_at()
        else:
            at = self._last_rx + config.idle_timeout
            if self._expires_at is not None:
                at = min(at, self._expires_at)
        if self._stalled_since is not None:
            at = min(at, self._stalled_since + config.slow_reader_timeout_s)
        if self._ack_watch is not None:
            at = min(at, self._ack_watch + self.factory.ack_wait_s)
        self.factory.deadlines.set(self, at)

    def _login_at(self) -> float:
        """HELLO_OK is due login_timeout_s after connecting, and never later than the idle
        timeout (spec 8.1: a client may count on idle_timeout_s as the bound)."""
        config = self.factory.config
        return self._since + min(config.login_timeout_s, config.idle_timeout)

    def _arm(self, at: float) -> None:
        """Make the deadline no later than `at`."""
        if self.deadline is None or at < self.deadline:
            self.factory.deadlines.set(self, at)

    def _cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.factory.deadlines.set(self, None)

    def _now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def _peer(self) -> str:
        return str(self.transport.getPeer()) if self.transport else "?"


_CLOSED_READER = FrameReader(0)  # a closed session's: its buffer is released, it reads nothing


class SessionFactory(Factory):
    def __init__(self, config: Config, service: ChatService, hub: Hub, clock: IReactorTime,
                 secret: str, router: PushRouter | None = None) -> None:  # fmt: skip
        self.config = config
        self.service = service
        self.hub = hub
        self.router: PushRouter = router or LocalRouter()
        self.clock = clock
        self.secret = secret
        self.deadlines = Deadlines(clock)  # every session's timer, on one reactor timer
        # Unacknowledged pushes lead to notifications only where notifications are sent (the
        # service has the notify queue); 0.0: not watched, no clock read per push.
        notifying = getattr(service, "notify_queue", None) is not None
        self.ack_wait_s = config.push_ack_wait_s if notifying else 0.0
        # the last PUSH frame a session was handed and its sender (0: a group event, which
        # notifies nobody): the same for all of a message's receivers
        self.last_frame: bytes | None = None
        self.last_notifier = 0
        self.admission = Admission(config, clock)  # the per-address connection caps

    def buildProtocol(self, addr: IAddress | None) -> Session:
        return Session(self)
