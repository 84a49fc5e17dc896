"""The improto client library: one device's session with an improto server, on Twisted.

Everything here is non-blocking: methods return Deferreds (the coroutines inside are run with
`Deferred.fromCoroutine`), so they can be awaited from other coroutines or chained with
callbacks. The layers, one module each:

- `state.ClientState`: what the device keeps between sessions (offline cursor, messages per
  conversation, outbox of unacknowledged SENDs, the conversation list of `conv_list`),
  optionally persisted as one JSON file; `conv_keys` names conversations ("user:1002",
  "group:7").
- `protocol.IMClientProtocol`: one TCP connection: framing, request/reply matching by
  request_id, heartbeats, byte and frame counters (`wire_stats`); it hands unsolicited frames
  (PUSH, SYNC_HINT, INBOX_NOTICE, READ_UPDATE, unmatched replies) to its client.
- `sync.sync_offline`: the offline sync loop, and its `SyncResult`; `sync.apply_notice`: the
  INBOX_NOTICE rule. `conv_sync`: fetching the conversation list. The timelines of large
  groups (TIMELINE_HEADS, TIMELINE_PULL) are paged here (`sync_timelines`).
- `IMClient` (here): the session API: connect + HELLO + FEATURES, sync after login and on
  hints, sends with retries, history, groups, conversations and read markers, and
  (optionally) reconnecting with backoff.
- `errors`: the exceptions (ServerError, SessionClosed, NotConnected, StateMismatch,
  FeatureUnavailable).

Every public name is importable from this module too.

PROTOCOL.md sections 8-12 and the client checklist (section 17) are what this implements, and
from sections 18 to 20 (post-v1 features) wire-once delivery, conversations, read receipts,
push registrations and large groups' timelines. Login
order: HELLO_OK, FEATURES (answered before anything else is sent, so that the server follows
the cursor from the first OFFLINE_PAGE), the sync loop (with LARGE_GROUPS, the timelines
after the offline pages: section 20.6), the outbox resend, and, once the
application has fetched the conversation list before, CONV_CHANGES from its stored version.
A version-1 server answers FEATURES with ERROR UNKNOWN_FRAME_TYPE: the client then behaves as
a version-1 client. `features=()` makes it one anyway (it never sends FEATURES).

    client = IMClient("tcp:host=127.0.0.1:port=5555", token, "laptop",
                      state=ClientState.load("laptop.json"))
    client.on_message = lambda conv, m: print(conv, m.body)
    await client.connect()                      # HELLO, FEATURES, then sync + outbox resend
    ack = await client.send_text(ConvKind.USER, 1002, "hi")
    await client.conversations()                # the list, newest first: client.state.convs
    await client.mark_read(ConvKind.USER, 1002, newest_msg_id)
    await client.register_push("apns", device_token, preview=True)  # notified while away
    await client.sync_timelines()               # large groups: what their timelines hold
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto.codec import encode
from improto.enums import ClientKind, CloseReason, ContentType, ConvKind, Feature
from improto.errors import ErrorCode
from improto.frames import (
    ConvEntry,
    ConvHide,
    ConvHideOk,
    Features,
    FeaturesOk,
    Frame,
    GroupAdd,
    GroupAddOk,
    GroupCreate,
    GroupCreated,
    GroupList,
    GroupMemberList,
    GroupMembers,
    GroupRemove,
    GroupRemoveOk,
    GroupSummary,
    Hello,
    HelloOk,
    HistoryPage,
    HistoryPull,
    InboxNotice,
    Message,
    MyGroups,
    OfflineAck,
    OfflineAckOk,
    Ping,
    Pong,
    PushAck,
    PushRegister,
    PushRegisterOk,
    PushUnregister,
    PushUnregisterOk,
    ReadMark,
    ReadMarkOk,
    ReadUpdate,
    Send,
    SendAck,
    TimelineHead,
    TimelineHeads,
    TimelineHeadsPage,
    TimelinePage,
    TimelinePull,
)
from improto.limits import OFFLINE_PAGE_MAX, PROTOCOL_VERSION, TIMELINE_PAGE_MAX
from improto_clients.conv_keys import conv_key, message_conv, parse_conv_key
from improto_clients.conv_list import ConversationList, last_id
from improto_clients.conv_sync import ConvResult, fetch_changes, fetch_list
from improto_clients.errors import (
    FeatureUnavailable,
    NotConnected,
    ServerError,
    SessionClosed,
    StateMismatch,
)
from improto_clients.held import HELD_FOLLOW, HeldIds
from improto_clients.protocol import F, IMClientProtocol
from improto_clients.reactor_types import IClientReactor, default_reactor
from improto_clients.state import ClientState
from improto_clients.sync import Notice, SyncResult, apply_notice, sync_offline
from improto_clients.wire_stats import WireStats

# What a client asks for by default: every post-v1 feature (sections 18, 19, 20).
DEFAULT_FEATURES = (
    Feature.WIRE_ONCE,
    Feature.CONVERSATIONS,
    Feature.READ_RECEIPTS,
    Feature.PUSH,
    Feature.LARGE_GROUPS,
)

# The longest RATE_LIMITED wait obeyed before a resend: a wrong or hostile retry_after_ms must
# not park a send, and its caller, for hours. Resending sooner only earns another refusal (it
# has no effect, section 9.4) with a fresh wait, and the message stays in the outbox anyway.
MAX_RETRY_AFTER_S = 60.0

__all__ = [
    "DEFAULT_FEATURES",
    "ClientState",
    "ConvResult",
    "ConversationList",
    "FeatureUnavailable",
    "HeldIds",
    "IMClient",
    "IMClientProtocol",
    "NotConnected",
    "Notice",
    "ServerError",
    "SessionClosed",
    "StateMismatch",
    "SyncResult",
    "TimelineSync",
    "WireStats",
    "conv_key",
    "message_conv",
    "parse_conv_key",
]

log = Logger()


@dataclass
class TimelineSync:
    """One run of the timeline part of the sync loop (PROTOCOL.md 20.6): the heads it read,
    the messages it stored that were new (pushes and pages deduplicated by msg_id), oldest
    first per group, the pages it pulled, and the positions where it ended."""

    heads: tuple[TimelineHead, ...] = ()
    messages: list[Message] = field(default_factory=list)
    pages: int = 0
    positions: dict[int, int] = field(default_factory=dict)  # group id -> position


class IMClient:
    """A device's session. `token` may be a callable, called for a fresh token per login.

    Callbacks (attributes, all optional):
    - `on_login(hello_ok)`: a connection is logged in (connect() or a reconnect);
    - `on_message(conv, message)`: a new message arrived by PUSH (duplicates are not repeated);
    - `on_sync(result)`: a sync the client ran by itself (after login, SYNC_HINT, pushes);
    - `on_resend(send, ack_or_exception)`: an outbox SEND resent after login finished;
    - `on_close(exc)`: the logged-in connection ended (`SessionClosed` with the CLOSE reason);
    - `on_error(exc)`: an unsolicited ERROR or a failure of a background task;
    - `on_conversation(conv, row)`: a row of the conversation list changed (a fetch, a
      message, a read position, a hide); `state.convs.total_unread` is the badge;
    - `on_read_update(conv, update)`: a READ_UPDATE, after it was applied: my other device
      read up to update.msg_id (reader_id is me), or the 1:1 peer read my messages.

    `features`: what FEATURES asks for after HELLO_OK (`()`: a version-1 client);
    `self.features` holds what the server enabled on the current connection. With
    LARGE_GROUPS every sync also pages the timelines of the user's large groups (section
    20.6) from `timeline_positions` (group id -> position, persisted in the state: a group
    without one starts at the user's read position), listing in each TIMELINE_PULL the msg_ids
    the device holds above it (`state.timeline_held`, the rule of `held`: pushed and own
    messages are not downloaded again); every HELD_FOLLOW held ids of a group it runs the
    timeline loop by itself, so that the positions follow the pushes. With WIRE_ONCE
    the cursor follows pushes by INBOX_NOTICE, so there is no sync after pushes; an
    OFFLINE_ACK of the cursor goes out `notice_ack_delay` seconds after the first notice of a
    run (and at close()), so that "resume" starts there. `track_ids`: count each delivered
    msg_id in `wire.message_ids` (for tests that look for a message delivered twice).
    """

    def __init__(self, server: str, token: str | Callable[[], str], device_id: str, *,
                 state: ClientState | None = None, reactor: IClientReactor | None = None,
                 client_kind: int = ClientKind.DESKTOP, request_timeout: float = 10.0,
                 reconnect: bool = False, push_sync_delay: float | None = 5.0,
                 features: Iterable[int] = DEFAULT_FEATURES,
                 notice_ack_delay: float | None = 3.0,
                 track_ids: bool = False) -> None:  # fmt: skip
        self.server = server
        self.token = token
        self.device_id = device_id
        self.state = state if state is not None else ClientState()
        self.reactor = reactor if reactor is not None else default_reactor()
        self.client_kind = client_kind
        self.request_timeout = request_timeout
        self.reconnect = reconnect
        self.push_sync_delay = push_sync_delay
        self.want_features = tuple(features)
        self.notice_ack_delay = notice_ack_delay
        self.rng = random.Random()
        self.wire = WireStats(track_ids=track_ids)  # every connection's bytes and frames
        self.notices: Counter[Notice] = Counter()  # what the INBOX_NOTICEs did

        self.on_login: Callable[[HelloOk], None] | None = None
        self.on_message: Callable[[str, Message], None] | None = None
        self.on_sync: Callable[[SyncResult], None] | None = None
        self.on_resend: Callable[[Send, SendAck | BaseException], None] | None = None
        self.on_close: Callable[[SessionClosed], None] | None = None
        self.on_error: Callable[[BaseException], None] | None = None
        self.on_conversation: Callable[[str, ConvEntry], None] | None = None
        self.on_read_update: Callable[[str, ReadUpdate], None] | None = None

        self.protocol: IMClientProtocol | None = None  # set once HELLO_OK arrived
        self.hello: HelloOk | None = None
        self.features: frozenset[int] = frozenset()  # enabled on the current connection
        self.last_close: SessionClosed | None = None
        self._sync_lock = DeferredLock()
        self._sync_queued = False
        self._tasks: set[Deferred[None]] = set()
        self._closing = False
        self._attempt = 0
        self._reconnect_call: IDelayedCall | None = None
        self._push_sync_call: IDelayedCall | None = None
        self._notice_ack_call: IDelayedCall | None = None
        self._acked_cursor: int | None = None  # the last cursor OFFLINE_ACK confirmed
        self._notice_moved = False  # a notice moved the cursor on this connection
        self._conv_lock = DeferredLock()
        self._timelines_queued = False  # a timeline loop of our own waits or runs

    @property
    def user_id(self) -> int | None:
        return self.state.user_id

    @property
    def timeline_positions(self) -> dict[int, int]:
        """Large groups (section 20): this device's position in each group's timeline (the
        state's dict: persisted with the messages)."""
        return self.state.timeline_positions

    @property
    def timeline_held(self) -> HeldIds:
        """The msg_ids held above the positions, listed in TIMELINE_PULL's `held`."""
        return self.state.timeline_held

    @property
    def connected(self) -> bool:
        return self.protocol is not None and self.protocol.usable

    @property
    def reconnecting(self) -> bool:
        """A reconnect is scheduled (true inside on_close when one will follow)."""
        return self._reconnect_call is not None and self._reconnect_call.active()

    def has_feature(self, feature: int) -> bool:
        return feature in self.features

    @property
    def total_unread(self) -> int:
        """The badge: unread messages over the conversations not hidden (the list's)."""
        return self.state.convs.total_unread

    def conv_of(self, m: Message) -> str:
        assert self.user_id is not None
        return message_conv(self.user_id, m)

    # --- session

    def connect(self) -> Deferred[HelloOk]:
        """Connect, HELLO, FEATURES (if any are wanted), then start the sync loop and the
        outbox resend in the background (their outcome goes to on_sync/on_resend). Fires with
        the HELLO_OK once `features` is known."""
        return Deferred.fromCoroutine(self._connect())

    async def _connect(self) -> HelloOk:
        self._closing = False
        proto = IMClientProtocol(self)
        await connectProtocol(clientFromString(self.reactor, self.server), proto)
        token = self.token() if callable(self.token) else self.token
        try:
            hello = Hello(PROTOCOL_VERSION, self.client_kind, self.device_id, token)
            ok = await proto.call(hello, HelloOk, self.request_timeout)
            self.state.bind(ok.user_id)
            # Before the first OFFLINE_PULL, so that the server follows the cursor from the
            # first page on (wire-once).
            features = await self._negotiate(proto)
            if self._closing:  # close() was called while this (re)connect was under way
                raise NotConnected("closed by the application")
        except BaseException:
            if proto.connected:
                proto.tcp.loseConnection()
            raise
        self.protocol, self.hello, self._attempt = proto, ok, 0
        self.features, self._acked_cursor, self._notice_moved = features, None, False
        proto.start_heartbeat(ok.heartbeat_s)
        if self.on_login:
            self.on_login(ok)
        # Snapshot now: a send() started after this login delivers its own message.
        self._spawn(self._after_login(list(self.state.outbox.values())))
        if Feature.CONVERSATIONS in features and self.state.convs.version:
            # The list was fetched before: learn what changed meanwhile (reads elsewhere).
            self._spawn(self._conv_changes_after_login())
        return ok

    async def _negotiate(self, proto: IMClientProtocol) -> frozenset[int]:
        if not self.want_features:
            return frozenset()
        try:
            ok = await proto.call(Features(self.want_features), FeaturesOk, self.request_timeout)
        except ServerError as e:
            if e.code != ErrorCode.UNKNOWN_FRAME_TYPE:
                self._report(e)
            return frozenset()  # a version-1 server (or one refusing): version 1 it is
        return frozenset(ok.features)

    async def _conv_changes_after_login(self) -> None:
        await self.conversation_changes()

    async def _after_login(self, unacked: list[Send]) -> None:
        # Checklist: on HELLO_OK run the sync loop, then resend unacknowledged SENDs.
        try:
            result = await self.sync()
        except Exception as e:
            self._report(e)
        else:
            if self.on_sync:
                self.on_sync(result)
        for frame in unacked:
            if frame.client_msg_id not in self.state.outbox:
                continue  # acknowledged meanwhile (a late SEND_ACK)
            outcome: SendAck | BaseException
            try:
                outcome = await self._deliver(frame, self.request_timeout, 3)
            except Exception as e:
                outcome = e
            if self.on_resend:
                self.on_resend(frame, outcome)
            if isinstance(outcome, SessionClosed | NotConnected):
                break  # the rest waits for the next login

    def close(self) -> Deferred[None]:
        """Close the connection (no reconnect); fires once it is closed. A cursor that notices
        moved since the last OFFLINE_ACK is acknowledged first (no wait for the answer)."""
        self._closing = True
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        proto = self.protocol
        if proto is None or not proto.connected:
            return defer.succeed(None)
        if proto.usable and self._notice_moved and self.state.cursor != self._acked_cursor:
            proto.request(OfflineAck(self.state.cursor)).addErrback(lambda _: None)
        d = proto.when_lost()
        proto.tcp.loseConnection()
        return d

    def drain(self) -> Deferred[None]:
        """Fires when no background task (auto sync, resend) is running."""

        async def wait() -> None:
            while self._tasks:
                await defer.DeferredList(list(self._tasks), consumeErrors=True)

        return Deferred.fromCoroutine(wait())

    def _proto(self) -> IMClientProtocol:
        if self.protocol is None or not self.protocol.usable:
            raise NotConnected("not connected")
        return self.protocol

    def _request(self, frame: Frame, reply: type[F], timeout: float | None = None) -> Deferred[F]:
        try:
            proto = self._proto()
        except NotConnected as e:
            return defer.fail(e)
        return proto.call(frame, reply, self.request_timeout if timeout is None else timeout)

    def _spawn(self, coro: Coroutine[Deferred[object], object, None]) -> None:
        d = Deferred.fromCoroutine(coro)
        self._tasks.add(d)

        def done(result: Failure | None) -> None:
            self._tasks.discard(d)
            # A lost connection is reported once, through on_close, not per task it broke.
            if isinstance(result, Failure) and not result.check(SessionClosed, NotConnected):
                self._report(_exception(result))

        d.addBoth(done)

    def _report(self, e: BaseException) -> None:
        if self.on_error:
            self.on_error(e)
        else:
            log.warn("background failure: {error!r}", error=e)

    # --- events from the protocol

    def _on_push(self, proto: IMClientProtocol, m: Message) -> None:
        follow = False
        try:
            new = self.state.add(m)
            if new:
                self._conv_message(m, live=True)
                follow = self._hold(m)  # saved with the message
                self.state.save()
        except Exception:
            log.failure("cannot store pushed message {id}: not acknowledging it", id=m.msg_id)
            return  # unacked: it still waits in the inbox for the next sync
        proto.send_frame(PushAck(m.msg_id))  # acked even when it is a duplicate
        if not new:
            return
        if self.on_message:
            self.on_message(self.conv_of(m), m)
        if follow:
            self._request_timelines()
        # Section 10.2: sync some seconds after pushes so that the offline cursor follows;
        # with WIRE_ONCE the notices make it follow without downloading anything.
        if Feature.WIRE_ONCE in self.features:
            return
        if self.push_sync_delay is not None and self._push_sync_call is None:
            self._push_sync_call = self.reactor.callLater(self.push_sync_delay, self._push_sync)

    def _on_notice(self, notice: InboxNotice) -> None:
        """Section 18.2: cursor == from and every id held: cursor := to; an id missing: the
        sync loop; cursor != from: ignored. Applied during a sync loop too: a notice that
        starts at the cursor is right whenever it comes, and ignoring one (e.g. during the
        loop's final OFFLINE_ACK) would leave the cursor behind the server's followed one, so
        that every later notice is ignored until the next page."""
        try:
            outcome = apply_notice(self.state, notice)
        except Exception as e:  # the cursor could not be saved: it stays where it was
            self._report(e)
            return
        self.notices[outcome] += 1
        self._notice_moved |= outcome is Notice.ADVANCED
        if outcome is Notice.MISSING:
            self._request_sync()
        elif outcome is Notice.ADVANCED and self.notice_ack_delay is not None:
            if self._notice_ack_call is None:  # from the first of a run: bounded delay
                delay = self.notice_ack_delay
                self._notice_ack_call = self.reactor.callLater(delay, self._ack_notices)

    def _ack_notices(self) -> None:
        self._notice_ack_call = None
        if self.state.cursor == self._acked_cursor:
            return  # a sync loop has acknowledged it meanwhile

        async def ack() -> None:
            cursor = self.state.cursor
            await self._request(OfflineAck(cursor), OfflineAckOk)
            self._acked_cursor = cursor

        self._spawn(ack())

    def _on_read_update(self, u: ReadUpdate) -> None:
        """My other device's read position, or (1:1, conv = the reader) the peer's receipt."""
        key = conv_key(u.conv_kind, u.conv_id)
        convs = self.state.convs
        if u.reader_id == self.user_id:
            row = convs.read(key, u.msg_id)
        elif u.conv_kind == ConvKind.USER and u.conv_id == u.reader_id:
            row = convs.peer_read(key, u.msg_id)
        else:
            row = None  # not a shape section 18 sends: nothing to apply
        if row is not None:
            self._save_quietly()
            if self.on_conversation:
                self.on_conversation(key, row)
        if self.on_read_update:
            self.on_read_update(key, u)

    def _hold(self, m: Message) -> bool:
        """A group message just stored outside the timeline loop (push, own message, history,
        a pull of the caller's): held, so that the pages leave it out (section 20.6). The
        caller saves the state. True: HELD_FOLLOW more ids of a group with a position are held
        (time to let the position follow)."""
        if Feature.LARGE_GROUPS not in self.features or m.conv_kind != ConvKind.GROUP:
            return False
        held = self.state.timeline_held
        if not held.hold(m.conv_id, m.msg_id):
            return False
        return m.conv_id in self.timeline_positions and held.count(m.conv_id) % HELD_FOLLOW == 0

    def _conv_message(self, m: Message, live: bool) -> None:
        """A newly stored message moves its conversation's row (with CONVERSATIONS only: the
        rows exist for the list). The caller saves the state."""
        if Feature.CONVERSATIONS not in self.features or self.user_id is None:
            return
        row = self.state.convs.message(self.user_id, m, live)
        if row is not None and self.on_conversation:
            self.on_conversation(self.conv_of(m), row)

    def _save_quietly(self) -> None:
        """Save state changed by a frame from the server (a failure is reported, not raised
        into the protocol: the change is redone by the next fetch)."""
        try:
            self.state.save()
        except Exception as e:
            self._report(e)

    def _push_sync(self) -> None:
        self._push_sync_call = None
        self._request_sync()

    def _request_sync(self) -> None:
        """Run the sync loop in the background; at most one waits behind a running one."""
        if self._sync_queued:
            return
        self._sync_queued = True

        async def run() -> None:
            result = await self.sync()
            if self.on_sync:
                self.on_sync(result)

        self._spawn(run())

    def _request_timelines(self) -> None:
        """Run the timeline loop alone in the background (at most one waits): the held ids
        of a group have grown, its pages now cover them without sending them."""
        if self._timelines_queued or Feature.LARGE_GROUPS not in self.features:
            return
        self._timelines_queued = True

        async def run() -> None:
            try:
                await self._sync_lock.run(self._timeline_loop, self.timeline_positions,
                                          TIMELINE_PAGE_MAX)  # fmt: skip
            finally:
                self._timelines_queued = False

        self._spawn(run())

    def _on_server_error(self, err: ServerError) -> None:
        self._report(err)

    def _on_unmatched(self, frame: Frame) -> None:
        # A SEND_ACK whose request timed out still acknowledges its message (section 9.1.5).
        if isinstance(frame, SendAck) and frame.client_msg_id in self.state.outbox:
            self._acked(self.state.outbox[frame.client_msg_id], frame)
        else:
            log.debug("unmatched {type} request_id={rid}", type=frame.TYPE.name,
                      rid=frame.request_id)  # fmt: skip

    def _on_connection_lost(self, proto: IMClientProtocol, exc: SessionClosed) -> None:
        if proto is not self.protocol:
            return  # never logged in: connect() reports that
        self.protocol = None
        self.features = frozenset()
        self.last_close = exc
        for call in (self._push_sync_call, self._notice_ack_call):
            if call is not None and call.active():
                call.cancel()
        self._push_sync_call = self._notice_ack_call = None
        if self.reconnect and not self._closing and self._may_reconnect(exc):
            self._schedule_reconnect()
        if self.on_close:
            self.on_close(exc)

    # --- reconnecting (section 8.4)

    def _may_reconnect(self, exc: SessionClosed) -> bool:
        if exc.reason == CloseReason.REPLACED:
            return False  # another instance of this device took over
        if exc.reason == CloseReason.AUTH_EXPIRED or (exc.error and exc.error.code // 100 == 2):
            return callable(self.token)  # only with a fresh token
        return exc.error is None or not exc.error.fatal

    def _schedule_reconnect(self) -> None:
        base = min(60.0, 2.0**self._attempt)  # 1, 2, 4 ... 60 s
        delay = base / 2 + self.rng.uniform(0, base / 2)  # jitter spreads a mass reconnect
        self._attempt += 1
        log.info("reconnecting in {delay:.1f} s", delay=delay)
        self._reconnect_call = self.reactor.callLater(delay, self._reconnect_now)

    def _reconnect_now(self) -> None:
        self._reconnect_call = None

        def failed(f: Failure) -> None:
            err = _exception(f)
            self._report(err)
            if isinstance(err, StateMismatch) or (
                isinstance(err, ServerError) and err.code // 100 == 2 and not callable(self.token)
            ):
                return  # retrying cannot help
            if not self._closing:
                self._schedule_reconnect()

        self.connect().addErrback(failed)

    # --- offline sync (section 10)

    def sync(self, limit: int = OFFLINE_PAGE_MAX) -> Deferred[SyncResult]:
        """Run the offline sync loop; runs wait for each other (one loop per connection)."""
        return self._sync_lock.run(self._sync_loop, limit)

    async def _sync_loop(self, limit: int) -> SyncResult:
        self._sync_queued = False  # a SYNC_HINT from now on needs another run
        result = await sync_offline(self._proto(), self.state, limit, self.request_timeout)
        self._acked_cursor = result.cursor
        if result.messages and Feature.CONVERSATIONS in self.features:
            for m in result.messages:
                self._conv_message(m, live=False)
            self.state.save()
        if Feature.LARGE_GROUPS in self.features:  # section 20.6: then the timelines
            try:
                timelines = await self._timeline_loop(self.timeline_positions, TIMELINE_PAGE_MAX)
            except ServerError as e:  # the offline part stands; the next sync tries again
                self._report(e)
            else:
                result.messages += timelines.messages
        return result

    # --- large groups (section 20)

    def timeline_heads(self) -> Deferred[TimelineHeadsPage]:
        """TIMELINE_HEADS: the user's groups that have a timeline, ascending group id, each
        with its done, the user's read_seq, unread and the last msg_id."""

        async def run() -> TimelineHeadsPage:
            self._need(Feature.LARGE_GROUPS)
            return await self._request(TimelineHeads(), TimelineHeadsPage)

        return Deferred.fromCoroutine(run())

    def timeline_pull(self, group_id: int, after_seq: int, limit: int = 0,
                      held: tuple[int, ...] = ()) -> Deferred[TimelinePage]:  # fmt: skip
        """TIMELINE_PULL: one page of the group's timeline after `after_seq` (0: from the
        start; limit 0: the default, 200), without the messages `held` names (ascending, at
        most 1000: messages this device holds, e.g. `timeline_held.to_send(group_id)`). Its
        messages are also stored locally (deduplicated) and held; the next page starts after
        page.position. It moves no stored position (`timeline_next` does)."""

        async def run() -> TimelinePage:
            page, new = await self._timeline_page(group_id, after_seq, limit, held)
            if sum(self._hold(m) for m in new):  # outside the loop: above the position, maybe
                self._request_timelines()
            if new:
                self.state.save()
            return page

        return Deferred.fromCoroutine(run())

    def timeline_next(self, group_id: int, limit: int = 0,
                      head: TimelineHead | None = None) -> Deferred[TimelinePage]:  # fmt: skip
        """One page of the sync loop (20.6) for one group: from its stored position (none:
        `head.read_seq`, or 0), the held ids listed; the messages stored, then the position
        moved and persisted, the held ids it covers forgotten. Fires with the page (its
        messages: the new ones and any already held). With `head` (the group's, from
        TIMELINE_HEADS) the held ids up to head.last_msg_id go once position >= head.done."""

        async def run() -> TimelinePage:
            start = self.timeline_positions.get(group_id, head.read_seq if head else 0)
            page, _ = await self._loop_page(group_id, start, limit, head, self.timeline_positions)
            return page

        return Deferred.fromCoroutine(run())

    def sync_timelines(self, positions: dict[int, int] | None = None,
                       limit: int = TIMELINE_PAGE_MAX) -> Deferred[TimelineSync]:  # fmt: skip
        """The timeline part of the sync loop (section 20.6): TIMELINE_HEADS, then for each
        group whose done differs from its position in `positions` (default:
        `timeline_positions`; a group without one starts at its read_seq) TIMELINE_PULL until
        has_more = 0, storing the new messages and then the position in `positions` after
        each page. Each pull lists the held ids of the group; only with the default
        `positions` are they forgotten as the positions cover them (and the positions saved).
        Runs one at a time with sync() (which runs it too, with LARGE_GROUPS)."""
        where = self.timeline_positions if positions is None else positions
        return self._sync_lock.run(self._timeline_loop, where, limit)

    async def _timeline_loop(self, positions: dict[int, int], limit: int) -> TimelineSync:
        self._need(Feature.LARGE_GROUPS)
        heads = await self._request(TimelineHeads(), TimelineHeadsPage)
        result = TimelineSync(heads=heads.heads)
        own = positions is self.timeline_positions
        if own:  # the groups not listed have no timeline: nothing to leave out of a page
            self.timeline_held.keep_only(h.group_id for h in heads.heads)
        for h in heads.heads:
            p = positions.get(h.group_id, h.read_seq)
            # done above p: new messages; below: a position from lost server data, which the
            # first (empty) page brings back to done (20.6)
            more = h.done != p
            while more:
                page, new = await self._loop_page(h.group_id, p, limit, h, positions)
                result.pages += 1
                result.messages += new
                moved, p = page.position != p, page.position
                more = bool(page.has_more) and moved  # no progress: a page would repeat
            if own and p >= h.done:  # at the head (also without a page): its last is covered
                self.timeline_held.cover(h.group_id, h.last_msg_id)
            result.positions[h.group_id] = positions[h.group_id] = p
        if own:
            self.state.save()  # the positions set without a page, the held ids forgotten
        return result

    async def _loop_page(self, group_id: int, after_seq: int, limit: int,
                         head: TimelineHead | None, positions: dict[int, int],
                         ) -> tuple[TimelinePage, list[Message]]:  # fmt: skip
        """One page of the loop: pull with the held ids, store the messages, then the
        position (persisted when `positions` is the state's); the held ids the page covers
        are forgotten (the state's positions only: those are what `covered_id` is about)."""
        held = self.timeline_held
        page, new = await self._timeline_page(group_id, after_seq, limit,
                                              held.to_send(group_id))  # fmt: skip
        if positions is not self.timeline_positions:
            positions[group_id] = page.position
            if new:
                self.state.save()
            return page, new
        if page.position < after_seq:  # lost server data: what was covered is not any more
            held.reset(group_id)
        if page.messages:
            held.cover(group_id, max(m.msg_id for m in page.messages))
        if head is not None and page.position >= head.done:
            held.cover(group_id, head.last_msg_id)
        self.state.move_timeline(group_id, page.position)  # saves the messages with it
        return page, new

    async def _timeline_page(self, group_id: int, after_seq: int, limit: int,
                             held: tuple[int, ...] = ()
                             ) -> tuple[TimelinePage, list[Message]]:  # fmt: skip
        """One TIMELINE_PULL; its messages stored (not saved: the caller saves), the new ones
        returned."""
        self._need(Feature.LARGE_GROUPS)
        pull = TimelinePull(group_id, after_seq, limit, held)
        page = await self._request(pull, TimelinePage)
        new = [m for m in page.messages if self.state.add(m)]
        for m in new:
            self._conv_message(m, live=False)
        return page, new

    # --- sending (section 9.1)

    def send(self, conv_kind: int, conv_id: int, body: bytes | str,
             content_type: int = ContentType.TEXT, client_msg_id: bytes | None = None,
             timeout: float = 10.0, retries: int = 3) -> Deferred[SendAck]:  # fmt: skip
        """Send a message; it stays in the outbox until a SEND_ACK arrives.

        A timeout or a 5xx ERROR is retried `retries` times with the same client_msg_id (the
        server deduplicates); after a 5xx, once the RATE_LIMITED text's retry_after_ms has
        passed (at most MAX_RETRY_AFTER_S), else after a backoff. Fails with ServerError when
        refused (the message leaves the outbox), or with TimeoutError/SessionClosed/
        NotConnected (it stays in the outbox and is resent after the next login).
        """
        if isinstance(body, str):
            body = body.encode("utf-8")
        cmid = client_msg_id if client_msg_id is not None else uuid.uuid4().bytes
        frame = Send(cmid, conv_kind, conv_id, content_type, body)
        return Deferred.fromCoroutine(self._send(frame, timeout, retries))

    def send_text(self, conv_kind: int, conv_id: int, text: str, *,
                  client_msg_id: bytes | None = None, timeout: float = 10.0,
                  retries: int = 3) -> Deferred[SendAck]:  # fmt: skip
        return self.send(conv_kind, conv_id, text, ContentType.TEXT, client_msg_id, timeout,
                         retries)  # fmt: skip

    async def _send(self, frame: Send, timeout: float, retries: int) -> SendAck:
        encode(frame)  # refuse an invalid message before it enters the outbox
        self.state.outbox[frame.client_msg_id] = frame
        self.state.save()
        return await self._deliver(frame, timeout, retries)

    async def _deliver(self, frame: Send, timeout: float, retries: int) -> SendAck:
        attempt = 0
        while True:
            try:
                ack = await self._request(frame, SendAck, timeout)
            except NotConnected:
                raise NotConnected("not connected: it goes out after the next login") from None
            except defer.TimeoutError:
                if attempt >= retries:
                    raise
            except ServerError as e:
                if e.code // 100 in (1, 3):  # refused or malformed: a resend cannot succeed
                    self.state.outbox.pop(frame.client_msg_id, None)
                    self.state.save()
                    raise
                if not e.retriable or attempt >= retries:
                    raise
                await deferLater(self.reactor, _retry_delay(e, attempt))
            else:
                self._acked(frame, ack)
                return ack
            attempt += 1

    def _acked(self, frame: Send, ack: SendAck) -> None:
        """Leave the outbox and store one's own message (a later sync page deduplicates it)."""
        self.state.outbox.pop(frame.client_msg_id, None)
        if self.user_id is not None:
            f = frame
            mine = Message(ack.msg_id, ack.server_time, self.user_id, self.device_id,
                           f.conv_kind, f.conv_id, f.content_type, f.client_msg_id,
                           f.body)  # fmt: skip
            if self.state.add(mine):
                self._conv_message(mine, live=True)
                if self._hold(mine):  # the pages need not bring it back
                    self._request_timelines()
        self.state.save()

    # --- history (section 11)

    def history(self, conv_kind: int, conv_id: int, before_id: int = 0,
                limit: int = 0) -> Deferred[HistoryPage]:  # fmt: skip
        """One page, newest first; messages are also stored locally (deduplicated)."""

        async def run() -> HistoryPage:
            page = await self._request(
                HistoryPull(conv_kind, conv_id, before_id, limit), HistoryPage
            )
            new = [m for m in page.messages if self.state.add(m)]
            if new:
                if sum(self._hold(m) for m in new):  # a large group's newest, maybe
                    self._request_timelines()
                self.state.save()
            return page

        return Deferred.fromCoroutine(run())

    async def history_pages(self, conv_kind: int, conv_id: int, before_id: int = 0,
                            limit: int = 0, max_pages: int | None = None,
                            ) -> AsyncIterator[HistoryPage]:  # fmt: skip
        """Pages backwards (before_id = the last msg_id of the previous page) until has_more=0."""
        n = 0
        while True:
            page = await self.history(conv_kind, conv_id, before_id, limit)
            yield page
            n += 1
            # An empty page with has_more=1 would loop forever on the same before_id.
            if not page.has_more or not page.messages or (max_pages and n >= max_pages):
                return
            before_id = page.messages[-1].msg_id

    def history_all(self, conv_kind: int, conv_id: int, before_id: int = 0, limit: int = 0,
                    max_pages: int | None = None) -> Deferred[list[Message]]:  # fmt: skip
        """Every message of the conversation older than before_id, newest first."""

        async def run() -> list[Message]:
            out: list[Message] = []
            async for page in self.history_pages(conv_kind, conv_id, before_id, limit, max_pages):
                out += page.messages
            return out

        return Deferred.fromCoroutine(run())

    # --- groups (section 12) and ping

    def create_group(self, name: str, members: Iterable[int] = ()) -> Deferred[int]:
        """Fires with the new group id."""
        d = self._request(GroupCreate(name, tuple(members)), GroupCreated)
        return d.addCallback(lambda r: r.group_id)

    def add_members(self, group_id: int, members: Iterable[int]) -> Deferred[int]:
        """Fires with how many were added (members already in are skipped)."""
        d = self._request(GroupAdd(group_id, tuple(members)), GroupAddOk)
        return d.addCallback(lambda r: r.count)

    def remove_members(self, group_id: int, members: Iterable[int]) -> Deferred[int]:
        """Fires with how many were removed; removing oneself is leaving."""
        d = self._request(GroupRemove(group_id, tuple(members)), GroupRemoveOk)
        return d.addCallback(lambda r: r.count)

    def group_members(self, group_id: int) -> Deferred[GroupMemberList]:
        return self._request(GroupMembers(group_id), GroupMemberList)

    def my_groups(self) -> Deferred[tuple[GroupSummary, ...]]:
        return self._request(MyGroups(), GroupList).addCallback(lambda r: r.groups)

    def ping(self) -> Deferred[Pong]:
        return self._request(Ping(), Pong)

    # --- conversations and read markers (section 18)

    def _need(self, feature: int) -> None:
        if not self.connected:
            raise NotConnected("not connected")
        if feature not in self.features:
            raise FeatureUnavailable(f"{Feature(feature).name} is not enabled on this connection")

    def conversations(self, limit: int = 0, max_pages: int | None = None
                      ) -> Deferred[ConvResult]:  # fmt: skip
        """The whole list: CONV_LIST pages newest first (at most max_pages), then CONV_CHANGES
        from the first page's version; the rows land in `state.convs`, its version stored."""
        return self._conv_lock.run(self._fetch, True, limit, max_pages)

    def conversation_changes(self, limit: int = 0) -> Deferred[ConvResult]:
        """What changed since the stored list version (from 0: every row, hidden ones too)."""
        return self._conv_lock.run(self._fetch, False, limit, None)

    async def _fetch(self, whole: bool, limit: int, max_pages: int | None) -> ConvResult:
        self._need(Feature.CONVERSATIONS)
        proto, timeout = self._proto(), self.request_timeout
        if whole:
            result = await fetch_list(proto, self.state, limit, timeout, max_pages)
        else:
            result = await fetch_changes(proto, self.state, self.state.convs.version, limit,
                                         timeout)  # fmt: skip
        if self.on_conversation:
            for key in dict.fromkeys(result.changed):
                row = self.state.convs.get(key)
                if row is not None:
                    self.on_conversation(key, row)
        return result

    def newest_id(self, conv_kind: int, conv_id: int) -> int:
        """The newest msg_id known in a conversation (its row, or the messages held; 0)."""
        key = conv_key(conv_kind, conv_id)
        row = self.state.convs.get(key)
        held = self.state.conversations.get(key)
        return max(last_id(row) if row else 0, held[-1].msg_id if held else 0)

    def mark_read(self, conv_kind: int, conv_id: int, msg_id: int) -> Deferred[int]:
        """READ_MARK: my read position in the conversation moves up to msg_id (never back);
        fires with the position the server recorded (clamped to ids it has assigned)."""

        async def run() -> int:
            self._need(Feature.CONVERSATIONS)
            ok = await self._request(ReadMark(conv_kind, conv_id, msg_id), ReadMarkOk)
            key = conv_key(conv_kind, conv_id)
            row = self.state.convs.read(key, ok.msg_id)
            if row is not None:
                self.state.save()
                if self.on_conversation:
                    self.on_conversation(key, row)
            return ok.msg_id

        return Deferred.fromCoroutine(run())

    def hide(self, conv_kind: int, conv_id: int) -> Deferred[None]:
        """CONV_HIDE: off my list (every device's) until a newer message arrives; the history
        stays."""

        async def run() -> None:
            self._need(Feature.CONVERSATIONS)
            await self._request(ConvHide(conv_kind, conv_id), ConvHideOk)
            key = conv_key(conv_kind, conv_id)
            row = self.state.convs.hide(key)
            self.state.save()
            if self.on_conversation:
                self.on_conversation(key, row)

        return Deferred.fromCoroutine(run())

    # --- push notifications (section 19)

    def register_push(self, platform: str, token: str, preview: bool = False) -> Deferred[None]:
        """PUSH_REGISTER: while this device is not connected, the server has it notified
        through `platform` (apns, fcm, or one the server allows) at the platform's `token`;
        `preview`: a notification may show the message text. Replaces the device's previous
        registration; it lasts until unregister_push, another registration, or the platform
        reporting the token dead. Register again whenever the platform hands out a new token
        (registering the same one again is harmless)."""

        async def run() -> None:
            self._need(Feature.PUSH)
            options = PushRegister.PREVIEW if preview else 0
            await self._request(PushRegister(platform, token, options), PushRegisterOk)

        return Deferred.fromCoroutine(run())

    def unregister_push(self) -> Deferred[None]:
        """PUSH_UNREGISTER: no more notifications to this device (e.g. before logging out);
        also succeeds when nothing was registered."""

        async def run() -> None:
            self._need(Feature.PUSH)
            await self._request(PushUnregister(), PushUnregisterOk)

        return Deferred.fromCoroutine(run())

    def ack_cursor(self) -> Deferred[int]:
        """OFFLINE_ACK the stored cursor; fires with the device's position on the server."""
        d = self._request(OfflineAck(self.state.cursor), OfflineAckOk)
        return d.addCallback(lambda r: r.cursor)


def _exception(f: Failure) -> BaseException:
    assert f.value is not None  # a Failure always carries its exception
    return f.value


def _retry_delay(e: ServerError, attempt: int) -> float:
    """Seconds before resending after a retriable ERROR: the wait a RATE_LIMITED text announces
    (section 9.4), else the backoff of "retry later" (13.2): 1, 2, 4 ... 30 s."""
    ms = e.retry_after_ms
    if ms is None:
        return min(2.0**attempt, 30.0)
    return min(ms / 1000, MAX_RETRY_AFTER_S)
