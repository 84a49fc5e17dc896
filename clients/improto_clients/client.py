"""The improto client library: one device's session with an improto server, on Twisted.

Everything here is non-blocking: methods return Deferreds (the coroutines inside are run with
`Deferred.fromCoroutine`), so they can be awaited from other coroutines or chained with
callbacks. The layers:

- `ClientState`: what the device keeps between sessions (offline cursor, messages per
  conversation, outbox of unacknowledged SENDs), optionally persisted as one JSON file.
- `IMClientProtocol`: one TCP connection: framing, request/reply matching by request_id,
  heartbeats; it hands unsolicited frames (PUSH, SYNC_HINT, unmatched replies) to its client.
- `IMClient`: the session API: connect + HELLO, the offline sync loop, sends with retries,
  history, groups, and (optionally) reconnecting with backoff.

PROTOCOL.md sections 8-12 and the client checklist (section 17) are what this implements.

    client = IMClient("tcp:host=127.0.0.1:port=5555", token, "laptop",
                      state=ClientState.load("laptop.json"))
    client.on_message = lambda conv, m: print(conv, m.body)
    await client.connect()                      # HELLO, then sync + outbox resend
    ack = await client.send_text(ConvKind.USER, 1002, "hi")
"""

from __future__ import annotations

import bisect
import json
import os
import random
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto.codec import FrameReader, decode_payload, encode
from improto.enums import ClientKind, CloseReason, ContentType, ConvKind
from improto.errors import (
    FATAL_CODES,
    ErrorCode,
    FrameTooLarge,
    ProtocolError,
    UnknownFrameType,
)
from improto.frames import (
    FRAME_CLASSES,
    Close,
    Error,
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
    Message,
    MyGroups,
    OfflineAck,
    OfflineAckOk,
    OfflinePage,
    OfflinePull,
    Ping,
    Pong,
    Push,
    PushAck,
    Send,
    SendAck,
    SyncHint,
)
from improto.jsonform import frame_from_json, frame_to_json, record_from_json, record_to_json
from improto.limits import OFFLINE_PAGE_MAX, PROTOCOL_VERSION

__all__ = [
    "ClientState",
    "IMClient",
    "IMClientProtocol",
    "NotConnected",
    "ServerError",
    "SessionClosed",
    "StateMismatch",
    "SyncResult",
    "conv_key",
    "message_conv",
    "parse_conv_key",
]

log = Logger()
T = TypeVar("T")
U32_MAX = 0xFFFFFFFF
STATE_FORMAT = 1


# ------------------------------------------------------------------------------ errors


class ServerError(Exception):
    """An ERROR frame answering a request (or unsolicited, request_id 0)."""

    def __init__(self, code: int, text: str = "", request_id: int = 0) -> None:
        self.code = code
        self.text = text
        self.request_id = request_id
        super().__init__(f"{self.name} ({code}): {text}" if text else f"{self.name} ({code})")

    @property
    def name(self) -> str:
        """The code's name; an unknown code is named by its hundred (section 13.2)."""
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return f"{self.code // 100}xx"

    @property
    def fatal(self) -> bool:
        """The server closes the connection after this error (section 13.1)."""
        return self.code in FATAL_CODES

    @property
    def retriable(self) -> bool:
        """5xx: nothing happened, retry later (a SEND with the same client_msg_id)."""
        return self.code // 100 == 5


class SessionClosed(Exception):
    """The connection ended; `reason` is the CLOSE reason if the server sent one."""

    def __init__(self, reason: int | None = None, text: str = "",
                 error: ServerError | None = None) -> None:  # fmt: skip
        self.reason = reason
        self.text = text
        self.error = error  # the fatal ERROR that ended the session, if any
        super().__init__(f"connection closed: {self.reason_name}" + (f" ({text})" if text else ""))

    @property
    def reason_name(self) -> str | None:
        if self.reason is None:
            return self.error.name if self.error else None
        try:
            return CloseReason(self.reason).name
        except ValueError:
            return f"UNKNOWN_{self.reason}"


class NotConnected(Exception):
    """No logged-in connection; a SEND stays in the outbox and goes out after the next login."""


class StateMismatch(Exception):
    """The ClientState belongs to another user than the token logged in as."""


# ------------------------------------------------------------------- conversation keys


def conv_key(conv_kind: int, conv_id: int) -> str:
    """The local name of a conversation: "user:1002" or "group:7" (also the console's)."""
    return f"{'group' if conv_kind == ConvKind.GROUP else 'user'}:{conv_id}"


def parse_conv_key(key: str) -> tuple[int, int]:
    kind, _, cid = key.partition(":")
    kinds = {"user": ConvKind.USER, "group": ConvKind.GROUP}
    if kind not in kinds or not cid.isdigit():
        raise ValueError(f"not a conversation key: {key!r}")
    return kinds[kind], int(cid)


def message_conv(me: int, m: Message) -> str:
    """Section 6: a 1:1 message belongs to the peer, which is conv_id only if I sent it."""
    if m.conv_kind == ConvKind.GROUP:
        return conv_key(ConvKind.GROUP, m.conv_id)
    return conv_key(ConvKind.USER, m.conv_id if m.sender_id == me else m.sender_id)


# --------------------------------------------------------------------------- the state


@dataclass
class ClientState:
    """One device's local store. `path` set: `save()` rewrites that JSON file atomically.

    The offline `cursor` is opaque: it only ever takes values from OFFLINE_PAGE.cursor (or 0 on
    a fresh install, or 2^64-1 "resume" for a client that keeps nothing between launches).
    """

    path: str | None = None
    user_id: int | None = None
    cursor: int = 0
    conversations: dict[str, list[Message]] = field(default_factory=dict)
    outbox: dict[bytes, Send] = field(default_factory=dict)  # client_msg_id -> unacked SEND
    _ids: set[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ids = {m.msg_id for msgs in self.conversations.values() for m in msgs}

    def bind(self, user_id: int) -> None:
        """Attach the state to the logged-in user; a state file is never shared by users."""
        if self.user_id is not None and self.user_id != user_id:
            raise StateMismatch(f"state belongs to user {self.user_id}, not {user_id}")
        self.user_id = user_id

    def has(self, msg_id: int) -> bool:
        return msg_id in self._ids

    def add(self, m: Message) -> bool:
        """Store a message unless its msg_id is already held; True if it was new."""
        if m.msg_id in self._ids:
            return False
        if self.user_id is None:
            raise RuntimeError("the state has no user yet (store messages after HELLO_OK)")
        msgs = self.conversations.setdefault(message_conv(self.user_id, m), [])
        bisect.insort(msgs, m, key=lambda x: x.msg_id)  # a conversation shows in msg_id order
        self._ids.add(m.msg_id)
        return True

    def store_page(self, messages: Iterable[Message], cursor: int) -> list[Message]:
        """Store a page's messages, then move the cursor and persist (section 10.2).

        If saving fails the in-memory cursor goes back, so the next pull asks for the same page
        again: the cursor must never claim messages that were not stored.
        """
        new = [m for m in messages if self.add(m)]
        previous, self.cursor = self.cursor, cursor
        try:
            self.save()
        except BaseException:
            self.cursor = previous
            raise
        return new

    def messages(self, key: str) -> list[Message]:
        return list(self.conversations.get(key, ()))

    # --- persistence

    def to_json(self) -> dict[str, Any]:
        # Messages are written before the cursor; the file is replaced whole (see save()).
        return {
            "format": STATE_FORMAT,
            "user_id": None if self.user_id is None else str(self.user_id),
            "conversations": {
                k: [record_to_json(m) for m in msgs] for k, msgs in self.conversations.items()
            },
            "outbox": [frame_to_json(f) for f in self.outbox.values()],
            "cursor": str(self.cursor),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], path: str | None = None) -> ClientState:
        if obj.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported state format {obj.get('format')!r}")
        outbox: dict[bytes, Send] = {}
        for f in obj["outbox"]:
            frame = frame_from_json(f)
            assert isinstance(frame, Send)
            outbox[frame.client_msg_id] = frame
        return cls(
            path=path,
            user_id=None if obj["user_id"] is None else int(obj["user_id"]),
            cursor=int(obj["cursor"]),
            conversations={
                k: [record_from_json(Message, m) for m in msgs]
                for k, msgs in obj["conversations"].items()
            },
            outbox=outbox,
        )

    def save(self) -> None:
        """Write the whole state to `path` (no-op without one).

        Write-to-temp + rename: the file always holds a cursor together with every message
        stored before it, never a cursor ahead of its messages. The write is synchronous; the
        file is small for a console client.
        """
        if self.path is None:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: str) -> ClientState:
        """The state saved at `path`, or a fresh one (cursor 0) that will be saved there."""
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(json.load(f), path)
        except FileNotFoundError:
            return cls(path=path)


@dataclass
class SyncResult:
    """One run of the sync loop: new messages (duplicates skipped), unread summed over pages."""

    messages: list[Message] = field(default_factory=list)
    unread: dict[str, int] = field(default_factory=dict)  # conversation key -> count
    pages: int = 0
    gap: bool = False  # messages expired while away: refill recent conversations from history
    cursor: int = 0  # where the loop ended (what OFFLINE_ACK reported)


# ------------------------------------------------------------------------ the protocol


class IMClientProtocol(Protocol):
    """One connection: frames in and out, request matching, heartbeat."""

    def __init__(self, client: IMClient) -> None:
        self.client = client
        self.reactor = client.reactor
        self.connected = False
        self.heartbeat_s = 0
        self.close_frame: Close | None = None  # the server's CLOSE, recorded for on_close
        self.fatal_error: ServerError | None = None
        self.drop_reason = ""  # why this side closed, for SessionClosed.text
        self._reader = FrameReader()
        self._pending: dict[int, tuple[type[Frame], Deferred[Any]]] = {}
        self._next_id = 0
        self._last_sent = 0.0
        self._heartbeat: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None  # armed by a heartbeat PING
        self._lost_waiters: list[Deferred[None]] = []

    # --- sending

    @property
    def usable(self) -> bool:
        return self.connected and not self.transport.disconnecting  # type: ignore[union-attr]

    def next_request_id(self) -> int:
        """A wrapping u32 counter that skips 0 and ids still waiting for their reply."""
        while True:
            self._next_id = self._next_id % U32_MAX + 1
            if self._next_id not in self._pending:
                return self._next_id

    def send_frame(self, frame: Frame) -> None:
        """Write a frame that gets no reply (PUSH_ACK)."""
        self._write(encode(frame))

    def request(self, frame: Frame, timeout: float | None = None) -> Deferred[Any]:
        """Send `frame` with a fresh request_id; fires with the reply frame, or fails with
        ServerError (an ERROR), SessionClosed, NotConnected or defer.TimeoutError."""
        if not self.usable:
            return defer.fail(NotConnected("not connected"))
        rid = self.next_request_id()
        try:
            data = encode(replace(frame, request_id=rid))
        except ProtocolError as e:
            return defer.fail(e)

        def forget(_: Deferred[Any]) -> None:  # cancelled (timeout): a late reply is unmatched
            self._pending.pop(rid, None)

        d: Deferred[Any] = Deferred(forget)
        self._pending[rid] = (FRAME_CLASSES[frame.TYPE | 0x80], d)
        self._write(data)
        if timeout:
            d.addTimeout(timeout, self.reactor)
        return d

    def _write(self, data: bytes) -> None:
        self._last_sent = self.reactor.seconds()
        self.transport.write(data)  # type: ignore[union-attr]

    def when_lost(self) -> Deferred[None]:
        if not self.connected:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    def _drop(self, why: str) -> None:
        """Close without waiting for anything more from the server."""
        log.warn("closing the connection: {why}", why=why)
        self.drop_reason = why
        self.transport.abortConnection()  # type: ignore[union-attr]

    # --- receiving

    def connectionMade(self) -> None:
        self.connected = True
        self._last_sent = self.reactor.seconds()

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is not None:  # any bytes prove the connection is alive
            self._deadline.cancel()
            self._deadline = None
        too_large: FrameTooLarge | None = None
        try:
            payloads = self._reader.feed(data)
        except FrameTooLarge as e:
            payloads, too_large = e.frames, e  # the whole frames before it still count
        for payload in payloads:
            if not self.usable:
                return  # closing: the rest would only be read to be thrown away
            try:
                frame = decode_payload(payload)
            except UnknownFrameType:
                continue  # section 14: a client skips frame types it does not know
            except ProtocolError as e:
                self._bad_frame(e)
                return
            self._dispatch(frame)
        if too_large is not None:
            # Section 2: a client refuses an oversize length before buffering it and closes.
            self._drop(str(too_large))

    def _bad_frame(self, e: ProtocolError) -> None:
        """Section 2: the server never sends an undecodable frame, so the stream is not to be
        trusted any more: close (a reconnecting client then reconnects)."""
        entry = self._pending.pop(e.request_id, None) if e.request_id else None
        if entry is not None:
            entry[1].errback(e)
        self._drop(f"undecodable frame from the server: {e}")

    def _dispatch(self, frame: Frame) -> None:
        if frame.TYPE.client_to_server:
            return  # a client type sent by the server: ignored like an unknown type (section 7)
        # Unsolicited frames are recognised by type: their request_id (0) matches nothing.
        if isinstance(frame, Push):
            self.client._on_push(self, frame.message)
            return
        if isinstance(frame, SyncHint):
            self.client._request_sync()
            return
        if isinstance(frame, Close):
            self.close_frame = frame  # the server closes the TCP connection next
            return
        entry = self._pending.pop(frame.request_id, None) if frame.request_id else None
        if isinstance(frame, Error):
            err = ServerError(frame.code, frame.text, frame.request_id)
            if err.fatal:
                self.fatal_error = err
            if entry is not None:
                entry[1].errback(err)
            else:
                self.client._on_server_error(err)
            if err.fatal:
                self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if entry is None:
            self.client._on_unmatched(frame)
            return
        expected, d = entry
        if type(frame) is not expected:
            d.errback(ProtocolError(f"expected {expected.TYPE.name}, got {frame.TYPE.name}"))
        else:
            d.callback(frame)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        for call in (self._heartbeat, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._heartbeat = self._deadline = None
        c = self.close_frame
        exc = SessionClosed(c.reason if c else None, c.text if c else self.drop_reason,
                            self.fatal_error)  # fmt: skip
        pending, self._pending = self._pending, {}
        for _, d in pending.values():
            d.errback(exc)
        self.client._on_connection_lost(self, exc)
        waiters, self._lost_waiters = self._lost_waiters, []
        for w in waiters:
            w.callback(None)

    # --- heartbeat (section 8.4)

    def start_heartbeat(self, heartbeat_s: int) -> None:
        """PING whenever nothing was sent for heartbeat_s; drop the connection if nothing at
        all arrives for 2 x heartbeat_s after a PING. 0 disables it."""
        self.heartbeat_s = heartbeat_s
        if heartbeat_s > 0 and self.connected:
            self._heartbeat = self.reactor.callLater(heartbeat_s, self._heartbeat_due)

    def _heartbeat_due(self) -> None:
        hb = self.heartbeat_s
        idle = self.reactor.seconds() - self._last_sent
        if idle >= hb:
            self.request(Ping(), timeout=2 * hb).addErrback(lambda _: None)  # loss is handled
            if self._deadline is None:
                self._deadline = self.reactor.callLater(2 * hb, self._dead)
            idle = 0.0
        self._heartbeat = self.reactor.callLater(hb - idle, self._heartbeat_due)

    def _dead(self) -> None:
        self._deadline = None
        self._drop(f"nothing from the server for {2 * self.heartbeat_s} s after a PING")


# -------------------------------------------------------------------------- the client


class IMClient:
    """A device's session. `token` may be a callable, called for a fresh token per login.

    Callbacks (attributes, all optional):
    - `on_login(hello_ok)`: a connection is logged in (connect() or a reconnect);
    - `on_message(conv, message)`: a new message arrived by PUSH (duplicates are not repeated);
    - `on_sync(result)`: a sync the client ran by itself (after login, SYNC_HINT, pushes);
    - `on_resend(send, ack_or_exception)`: an outbox SEND resent after login finished;
    - `on_close(exc)`: the logged-in connection ended (`SessionClosed` with the CLOSE reason);
    - `on_error(exc)`: an unsolicited ERROR or a failure of a background task.
    """

    def __init__(self, server: str, token: str | Callable[[], str], device_id: str, *,
                 state: ClientState | None = None, reactor: Any = None,
                 client_kind: int = ClientKind.DESKTOP, request_timeout: float = 10.0,
                 reconnect: bool = False, push_sync_delay: float | None = 5.0) -> None:  # fmt: skip
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.server = server
        self.token = token
        self.device_id = device_id
        self.state = state if state is not None else ClientState()
        self.reactor = reactor
        self.client_kind = client_kind
        self.request_timeout = request_timeout
        self.reconnect = reconnect
        self.push_sync_delay = push_sync_delay
        self.rng = random.Random()

        self.on_login: Callable[[HelloOk], None] | None = None
        self.on_message: Callable[[str, Message], None] | None = None
        self.on_sync: Callable[[SyncResult], None] | None = None
        self.on_resend: Callable[[Send, SendAck | BaseException], None] | None = None
        self.on_close: Callable[[SessionClosed], None] | None = None
        self.on_error: Callable[[BaseException], None] | None = None

        self.protocol: IMClientProtocol | None = None  # set once HELLO_OK arrived
        self.hello: HelloOk | None = None
        self.last_close: SessionClosed | None = None
        self._sync_lock = DeferredLock()
        self._sync_queued = False
        self._tasks: set[Deferred[Any]] = set()
        self._closing = False
        self._attempt = 0
        self._reconnect_call: IDelayedCall | None = None
        self._push_sync_call: IDelayedCall | None = None

    @property
    def user_id(self) -> int | None:
        return self.state.user_id

    @property
    def connected(self) -> bool:
        return self.protocol is not None and self.protocol.usable

    @property
    def reconnecting(self) -> bool:
        """A reconnect is scheduled (true inside on_close when one will follow)."""
        return self._reconnect_call is not None and self._reconnect_call.active()

    def conv_of(self, m: Message) -> str:
        assert self.user_id is not None
        return message_conv(self.user_id, m)

    # --- session

    def connect(self) -> Deferred[HelloOk]:
        """Connect, HELLO, and on HELLO_OK start the sync loop and the outbox resend in the
        background (their outcome goes to on_sync/on_resend). Fires with the HELLO_OK."""
        return Deferred.fromCoroutine(self._connect())

    async def _connect(self) -> HelloOk:
        self._closing = False
        proto = IMClientProtocol(self)
        await connectProtocol(clientFromString(self.reactor, self.server), proto)
        token = self.token() if callable(self.token) else self.token
        try:
            hello = Hello(PROTOCOL_VERSION, self.client_kind, self.device_id, token)
            ok: HelloOk = await proto.request(hello, self.request_timeout)
            self.state.bind(ok.user_id)
            if self._closing:  # close() was called while this (re)connect was under way
                raise NotConnected("closed by the application")
        except BaseException:
            if proto.connected:
                proto.transport.loseConnection()  # type: ignore[union-attr]
            raise
        self.protocol, self.hello, self._attempt = proto, ok, 0
        proto.start_heartbeat(ok.heartbeat_s)
        if self.on_login:
            self.on_login(ok)
        # Snapshot now: a send() started after this login delivers its own message.
        self._spawn(self._after_login(list(self.state.outbox.values())))
        return ok

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
        """Close the connection (no reconnect); fires once it is closed."""
        self._closing = True
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        proto = self.protocol
        if proto is None or not proto.connected:
            return defer.succeed(None)
        d = proto.when_lost()
        proto.transport.loseConnection()  # type: ignore[union-attr]
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

    def _request(self, frame: Frame, timeout: float | None = None) -> Deferred[Any]:
        try:
            proto = self._proto()
        except NotConnected as e:
            return defer.fail(e)
        return proto.request(frame, self.request_timeout if timeout is None else timeout)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        d = Deferred.fromCoroutine(coro)
        self._tasks.add(d)

        def done(result: Any) -> None:
            self._tasks.discard(d)
            # A lost connection is reported once, through on_close, not per task it broke.
            if isinstance(result, Failure) and not result.check(SessionClosed, NotConnected):
                self._report(result.value)

        d.addBoth(done)

    def _report(self, e: BaseException) -> None:
        if self.on_error:
            self.on_error(e)
        else:
            log.warn("background failure: {error!r}", error=e)

    # --- events from the protocol

    def _on_push(self, proto: IMClientProtocol, m: Message) -> None:
        try:
            new = self.state.add(m)
            if new:
                self.state.save()
        except Exception:
            log.failure("cannot store pushed message {id}: not acknowledging it", id=m.msg_id)
            return  # unacked: it still waits in the inbox for the next sync
        proto.send_frame(PushAck(m.msg_id))  # acked even when it is a duplicate
        if not new:
            return
        if self.on_message:
            self.on_message(self.conv_of(m), m)
        # Section 10.2: sync some seconds after pushes so that the offline cursor follows.
        if self.push_sync_delay is not None and self._push_sync_call is None:
            self._push_sync_call = self.reactor.callLater(self.push_sync_delay, self._push_sync)

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
        self.last_close = exc
        if self._push_sync_call is not None and self._push_sync_call.active():
            self._push_sync_call.cancel()
        self._push_sync_call = None
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
            err = f.value
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
        proto = self._proto()
        result = SyncResult()
        while True:
            page: OfflinePage = await proto.request(
                OfflinePull(self.state.cursor, limit), self.request_timeout
            )
            # The next cursor is page.cursor, never a msg_id or a push (section 10.3).
            result.messages += self.state.store_page(page.messages, page.cursor)
            result.pages += 1
            result.gap = result.gap or bool(page.gap)
            for u in page.unread:
                key = conv_key(u.conv_kind, u.conv_id)
                result.unread[key] = result.unread.get(key, 0) + u.count
            if not page.has_more:  # never on the count: a short page can have more
                break
        await proto.request(OfflineAck(self.state.cursor), self.request_timeout)
        result.cursor = self.state.cursor
        return result

    # --- sending (section 9.1)

    def send(self, conv_kind: int, conv_id: int, body: bytes | str,
             content_type: int = ContentType.TEXT, client_msg_id: bytes | None = None,
             timeout: float = 10.0, retries: int = 3) -> Deferred[SendAck]:  # fmt: skip
        """Send a message; it stays in the outbox until a SEND_ACK arrives.

        A timeout or a 5xx ERROR is retried `retries` times with the same client_msg_id (the
        server deduplicates). Fails with ServerError when refused (the message leaves the
        outbox), or with TimeoutError/SessionClosed/NotConnected (it stays in the outbox and
        is resent after the next login).
        """
        if isinstance(body, str):
            body = body.encode("utf-8")
        cmid = client_msg_id if client_msg_id is not None else uuid.uuid4().bytes
        frame = Send(cmid, conv_kind, conv_id, content_type, body)
        return Deferred.fromCoroutine(self._send(frame, timeout, retries))

    def send_text(self, conv_kind: int, conv_id: int, text: str, **kw: Any) -> Deferred[SendAck]:
        return self.send(conv_kind, conv_id, text, ContentType.TEXT, **kw)

    async def _send(self, frame: Send, timeout: float, retries: int) -> SendAck:
        encode(frame)  # refuse an invalid message before it enters the outbox
        self.state.outbox[frame.client_msg_id] = frame
        self.state.save()
        return await self._deliver(frame, timeout, retries)

    async def _deliver(self, frame: Send, timeout: float, retries: int) -> SendAck:
        attempt = 0
        while True:
            try:
                ack: SendAck = await self._request(frame, timeout)
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
                await deferLater(self.reactor, min(2.0**attempt, 30.0))  # "retry later"
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
            self.state.add(mine)
        self.state.save()

    # --- history (section 11)

    def history(self, conv_kind: int, conv_id: int, before_id: int = 0,
                limit: int = 0) -> Deferred[HistoryPage]:  # fmt: skip
        """One page, newest first; messages are also stored locally (deduplicated)."""

        async def run() -> HistoryPage:
            page: HistoryPage = await self._request(
                HistoryPull(conv_kind, conv_id, before_id, limit)
            )
            if sum(self.state.add(m) for m in page.messages):
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
        d = self._request(GroupCreate(name, tuple(members)))
        return d.addCallback(lambda r: _check(r, GroupCreated).group_id)

    def add_members(self, group_id: int, members: Iterable[int]) -> Deferred[int]:
        """Fires with how many were added (members already in are skipped)."""
        d = self._request(GroupAdd(group_id, tuple(members)))
        return d.addCallback(lambda r: _check(r, GroupAddOk).count)

    def remove_members(self, group_id: int, members: Iterable[int]) -> Deferred[int]:
        """Fires with how many were removed; removing oneself is leaving."""
        d = self._request(GroupRemove(group_id, tuple(members)))
        return d.addCallback(lambda r: _check(r, GroupRemoveOk).count)

    def group_members(self, group_id: int) -> Deferred[GroupMemberList]:
        return self._request(GroupMembers(group_id))

    def my_groups(self) -> Deferred[tuple[GroupSummary, ...]]:
        return self._request(MyGroups()).addCallback(lambda r: _check(r, GroupList).groups)

    def ping(self) -> Deferred[Pong]:
        return self._request(Ping())

    def ack_cursor(self) -> Deferred[int]:
        """OFFLINE_ACK the stored cursor; fires with the device's position on the server."""
        d = self._request(OfflineAck(self.state.cursor))
        return d.addCallback(lambda r: _check(r, OfflineAckOk).cursor)


def _check(frame: Any, cls: type[T]) -> T:
    assert isinstance(frame, cls)  # the protocol already matched the reply type
    return frame
